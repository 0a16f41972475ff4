"""Stage ``evaluate``: per-case and pooled metrics (SPEC sections 6 and 7).

Two modes:

- **Study mode** (``--organ``, optionally ``--method``/``--seed``): every
  finished ``predict/<organ>/<tag>/seed<S>`` record of the manifest is scored
  against the organ's test labels (``prepare/<organ>`` output ``raw_dir``,
  ``labelsTs/<case>.nii.gz``). Each run writes
  ``<workdir>/evaluation/<organ>/<tag>/seed<S>/metrics.csv`` (one row per case
  plus ``ALL``) and ``reliability.json`` (pooled bins), and the record
  ``evaluate/<organ>/<tag>/seed<S>`` with outputs ``metrics_csv``,
  ``reliability_json`` and ``summary`` (the ``ALL`` row's numbers). Every
  voxel score is computed in the same pass for the whole volume and for the
  region of interest (columns ``*_roi``; ``reliability_roi.json``); on the
  phantom, the metrics against p* for the whole volume and the ambiguity
  band (``pstar_*``, ``pstar_*_band``; ``truth.json`` with the binned
  Var[p] against p*(1 - p*) of the band). A finished evaluation is skipped
  unless ``force``, its prediction finished later (re-predicted), or it was
  written by an older metrics version (:data:`METRICS_VERSION`).
  GED uses ``mobseg.data.references.reference_masks`` (all K annotators)
  and the metrics against p* use ``true_probability`` when that module exists.
- **Standalone mode** (``--pred DIR --gt DIR --out FILE.csv``): any folder of
  ``<case>_prob.nii.gz`` files is scored against ``<case>.nii.gz`` masks; no
  manifest record is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobseg import progress
from mobseg.core.config import HeadConfig
from mobseg.errors import ConfigurationError, InvalidInputError, MissingStageError, MobsegError
from mobseg.manifest import Manifest, StageRecord
from mobseg.metrics.conformal import DEFAULT_ALPHA
from mobseg.metrics.failure import DEFAULT_BOUNDARY_WIDTH, FAILURE_COLUMNS
from mobseg.stages.keys import (
    evaluate_key,
    predict_command,
    predict_key,
    predict_split_key,
    prepare_command,
    prepare_key,
)
from mobseg.stages.predict import BACKBONE_TAG
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)

#: Version of the metrics an evaluate record holds; a done record of another
#: version is evaluated again (2: ROI and p* columns added).
METRICS_VERSION = 3

#: Conformal risk control numbers of a record's ``summary`` (None without a
#: finished validation prediction).
CRC_KEYS = (
    "crc_alpha",
    "crc_lambda",
    "crc_fnr",
    "crc_volume_ratio",
    "crc_extra_volume",
    "crc_n_cal",
)

#: Numbers of the ``ALL`` row copied into a record's ``summary``.
SUMMARY_KEYS = (
    "dice",
    "dice_std",
    "nll",
    "brier",
    "ece",
    "mce",
    "nll_roi",
    "brier_roi",
    "ece_roi",
    "mce_roi",
    "auroc_var",
    "auprc_var",
    "auroc_entropy",
    "auprc_entropy",
    "aurc_var",
    "eaurc_var",
    "aurc_entropy",
    "eaurc_entropy",
    "ged2",
    "diversity",
    "reference_diversity",
    "diversity_ratio",
    "pstar_mae",
    "pstar_rmse",
    "pstar_nll",
    "pstar_brier",
    "pstar_var_corr",
    "pstar_var_ratio",
    "pstar_mae_band",
    "pstar_rmse_band",
    "pstar_nll_band",
    "pstar_brier_band",
    "pstar_var_corr_band",
    "pstar_var_ratio_band",
    "fnr",
    "volume_cv",
    *FAILURE_COLUMNS,
    *CRC_KEYS,
    "n_cases",
    "n_nan_dice",
)


@dataclass(frozen=True)
class EvaluateParams:
    """Options of ``mobseg evaluate``.

    Study mode evaluates predicted runs of the manifest (``organ``, optionally
    narrowed by ``head`` and ``seed``; no organ = every organ). Standalone mode
    (``pred``, ``gt``, ``out``) scores any folder of predictions against a
    folder of masks.

    Attributes:
        organ: Target structure (study mode); None = all organs with predictions.
        head: Only this method's runs (matched by ``head.tag()``, the run with
            every loss and training option at its default); None = all.
        run: Only the run with this tag (e.g. ``mob-b3-r16-lse``); overrides ``head``.
        seed: Only this seed (study mode); None = all seeds.
        pred: Folder with ``<case>_prob.nii.gz`` (standalone mode).
        gt: Folder with ``<case>.nii.gz`` 0/1 masks (standalone mode).
        out: CSV file to write (standalone mode).
        margin: Margin in voxels of the region of interest (the bounding box
            of G or S) whose scores are the ``*_roi`` columns.
        boundary_width: Width in voxels of the boundary band of S for the
            case-level scores ``mean_*_boundary``.
        alpha: Level of conformal risk control: the expected FNR of the organ
            mask {p >= lambda} calibrated on the validation predictions.
    """

    organ: str | None = None
    head: HeadConfig | None = None
    seed: int | None = None
    pred: Path | None = None
    gt: Path | None = None
    out: Path | None = None
    margin: int = 10
    run: str | None = None
    boundary_width: int = DEFAULT_BOUNDARY_WIDTH
    alpha: float = DEFAULT_ALPHA

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["head"] = None if self.head is None else self.head.to_dict()
        for k in ("pred", "gt", "out"):
            d[k] = None if d[k] is None else str(d[k])
        return d

    @property
    def tag(self) -> str | None:
        """The run tag to select, or None for every run."""
        if self.run is not None:
            return self.run
        return None if self.head is None else self.head.tag()

    @property
    def standalone(self) -> bool:
        return any(v is not None for v in (self.pred, self.gt, self.out))


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _summary(pooled: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k in SUMMARY_KEYS:
        v = pooled.get(k)
        if k.startswith("n_") and v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[k] = int(v)
        else:
            out[k] = _json_number(None if v is None else float(v))
    return out


def resolve_path(ws: Workspace, value: str | Path) -> Path:
    """A manifest output path: absolute as is, relative ones under the workdir."""
    p = Path(value)
    return p if p.is_absolute() else ws.root / p


def _relative(ws: Workspace, path: Path) -> str:
    try:
        return str(path.relative_to(ws.root))
    except ValueError:
        return str(path)


def _optional_references(ws: Workspace, organ: str, case: str) -> tuple[list[Path], Path | None]:
    """Reference masks (when >= 2) and p* from :mod:`mobseg.data.references`.

    Missing raters are not an error for evaluation: GED and the p* error are
    then left empty and a warning says why.
    """
    try:
        from mobseg.data import references as refs_mod
    except ImportError:
        return [], None
    try:
        refs = [Path(p) for p in refs_mod.reference_masks(ws, organ, case)]
        got = refs_mod.true_probability(ws, organ, case)
    except (MobsegError, KeyError) as exc:
        log.warning("Case %s: no reference masks for GED (%s).", case, exc)
        return [], None
    return (refs if len(refs) >= 2 else []), (None if got is None else Path(got))


def _check_out_file(out: Path) -> None:
    """``--out`` can take the CSV: not a folder, its folder creatable and writable.

    Checked before any case is scored, so a wrong ``--out`` fails at once.

    Raises:
        ConfigurationError: ``out`` is a folder.
        StorageError: its folder lies below a file, or is read-only.
    """
    from mobseg.fsutil import make_parent, storage_error

    if out.is_dir():
        raise ConfigurationError(
            f"--out {out} is a folder; give the CSV file to write, e.g. {out / 'metrics.csv'}."
        )
    folder = make_parent(out)
    if not os.access(folder, os.W_OK):
        raise storage_error(out, "its folder is read-only")


def _standalone(params: EvaluateParams) -> list[StageRecord]:
    from mobseg.metrics.io import evaluate_many, standalone_cases, write_metrics_csv

    if params.pred is None or params.gt is None or params.out is None:
        raise ConfigurationError(
            "Standalone evaluation needs --pred, --gt and --out together.",
            "Example: mobseg evaluate --pred preds/ --gt labels/ --out metrics.csv",
        )
    if params.organ is not None or params.tag is not None or params.seed is not None:
        raise ConfigurationError(
            "--pred/--gt/--out (standalone) cannot be combined with --organ, --method or --seed."
        )
    out = Path(params.out)
    _check_out_file(out)
    cases = standalone_cases(Path(params.pred), Path(params.gt))
    with progress.progress_bar("evaluate (standalone)", total=len(cases)) as advance:
        acc = evaluate_many(
            cases,
            params.margin,
            on_case=lambda _c: advance(),
            boundary_width=params.boundary_width,
        )
    pooled = acc.pooled_row()
    write_metrics_csv(out, acc.rows, pooled)
    summary = _summary(pooled)
    outputs: dict[str, Any] = {"metrics_csv": str(out)}
    outputs.update({k: v for k, v in summary.items() if v is not None})
    return [
        StageRecord(
            stage="evaluate",
            key="evaluate (standalone)",
            params=params.to_dict(),
            outputs=outputs,
            status="done",
        )
    ]


def _parse_key(key: str) -> tuple[str, str, int]:
    parts = key.split("/")
    if len(parts) != 4 or not parts[3].startswith("seed"):
        raise ValueError(f"Not a run key: {key!r}")
    return parts[1], parts[2], int(parts[3][4:])


def _select_predictions(manifest: Manifest, params: EvaluateParams) -> list[StageRecord]:
    prefix = f"predict/{params.organ}/" if params.organ else "predict/"
    chosen = []
    for rec in manifest.find("predict", prefix):
        try:
            _organ, tag, seed = _parse_key(rec.key)
        except ValueError:
            continue
        if params.tag is not None and tag != params.tag:
            continue
        if params.seed is not None and seed != params.seed:
            continue
        if not rec.done:
            log.warning("Skipping %s: its status is %s.", rec.key, rec.status)
            continue
        if rec.params.get("input"):
            log.warning(
                "Skipping %s: it predicted %s, not the test split; score it with "
                "`mobseg evaluate --pred DIR --gt DIR --out FILE.csv`.",
                rec.key,
                rec.params["input"],
            )
            continue
        chosen.append(rec)
    if chosen:
        return chosen
    if params.organ is not None and manifest.get(prepare_key(params.organ)) is None:
        raise MissingStageError(prepare_key(params.organ), prepare_command(params.organ))
    organ = params.organ or "<organ>"
    method = params.head.method if params.head is not None else "mob"
    if params.tag is not None and params.seed is not None:
        key = predict_key(organ, params.tag, params.seed)
    else:
        key = prefix.rstrip("/") + ("" if params.organ else "/<organ>")
    raise MissingStageError(
        key,
        predict_command(organ, method, params.seed if params.seed is not None else 0, params.head),
    )


def _raw_dir(ws: Workspace, manifest: Manifest, organ: str) -> tuple[StageRecord, Path]:
    prep = manifest.require(prepare_key(organ), prepare_command(organ))
    raw = prep.outputs.get("raw_dir")
    if not raw:
        raise InvalidInputError(
            f"The record {prepare_key(organ)} has no raw_dir output.",
            hint=f"Rerun `{prepare_command(organ)} --force`.",
        )
    return prep, resolve_path(ws, raw)


def _test_cases(ws: Workspace, manifest: Manifest, organ: str) -> tuple[Path, list[str]]:
    _, raw = _raw_dir(ws, manifest, organ)
    labels = raw / "labelsTs"
    if not labels.is_dir():
        raise InvalidInputError(
            "The test labels folder does not exist.",
            path=str(labels),
            hint=f"Rerun `{prepare_command(organ)} --force`.",
        )
    cases = sorted(p.name[: -len(".nii.gz")] for p in labels.glob("*.nii.gz"))
    if not cases:
        raise InvalidInputError("No test labels (<case>.nii.gz) found.", path=str(labels))
    return labels, cases


def evaluate_prediction(
    ws: Workspace,
    manifest: Manifest,
    pred_rec: StageRecord,
    params: EvaluateParams,
    force: bool = False,
) -> StageRecord:
    """Evaluate one finished ``predict/<organ>/<tag>/seed<S>`` record (study mode).

    Used by :func:`run` for every selected prediction, and directly by callers
    that name the prediction themselves (e.g. the backbone's, whose tag no
    :class:`HeadConfig` produces). Only ``params.margin`` is read.

    Returns:
        The ``evaluate/...`` record (skipped as done unless ``force`` or stale).
    """
    from mobseg.metrics.io import (
        atomic_write_text,
        evaluate_many,
        prediction_files,
        write_metrics_csv,
    )
    from mobseg.metrics.phantom import BAND_HIGH, BAND_LOW

    organ, tag, seed = _parse_key(pred_rec.key)
    key = evaluate_key(organ, tag, seed)
    old = manifest.get(key)
    stale = manifest.stale(old)  # the prediction ran again since
    current = old is not None and old.outputs.get("metrics_version") == METRICS_VERSION
    val_rec = manifest.get(predict_split_key(organ, tag, seed, "val"))
    if val_rec is not None and not val_rec.done:
        val_rec = None
    same = old is not None and all(
        old.params.get(k) == getattr(params, k) for k in ("boundary_width", "alpha")
    )
    same = same and old is not None and ("conformal_json" in old.outputs) == (val_rec is not None)
    if old is not None and old.done and not force and not stale and current and same:
        log.info("%s is done; skipping (use --force to redo).", key)
        return old

    labels, cases = _test_cases(ws, manifest, organ)
    pred_dir = resolve_path(
        ws, pred_rec.outputs.get("pred_dir") or ws.prediction_dir(organ, tag, seed)
    )
    files = []
    for case in cases:
        f = prediction_files(pred_dir, case, labels / f"{case}.nii.gz")
        f.references, f.true_prob = _optional_references(ws, organ, case)
        files.append(f)

    backbone = tag == BACKBONE_TAG or bool(pred_rec.params.get("backbone"))
    head = {} if backbone else (pred_rec.params.get("head") or {})
    method = "deterministic" if backbone else head.get("method")
    if pred_rec.params.get("ensemble"):
        method = "ensemble"
    run_params = {
        "organ": organ,
        "tag": tag,
        "seed": seed,
        "method": method,
        "bases": head.get("bases"),
        "backbone": backbone,
        "head": head or None,
        "margin": params.margin,
        "boundary_width": params.boundary_width,
        "alpha": params.alpha,
    }
    out_dir = ws.evaluation_dir(organ, tag, seed)
    csv_path = out_dir / "metrics.csv"
    rel_path = out_dir / "reliability.json"
    rel_roi_path = out_dir / "reliability_roi.json"
    truth_path = out_dir / "truth.json"
    crc_path = out_dir / "conformal.json"
    inputs = {"predict": pred_rec.key, "pred_dir": str(pred_dir), "labels": str(labels)}
    deps = [pred_rec]
    if val_rec is not None:
        inputs["predict_val"] = val_rec.key
        deps.append(val_rec)
    with manifest.running("evaluate", key, run_params, inputs, deps) as outputs:
        with progress.progress_bar(f"evaluate {organ}/{tag}/seed{seed}", len(files)) as adv:
            acc = evaluate_many(
                files,
                params.margin,
                on_case=lambda _c: adv(),
                boundary_width=params.boundary_width,
            )
        pooled = acc.pooled_row()
        if val_rec is not None:
            crc = conformal_risk(ws, manifest, organ, val_rec, files, acc.rows, params.alpha)
            atomic_write_text(crc_path, json.dumps(crc, indent=1))
            pooled.update({k: crc[k] for k in CRC_KEYS})
            outputs["conformal_json"] = _relative(ws, crc_path)
        write_metrics_csv(csv_path, acc.rows, pooled)
        for path, scores in ((rel_path, acc.whole), (rel_roi_path, acc.roi_scores)):
            reliability = scores.calibration.reliability().to_dict()
            atomic_write_text(path, json.dumps(reliability, indent=1))
        outputs.update(
            metrics_csv=_relative(ws, csv_path),
            reliability_json=_relative(ws, rel_path),
            reliability_roi_json=_relative(ws, rel_roi_path),
            pred_dir=_relative(ws, pred_dir),
            summary=_summary(pooled),
            n_cases=len(files),
            metrics_version=METRICS_VERSION,
        )
        if acc.has_pstar:
            truth = {
                "band": [BAND_LOW, BAND_HIGH],
                "variance_curve_band": acc.truth_band.variance.curve()
                if acc.truth_band.has_variance
                else None,
            }
            atomic_write_text(truth_path, json.dumps(truth, indent=1))
            outputs["truth_json"] = _relative(ws, truth_path)
    rec = manifest.get(key)
    if rec is None:  # pragma: no cover - written just above
        raise RuntimeError(f"record {key} vanished")
    return rec


def conformal_risk(
    ws: Workspace,
    manifest: Manifest,
    organ: str,
    val_rec: StageRecord,
    test_files: list[Any],
    test_rows: list[dict[str, Any]],
    alpha: float,
) -> dict[str, Any]:
    """Conformal risk control of the FNR: lambda calibrated on the validation predictions.

    Args:
        ws: The workspace.
        manifest: The manifest (the organ's prepare record gives the labels).
        organ: The organ.
        val_rec: The finished ``predict/<organ>/<tag>/seed<S>/val`` record.
        test_files: The test cases' files (probability and mask are read).
        test_rows: The test cases' metric rows (``n_pred`` = |S|).
        alpha: The level.

    Returns:
        The ``crc_*`` numbers of :data:`CRC_KEYS`, the per-case test FNR at
        lambda (``test_fnr``), the calibration cases and the mean calibration
        FNR at lambda.

    Raises:
        InvalidInputError: a validation case's prediction or label is missing.
    """
    from mobseg.metrics.conformal import calibrate, held_out_risk
    from mobseg.metrics.io import prediction_files, threshold_histogram

    _, raw = _raw_dir(ws, manifest, organ)
    labels = raw / "labelsTr"
    val_dir = resolve_path(ws, val_rec.outputs["pred_dir"])
    cases = [str(c) for c in val_rec.outputs.get("cases") or []]
    if not cases:
        raise InvalidInputError(f"The record {val_rec.key} lists no predicted cases.")
    cal = [threshold_histogram(prediction_files(val_dir, c, labels / f"{c}.nii.gz")) for c in cases]
    threshold = calibrate(cal, alpha)
    test = [threshold_histogram(f) for f in test_files]
    risk = held_out_risk(test, threshold, [int(r["n_pred"]) for r in test_rows])
    k = threshold.index
    return {
        "crc_alpha": alpha,
        "crc_lambda": threshold.lam,
        "crc_feasible": threshold.feasible,
        "crc_n_cal": threshold.n,
        **risk,
        "calibration_cases": cases,
        "calibration_fnr": float(sum(h.fnr()[k] for h in cal) / len(cal)),
        "test_fnr": {f.case: float(h.fnr()[k]) for f, h in zip(test_files, test, strict=True)},
    }


def run(ws: Workspace, params: EvaluateParams, force: bool = False) -> list[StageRecord]:
    """Evaluate.

    Returns:
        Study mode: the evaluate records (new or skipped as done). Standalone
        mode: one record that is *not* stored in the manifest, whose outputs
        are the CSV path and the pooled numbers.

    Raises:
        ConfigurationError: negative margin, half a standalone call.
        MissingStageError: no finished prediction (or preparation) to evaluate.
        InvalidInputError: a missing, mismatched or invalid file (names the case).
    """
    if params.margin < 0:
        raise ConfigurationError(f"--margin must be >= 0, got {params.margin}.")
    if params.seed is not None and params.seed < 0:
        raise ConfigurationError(f"--seed must be >= 0, not {params.seed}.")
    if params.boundary_width < 1:
        raise ConfigurationError(f"--boundary-width must be >= 1, got {params.boundary_width}.")
    if not 0 < params.alpha < 1:
        raise ConfigurationError(f"--alpha must lie in (0, 1), got {params.alpha}.")
    if params.standalone:
        return _standalone(params)
    manifest = Manifest(ws.manifest_path)
    records = [
        evaluate_prediction(ws, manifest, rec, params, force)
        for rec in _select_predictions(manifest, params)
    ]
    for organ in sorted({r.key.split("/")[1] for r in records}):
        write_aggregate(ws, manifest, organ)
    return records


#: Private name kept for callers written before the public one existed.
_evaluate_run = evaluate_prediction


def write_aggregate(ws: Workspace, manifest: Manifest, organ: str) -> Path:
    """Per organ x tag, mean and sample std (ddof = 1) over seeds of every summary number.

    Writes ``<workdir>/evaluation/<organ>/summary.csv`` from the finished
    evaluate records (whole-volume, ROI and, on the phantom, p* metrics side
    by side; records of the former ``--region roi`` mode, keys ending in
    ``/roi``, are ignored): one row per tag
    with ``method``, ``n_seeds``, ``seeds`` and ``<metric>_mean``,
    ``<metric>_std`` for the metrics of :data:`SUMMARY_KEYS`.

    Returns:
        The CSV path.
    """
    import csv
    import io

    import numpy as np

    from mobseg.metrics.io import atomic_write_text

    groups: dict[str, list[StageRecord]] = {}
    for rec in manifest.find("evaluate", f"evaluate/{organ}/"):
        parts = rec.key.split("/")
        if not rec.done or len(parts) != 4:
            continue
        groups.setdefault(parts[2], []).append(rec)
    metrics = [k for k in SUMMARY_KEYS if not k.startswith("n_")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["organ", "tag", "method", "n_seeds", "seeds"]
        + [f"{m}_{stat}" for m in metrics for stat in ("mean", "std")]
    )
    for tag in sorted(groups):
        recs = sorted(groups[tag], key=lambda r: r.params.get("seed", 0))
        row: list[Any] = [
            organ,
            tag,
            recs[0].params.get("method"),
            len(recs),
            " ".join(str(r.params.get("seed")) for r in recs),
        ]
        for m in metrics:
            vals = np.array(
                [v for r in recs if (v := (r.outputs.get("summary") or {}).get(m)) is not None],
                dtype=np.float64,
            )
            mean = f"{vals.mean():.10g}" if vals.size else ""
            std = f"{vals.std(ddof=1):.10g}" if vals.size > 1 else ""
            row += [mean, std]
        writer.writerow(row)
    path = ws.root / "evaluation" / organ / "summary.csv"
    atomic_write_text(path, buf.getvalue())
    return path
