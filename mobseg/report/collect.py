"""Gather the study's results from the manifest for the report.

Reads the finished ``evaluate`` records (their ``summary``, metrics CSV and
reliability bins), the ``prepare`` records (split counts, raw dataset) and
groups the runs into the rows of the paper's tables. Anything missing or
unreadable is skipped with a warning, so a partial study still reports.

Rows (one per run configuration, i.e. per tag):

- ``backbone``: the pretrained nnU-Net, the paper's "Deterministic" row;
- one *canonical* row per method: the paper's configuration (the method's
  default tag, e.g. ``mob-b3-r16``), or the method's only tag when the
  default was not run and that tag has no loss or training suffix (a
  ``mob-b3-r16-lse`` run is never shown as the paper's row); it carries the
  paper's published values;
- every other tag (ablations such as ``mob-b5-r16``, loss, noise and
  training variants such as ``mob-b3-r16-lse-annall``, the fine-tuned
  deterministic controls) as its own row, labelled with the tag, after its
  method's canonical row.

Each run also carries its training configuration (objective, noise,
annotators, learning rate) from its ``finetune`` record, which Table 5b
shows beside the tag.

The five paper rows are always present (empty cells when not run).

Rows fall into two groups (:attr:`RowKey.group`), in this order:
:data:`HEADS_GROUP` (the backbone, the fine-tuned heads and their variants,
frozen-backbone runs included) and :data:`BASELINES_GROUP`, the
sampling-based baselines: MC-dropout runs (tag ``...-mcd<rate>``),
TTA mixtures (``...-ttamix``) and deep ensembles (``ensemble-...``).
Each run carries its prediction's ``seconds_per_case`` (from its predict
record); :meth:`StudyResults.cost` divides it by the deterministic one's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobseg.core.config import METHOD_LABELS, METHOD_NAMES, HeadConfig
from mobseg.manifest import Manifest, StageRecord
from mobseg.metrics.calibration import CalibrationAccumulator, ReliabilityBins
from mobseg.metrics.io import read_metrics_csv
from mobseg.report.paper import PAPER_ORGANS
from mobseg.stages.predict import BACKBONE_TAG, TTA_MIXTURE_SUFFIX
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)

#: Methods that are not heads but baselines built from runs (rows after the heads).
BASELINE_METHODS: tuple[str, ...] = ("ensemble",)

#: Row groups of the tables (:attr:`RowKey.group`).
HEADS_GROUP = "Covariance heads"
BASELINES_GROUP = "Sampling-based baselines"

BACKBONE_LABEL = "Deterministic (nnU-Net backbone)"
FINETUNED_DETERMINISTIC_LABEL = "Deterministic (fine-tuned control)"


@dataclass
class RunResult:
    """One evaluated run (organ x tag x seed).

    Attributes:
        organ, tag, seed: The run.
        method: One of METHOD_NAMES (``deterministic`` for the backbone).
        bases: M for mob runs, else None.
        summary: The pooled numbers of the ``ALL`` row (None = undefined).
        rows: Per-case rows of the metrics CSV (may be empty if unreadable).
        reliability: Pooled reliability bins, or None.
        truth_curve: Binned Var[p] against p*(1 - p*) in the ambiguity band
            (``variance_curve_band`` of ``truth.json``; phantom runs with a
            variance map), or None.
        pred_dir: The prediction folder (for case panels), or None.
        key: The evaluate record's key.
        variant: The tag carries a loss or training suffix (``-lse``, ``-k8``,
            ``-x<hash>``...; :meth:`mobseg.core.config.RunConfig.tag`).
        training: ``objective``, ``noise``, ``annotators`` and ``lr`` of the
            run's fine-tuning (:func:`training_of`), or None (the backbone, or
            no finetune record).
    """

    organ: str
    tag: str
    seed: int
    method: str
    bases: int | None
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    reliability: ReliabilityBins | None = None
    truth_curve: dict[str, Any] | None = None
    pred_dir: Path | None = None
    key: str = ""
    variant: bool = False
    training: dict[str, Any] | None = None
    seconds_per_case: float | None = None

    def value(self, name: str) -> float:
        """A summary number as float (NaN when missing)."""
        v = self.summary.get(name)
        try:
            return float("nan") if v is None else float(v)
        except (TypeError, ValueError):
            return float("nan")


@dataclass(frozen=True)
class RowKey:
    """One row of the method tables.

    Attributes:
        tag: Run tag (``backbone``, ``mob-b3-r16``, ...).
        method: Method name.
        label: Display name.
        paper_row: The paper's row name whose values it shows, or None.
        group: :data:`HEADS_GROUP` or :data:`BASELINES_GROUP`.
    """

    tag: str
    method: str
    label: str
    paper_row: str | None
    group: str = HEADS_GROUP


@dataclass
class OrganInfo:
    """What ``prepare`` recorded for an organ."""

    organ: str
    counts: dict[str, int] | None = None
    raw_dir: Path | None = None


@dataclass
class StudyResults:
    """Everything the report shows.

    Attributes:
        runs: Evaluated runs (each with whole-volume, ROI and, on the
            phantom, p* metrics in its summary).
        organs: Per organ: split counts, raw dataset.
    """

    runs: list[RunResult] = field(default_factory=list)
    organs: dict[str, OrganInfo] = field(default_factory=dict)

    def organ_names(self) -> list[str]:
        """Organs with results or preparation, paper order first; the paper's four if none."""
        seen = {r.organ for r in self.runs} | set(self.organs)
        if not seen:
            return list(PAPER_ORGANS)
        return [o for o in PAPER_ORGANS if o in seen] + sorted(seen - set(PAPER_ORGANS))

    def result_organs(self) -> list[str]:
        """Organs with at least one evaluated run, in table order."""
        have = {r.organ for r in self.runs}
        return [o for o in self.organ_names() if o in have]

    def rows(self) -> list[RowKey]:
        """Table rows: the five paper rows always, then every other tag that was run."""
        variants = {r.tag for r in self.runs if r.variant}
        return row_keys({(r.tag, r.method, r.bases) for r in self.runs}, variants)

    def group(self, organ: str, tag: str) -> list[RunResult]:
        """Runs of one organ and tag, by seed."""
        return sorted(
            (r for r in self.runs if r.organ == organ and r.tag == tag), key=lambda r: r.seed
        )

    def seconds_per_case(self, organ: str, tag: str) -> float:
        """Mean over seeds of the recorded prediction seconds per case (NaN if none)."""
        m, _, _ = mean_std(
            [r.seconds_per_case for r in self.group(organ, tag) if r.seconds_per_case is not None]
        )
        return m

    def cost(self, organ: str, tag: str) -> float:
        """Seconds per case of ``tag`` relative to the deterministic prediction's, same organ.

        The reference is the backbone's (``backbone``), else the fine-tuned
        deterministic control's (``deterministic``); NaN when either is unknown.
        """
        for ref in (BACKBONE_TAG, "deterministic"):
            base = self.seconds_per_case(organ, ref)
            if math.isfinite(base) and base > 0:
                return self.seconds_per_case(organ, tag) / base
        return float("nan")

    def has_runs(self, organ: str) -> bool:
        """Whether any run of ``organ`` was evaluated."""
        return any(r.organ == organ for r in self.runs)

    def pooled_reliability(self, organ: str, tag: str) -> CalibrationAccumulator | None:
        """Reliability bins of all seeds of one organ and tag, summed."""
        acc: CalibrationAccumulator | None = None
        for r in self.group(organ, tag):
            if r.reliability is None:
                continue
            part = CalibrationAccumulator.from_reliability(r.reliability)
            acc = part if acc is None else acc.merge(part)
        return acc


def is_baseline(tag: str, method: str) -> bool:
    """Whether a row is a sampling-based baseline (MC dropout, TTA mixture, ensemble)."""
    return method in BASELINE_METHODS or "-mcd" in tag or tag.endswith(TTA_MIXTURE_SUFFIX)


def baseline_label(tag: str, method: str) -> str:
    """Display name of a sampling-based baseline row."""
    if method == "ensemble":
        return f"Deep ensemble ({tag.removeprefix('ensemble-')})"
    if tag.endswith(TTA_MIXTURE_SUFFIX):
        return f"TTA mixture ({tag.removesuffix(TTA_MIXTURE_SUFFIX)})"
    return f"MC dropout ({tag})"


def _tag_sort_key(tag: str, bases: int | None) -> tuple[int, str]:
    return (bases if bases is not None else 0, tag)


def row_keys(
    present: set[tuple[str, str, int | None]], variants: set[str] | frozenset[str] = frozenset()
) -> list[RowKey]:
    """Rows for the tags in ``present`` ((tag, method, bases) triples), in table order.

    Tags in ``variants`` (loss or training suffix) never stand in for the paper's row.
    """
    by_method: dict[str, dict[str, int | None]] = {m: {} for m in METHOD_NAMES}
    baselines: set[tuple[str, str]] = set()
    for tag, method, bases in present:
        if tag == BACKBONE_TAG:
            continue
        if is_baseline(tag, method):
            baselines.add((tag, method))
            continue
        by_method.setdefault(method, {})[tag] = bases
    rows = [RowKey(BACKBONE_TAG, "deterministic", BACKBONE_LABEL, "Deterministic")]
    for method in METHOD_NAMES:
        tags = by_method.get(method, {})
        if method == "deterministic":
            for tag in sorted(tags, key=lambda t: (t != HeadConfig(method).tag(), t)):
                label = FINETUNED_DETERMINISTIC_LABEL
                if tag != HeadConfig(method).tag():  # e.g. deterministic-annall-x<hash>
                    label = f"{label.removesuffix(')')}, {tag})"
                rows.append(RowKey(tag, method, label, None))
            continue
        default = HeadConfig(method).tag()
        label = METHOD_LABELS[method]
        only = next(iter(tags)) if len(tags) == 1 else None
        canonical = only if (only is not None and only not in variants) else default
        rows.append(RowKey(canonical, method, label, label))
        others = sorted(
            (t for t in tags if t != canonical), key=lambda t: _tag_sort_key(t, tags[t])
        )
        for tag in others:
            extra = f"M={tags[tag]}, {tag}" if method == "mob" and tags[tag] else tag
            rows.append(RowKey(tag, method, f"{label} ({extra})", None))
    kind = {"mcd": 0, "ttamix": 1, "ensemble": 2}
    for tag, method in sorted(
        baselines,
        key=lambda tm: (
            kind["ensemble" if tm[1] == "ensemble" else "ttamix" if "ttamix" in tm[0] else "mcd"],
            tm[0],
        ),
    ):
        rows.append(RowKey(tag, method, baseline_label(tag, method), None, BASELINES_GROUP))
    return rows


def _resolve(ws: Workspace, value: Any) -> Path | None:
    if not value:
        return None
    p = Path(str(value))
    return p if p.is_absolute() else ws.root / p


def _seconds_per_case(records: Mapping[str, StageRecord], rec: StageRecord) -> float | None:
    """The ``seconds_per_case`` of the prediction an evaluate record scored, or None."""
    key = rec.inputs.get("predict")
    pred = records.get(key) if isinstance(key, str) else None
    value = pred.outputs.get("seconds_per_case") if pred is not None else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def training_of(params: dict[str, Any]) -> dict[str, Any]:
    """The training configuration of a finetune record's params, for the report.

    Returns:
        ``objective`` (``mean``/``logsumexp``; None for a deterministic head,
        which has none), ``noise`` (single-basis and mob, else None),
        ``annotators`` and ``lr``.
    """
    head = params.get("head") or {}
    loss = params.get("loss") or {}
    method = head.get("method")
    return {
        "objective": loss.get("mc_loss", "mean") if method != "deterministic" else None,
        "noise": head.get("noise", "voxel") if method in ("single-basis", "mob") else None,
        "annotators": str(params.get("annotators", "0")),
        "lr": params.get("lr"),
    }


def _run_from_record(
    ws: Workspace,
    rec: StageRecord,
    finetune: StageRecord | None = None,
    records: Mapping[str, StageRecord] | None = None,
) -> RunResult | None:
    parts = rec.key.split("/")
    try:
        organ, tag, seed = parts[1], parts[2], int(parts[3].removeprefix("seed"))
    except (IndexError, ValueError):
        log.warning("Ignoring evaluate record with an unexpected key %r.", rec.key)
        return None
    method = rec.params.get("method") or ("deterministic" if tag == BACKBONE_TAG else None)
    if method not in METHOD_NAMES and method not in BASELINE_METHODS:
        log.warning("Ignoring %s: unknown method %r.", rec.key, method)
        return None
    bases = rec.params.get("bases") if method == "mob" else None
    head = rec.params.get("head")
    try:
        variant = bool(head) and tag != HeadConfig(**head).tag()
    except (TypeError, ValueError):
        variant = False
    run = RunResult(
        organ=organ,
        tag=tag,
        seed=seed,
        method=method,
        bases=int(bases) if bases is not None else None,
        summary=dict(rec.outputs.get("summary") or {}),
        pred_dir=_resolve(ws, rec.outputs.get("pred_dir")),
        key=rec.key,
        variant=variant,
        training=training_of(finetune.params) if finetune is not None else None,
        seconds_per_case=_seconds_per_case(records or {}, rec),
    )
    csv_path = _resolve(ws, rec.outputs.get("metrics_csv"))
    if csv_path is not None and csv_path.is_file():
        try:
            run.rows, _ = read_metrics_csv(csv_path)
        except (OSError, ValueError) as exc:
            log.warning("Cannot read %s (%s); per-case figures skip this run.", csv_path, exc)
    rel_path = _resolve(ws, rec.outputs.get("reliability_json"))
    if rel_path is not None and rel_path.is_file():
        try:
            run.reliability = ReliabilityBins.from_dict(json.loads(rel_path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("Cannot read %s (%s); the reliability diagram skips it.", rel_path, exc)
    truth_path = _resolve(ws, rec.outputs.get("truth_json"))
    if truth_path is not None and truth_path.is_file():
        try:
            curve = json.loads(truth_path.read_text()).get("variance_curve_band")
            run.truth_curve = curve if isinstance(curve, dict) else None
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("Cannot read %s (%s); the variance figure skips it.", truth_path, exc)
    return run


def collect(ws: Workspace) -> StudyResults:
    """Read the manifest of ``ws`` into :class:`StudyResults` (never raises on gaps)."""
    records = Manifest(ws.manifest_path).records()
    results = StudyResults()
    for rec in sorted(records.values(), key=lambda r: r.key):
        if rec.stage != "prepare" or not rec.done:
            continue
        organ = rec.key.split("/", 1)[-1]
        counts = rec.outputs.get("counts")
        results.organs[organ] = OrganInfo(
            organ=organ,
            counts=dict(counts) if isinstance(counts, dict) else None,
            raw_dir=_resolve(ws, rec.outputs.get("raw_dir")),
        )
    for rec in sorted(records.values(), key=lambda r: r.key):
        if rec.stage != "evaluate" or not rec.done or rec.key.endswith("/roi"):
            continue  # former --region roi records: superseded
        finetune = records.get("finetune/" + rec.key.split("/", 1)[-1])
        run = _run_from_record(
            ws, rec, finetune if finetune is not None and finetune.done else None, records
        )
        if run is not None:
            results.runs.append(run)
    return results


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1, n) of the finite values; NaN where undefined."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)
