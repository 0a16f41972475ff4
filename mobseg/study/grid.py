"""The study grid: organs x configurations x seeds (+ the bases ablation) as a DAG of stage jobs.

A :class:`StudySpec` says *what* to run; :func:`expand` turns it into a
:class:`Plan`, an ordered mapping of manifest key -> :class:`Job`. Every job
is one call ``mobseg.stages.<stage>.run(Workspace(root), params, force)``, so
the manifest (file-locked, atomic writes) is the only state shared between
worker processes and cluster nodes.

Dependencies, per organ ``o``, tag ``t`` (the fine-tuning's ``RunConfig.tag()``,
see :func:`mobseg.stages.finetune.run_tag`) and seed ``s``::

    prepare/o -> pretrain/o -> finetune/o/t/seed<s> -> predict/o/t/seed<s> -> evaluate/o/t/seed<s>
    pretrain/o -> predict/o/backbone/seed0 -> evaluate/o/backbone/seed0
    every evaluate -> report

Counts of the paper grid (4 organs, 5 methods, seeds 0..4, ablation M = 1..5
on pancreas). The ablation's M = 3 run *is* the main grid's ``mob-b3-r16``
run, so it is counted once:

============  =========================================  =====
stage         derivation                                 jobs
============  =========================================  =====
prepare       one per organ                                  4
pretrain      one per organ                                  4
finetune      4 x 5 x 5 + (5 - 1) x 5 ablation runs        120
predict       finetune runs + one backbone run per organ   124
evaluate      one per predict run                          124
report        once                                           1
============  =========================================  =====

A configuration is a method with one objective, noise mode and annotator
choice (:class:`RunVariant`): the grid crosses ``methods`` x ``objectives``
(stochastic heads) x ``noises`` (single-basis and mob) x ``annotators``, all
at the spec's learning rate and schedule, plus any explicit ``variants``.
The paper grid has one of each (mean, voxel, annotator 0). The *truth* grid
(:data:`GRIDS`, ``mobseg study --grid truth``, on the phantom) has both
objectives, both noise modes and both annotator choices: per organ
2 (deterministic) + 4 (diagonal) + 4 (lowrank) + 8 (single-basis) + 8 (mob)
= 26 configurations, x 3 seeds = 78 fine-tunings, 79 predictions and
evaluations with the backbone, 239 jobs with prepare, pretrain and report.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mobseg.core.config import (
    ANNOTATOR_CHOICES,
    MC_LOSSES,
    METHOD_NAMES,
    NOISE_MODES,
    HeadConfig,
    LossConfig,
    check_annotators,
    check_method,
)
from mobseg.data.structures import PAPER_ORGANS, resolve_organ
from mobseg.errors import ConfigurationError, UnknownNameError
from mobseg.manifest import StageRecord, outdated_inputs
from mobseg.stages import keys
from mobseg.stages.predict import BACKBONE_TAG

#: Stages in the order they run.
STAGES: tuple[str, ...] = ("prepare", "pretrain", "finetune", "predict", "evaluate", "report")

#: Status of a job as the study sees it.
JOB_STATUSES: tuple[str, ...] = ("done", "running", "failed", "pending")


@dataclass(frozen=True)
class ExtraPrediction:
    """A prediction on a CT outside the organ's test split (the demo's real CT).

    Attributes:
        input: A CT file or a folder of CTs.
        out: Output folder of the prediction files.
        method: The fine-tuned run to predict with (its method; bases etc. from the spec).
        seed: Seed of that run.
    """

    input: Path
    out: Path
    method: str = "mob"
    seed: int = 0


#: Methods that have a noise mode (``--noise``) to vary.
NOISE_METHODS: tuple[str, ...] = ("single-basis", "mob")

#: The paper's AdamW learning rate of the fine-tuning.
PAPER_LR = 1e-4


@dataclass(frozen=True)
class RunVariant:
    """One fine-tuning configuration of a method, besides its seed.

    The grid crosses methods, objectives, noise modes and annotator choices
    into variants; :attr:`StudySpec.variants` adds explicit ones (the demo's
    best configuration and its control).

    Attributes:
        method: One of :data:`mobseg.core.config.METHOD_NAMES`.
        mc_loss: ``mean`` (the paper) or ``logsumexp`` (SSN); ignored by a
            deterministic head.
        noise: ``voxel`` or ``block`` (single-basis and mob only).
        annotators: ``0`` or ``all``.
        lr: AdamW learning rate; None = the spec's ``lr``.
    """

    method: str
    mc_loss: str = "mean"
    noise: str = "voxel"
    annotators: str = "0"
    lr: float | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.mc_loss not in MC_LOSSES:
            raise UnknownNameError("objective", self.mc_loss, MC_LOSSES)
        if self.noise not in NOISE_MODES:
            raise UnknownNameError("noise mode", self.noise, NOISE_MODES)
        check_annotators(self.annotators)
        if self.lr is not None and self.lr <= 0:
            raise ConfigurationError(f"The learning rate must be > 0, got {self.lr}.")


@dataclass(frozen=True)
class StudySpec:
    """What a study runs. Defaults are the paper's grid at the ``paper`` preset.

    Attributes:
        organs: Target structures (resolved names).
        methods: Methods of :data:`mobseg.core.config.METHOD_NAMES`.
        seeds: Number of seeds per configuration; seeds ``0 .. seeds-1``.
        ablation_bases: Values of M for the ablation (mob only); empty = no ablation.
        ablation_organ: The organ of the ablation (added to the grid's organs if missing).
        backbone: Predict and evaluate the pretrained backbone (tag ``backbone``).
        report: End with ``mobseg report``.
        preset: ``paper`` or ``cpu`` (pretrain and finetune).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        source: Data source of ``prepare`` (``zenodo``, ``phantom``, a folder or zip).
        subset: ``full`` or ``small`` (zenodo only).
        split_seed: Seed of the splits (and of the phantom).
        num_cases: Phantom cases (None = prepare's default).
        size: Phantom edge length in voxels (None = prepare's default).
        pretrain_epochs: Override the preset's backbone epochs.
        num_gpus: GPUs of each pretraining (nnU-Net's own DDP).
        epochs: Override the preset's fine-tuning epochs.
        iterations: Override the preset's iterations per fine-tuning epoch.
        lr: AdamW learning rate of every fine-tuning (the deterministic
            control's too); other than :data:`PAPER_LR` it adds ``-x<hash>``
            to the run tags.
        objectives: Objectives (``mc_loss``) of the stochastic heads; the
            deterministic head has one run whatever they are.
        noises: Noise modes of single-basis and mob (the other heads have
            voxel noise only).
        annotators: Annotator choices (``0``, ``all``) of every method, the
            deterministic control included.
        antithetic: Antithetic pairs in every stochastic run (needs an even
            ``train_samples``).
        variants: Configurations run besides the grid's cross product (on
            the grid's organs, with the grid's seeds and schedule).
        train_samples: k, samples of the logits per training step.
        rank: R of the low-rank factor and of the bases.
        bases: M of the main grid's mob runs.
        partitions: P, blocks per axis (mob).
        samples: k, Monte-Carlo samples per voxel at prediction (more than two classes only).
        save_samples: S joint samples written per test case (GED and sample
            diversity where several reference masks exist, e.g. the phantom).
        tta: Mirroring test-time augmentation of every prediction (nnU-Net's
            default; off makes each prediction several times faster on a CPU).
        extra_predictions: Predictions on CTs outside the test split (demo).
        baselines: Add the sampling-based baselines (``--baselines``,
            :func:`add_baselines`); off in the paper's grid.
    """

    organs: tuple[str, ...] = PAPER_ORGANS
    methods: tuple[str, ...] = METHOD_NAMES
    seeds: int = 5
    ablation_bases: tuple[int, ...] = (1, 2, 3, 4, 5)
    ablation_organ: str = "pancreas"
    backbone: bool = True
    report: bool = True
    preset: str = "paper"
    device: str = "auto"
    source: str = "zenodo"
    subset: str = "full"
    split_seed: int = 0
    num_cases: int | None = None
    size: int | None = None
    pretrain_epochs: int | None = None
    num_gpus: int = 1
    epochs: int | None = None
    iterations: int | None = None
    lr: float = PAPER_LR
    objectives: tuple[str, ...] = ("mean",)
    noises: tuple[str, ...] = ("voxel",)
    annotators: tuple[str, ...] = ("0",)
    antithetic: bool = False
    variants: tuple[RunVariant, ...] = ()
    train_samples: int = 5
    rank: int = 16
    bases: int = 3
    partitions: int = 4
    samples: int = 30
    save_samples: int = 8
    tta: bool = True
    extra_predictions: tuple[ExtraPrediction, ...] = ()
    baselines: bool = False

    def __post_init__(self) -> None:
        if not self.organs:
            raise ConfigurationError("The study needs at least one organ (--organs).")
        for m in self.methods:
            check_method(m)
        if not self.methods and not self.backbone:
            raise ConfigurationError("The study needs at least one method (--methods).")
        if self.seeds < 1:
            raise ConfigurationError(f"--seeds must be >= 1, got {self.seeds}.")
        if self.save_samples < 0:
            raise ConfigurationError(f"--save-samples must be >= 0, got {self.save_samples}.")
        if any(b < 1 for b in self.ablation_bases):
            raise ConfigurationError(
                f"Every M of --bases-ablation must be >= 1, got {list(self.ablation_bases)}."
            )
        if self.num_gpus < 1:
            raise ConfigurationError(f"--num-gpus must be >= 1, got {self.num_gpus}.")
        if self.lr <= 0:
            raise ConfigurationError(f"--lr must be > 0, got {self.lr}.")
        for name, values in (
            ("objective", self.objectives),
            ("noise mode", self.noises),
            ("annotator choice", self.annotators),
        ):
            if not values:
                raise ConfigurationError(f"The study needs at least one {name}.")
            for v in values:
                if v not in CHOICES[name]:
                    raise UnknownNameError(name, v, CHOICES[name])
        if self.antithetic and self.train_samples % 2:
            raise ConfigurationError(
                f"--antithetic needs an even --train-samples, got {self.train_samples}."
            )
        for extra in self.extra_predictions:
            if extra.method != BACKBONE_TAG:
                check_method(extra.method)

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(range(self.seeds))

    @property
    def all_organs(self) -> tuple[str, ...]:
        """The grid's organs, plus the ablation organ when there is an ablation."""
        organs = list(self.organs)
        if self.ablation_bases and self.ablation_organ not in organs:
            organs.append(self.ablation_organ)
        return tuple(organs)

    def head(self, method: str, bases: int | None = None, noise: str = "voxel") -> HeadConfig:
        """The head of ``method`` with the spec's R, M and P (``bases`` overrides M)."""
        return HeadConfig(
            method=method,
            rank=self.rank,
            bases=self.bases if bases is None else bases,
            partitions=self.partitions,
            noise=noise,
        )

    def method_variants(self, method: str) -> list[RunVariant]:
        """The grid's configurations of ``method``: objectives x noises x annotators.

        Objectives apply to stochastic heads only, noise modes to
        :data:`NOISE_METHODS` only, so a deterministic control has one
        configuration per annotator choice.
        """
        objectives = self.objectives if method != "deterministic" else ("mean",)
        noises = self.noises if method in NOISE_METHODS else ("voxel",)
        return [
            RunVariant(method, mc_loss=o, noise=n, annotators=a)
            for o in dict.fromkeys(objectives)
            for n in dict.fromkeys(noises)
            for a in dict.fromkeys(self.annotators)
        ]

    def default_variant(self, method: str) -> RunVariant:
        """The first configuration of ``method`` (the paper's at the defaults)."""
        return self.method_variants(method)[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = [asdict(v) for v in self.variants]
        d["extra_predictions"] = [
            {**asdict(e), "input": str(e.input), "out": str(e.out)} for e in self.extra_predictions
        ]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudySpec:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in known}
        for name in ("organs", "methods", "ablation_bases", "objectives", "noises", "annotators"):
            if name in d:
                d[name] = tuple(d[name])
        if "variants" in d:
            d["variants"] = tuple(RunVariant(**v) for v in d["variants"])
        if "extra_predictions" in d:
            d["extra_predictions"] = tuple(
                ExtraPrediction(
                    input=Path(e["input"]),
                    out=Path(e["out"]),
                    method=e.get("method", "mob"),
                    seed=int(e.get("seed", 0)),
                )
                for e in d["extra_predictions"]
            )
        return cls(**d)


@dataclass(frozen=True)
class Job:
    """One stage run of the study.

    Attributes:
        stage: One of :data:`STAGES`.
        key: Its manifest key (``finetune/pancreas/mob-b3-r16/seed0``).
        params: The stage's ``*Params`` object (picklable).
        deps: Keys of the jobs that must finish first.
        runner: ``"module:function"`` called as ``function(ws, params, force=...)``;
            empty = ``mobseg.stages.<stage>:run``. Tests point it at fake stages.
        gpus: GPUs the job uses when the machine or the cluster has GPUs.
        after_any: Run once every dependency has settled (done, failed or
            skipped) and at least one is done, instead of needing all of them
            (the report: a failed seed must not hide the other 119 runs).
        refresh: Rerun (with ``force``) when a dependency ran in this study
            invocation, even if the manifest says done (the report).
        organ: Organ of the run, for the grid view (None for the report).
        tag: Run tag, for the grid view (None for prepare, pretrain, report).
        seed: Seed of the run, for the grid view.
    """

    stage: str
    key: str
    params: Any
    deps: tuple[str, ...] = ()
    runner: str = ""
    gpus: int = 1
    after_any: bool = False
    refresh: bool = False
    organ: str | None = None
    tag: str | None = None
    seed: int | None = None

    @property
    def target(self) -> str:
        return self.runner or f"mobseg.stages.{self.stage}:run"

    def options_changed(self, record: StageRecord) -> bool:
        """A finished prediction recorded with other options than this job's.

        ``predict`` is the stage that redoes a finished run when its options
        change (``--samples``, ``--save-samples``, another input), so such a
        job is not done.
        """
        if self.stage != "predict":
            return False
        params = getattr(self.params, "params", self.params)  # OutsidePrediction wraps them
        to_dict = getattr(params, "to_dict", None)
        return callable(to_dict) and record.params != to_dict()


@dataclass
class Plan:
    """The study's jobs by manifest key, in an order where dependencies come first."""

    jobs: dict[str, Job] = field(default_factory=dict)

    def add(self, job: Job) -> Job:
        """Add ``job`` unless its key is already planned (shared runs are counted once)."""
        if job.key in self.jobs:
            return self.jobs[job.key]
        missing = [d for d in job.deps if d not in self.jobs]
        if missing:
            raise ValueError(f"Job {job.key} depends on unplanned jobs {missing}.")
        self.jobs[job.key] = job
        return job

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs.values())

    def __contains__(self, key: object) -> bool:
        return key in self.jobs

    def __getitem__(self, key: str) -> Job:
        return self.jobs[key]

    def by_stage(self, stage: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.stage == stage]

    def dependents(self) -> dict[str, list[str]]:
        """Key -> keys of the jobs that depend on it directly."""
        out: dict[str, list[str]] = {k: [] for k in self.jobs}
        for job in self.jobs.values():
            for d in job.deps:
                out[d].append(job.key)
        return out

    def with_runner(self, runner: str) -> Plan:
        """A copy whose every job calls ``runner`` (``"module:function"``) instead."""
        return Plan({k: replace(j, runner=runner) for k, j in self.jobs.items()})

    def current(self, records: Mapping[str, StageRecord]) -> set[str]:
        """Keys of the jobs a run of the study would not redo.

        A job is current when its record is done, none of the records it was
        built from ran again since (:func:`mobseg.manifest.outdated_inputs`),
        a prediction's options are unchanged (:meth:`Job.options_changed`),
        and, except for ``refresh`` jobs, all its dependencies are current
        (a job built on something that will run again is outdated once it has).
        """
        current: set[str] = set()
        for job in self.jobs.values():  # dependencies come first
            rec = records.get(job.key)
            if rec is None or not rec.done or outdated_inputs(rec, records):
                continue
            if job.options_changed(rec):
                continue
            if not job.refresh and any(d not in current for d in job.deps):
                continue
            current.add(job.key)
        return current

    def status(self, records: Mapping[str, StageRecord]) -> dict[str, str]:
        """Key -> ``done``, ``outdated`` (done, but would run again: :meth:`current`),
        ``running``, ``failed`` or ``pending`` from manifest records."""
        current = self.current(records)
        out: dict[str, str] = {}
        for key in self.jobs:
            rec = records.get(key)
            if rec is None:
                out[key] = "pending"
            elif rec.done and key not in current:
                out[key] = "outdated"
            else:
                out[key] = rec.status
        return out

    def stage_counts(self, records: Mapping[str, StageRecord]) -> list[dict[str, Any]]:
        """Per stage: ``total``, ``done``, ``running``, ``failed``, ``remaining``.

        ``remaining`` = total - done (what a run of the study would still do).
        """
        status = self.status(records)
        rows = []
        for stage in STAGES:
            stage_keys = [j.key for j in self.by_stage(stage)]
            if not stage_keys:
                continue
            c = Counter(status[k] for k in stage_keys)
            rows.append(
                {
                    "stage": stage,
                    "total": len(stage_keys),
                    "done": c["done"],
                    "running": c["running"],
                    "failed": c["failed"],
                    "remaining": len(stage_keys) - c["done"],
                }
            )
        return rows

    def run_cells(self, records: Mapping[str, StageRecord]) -> dict[tuple[str, str], Counter[str]]:
        """(organ, tag) -> counts over seeds of ``done/running/failed/pending`` runs.

        A run (organ, tag, seed) is its finetune, predict and evaluate jobs. It
        is *done* when its last job is done, *failed* when any of its jobs
        failed, *running* when any is running (or was interrupted), else *pending*.
        """
        status = self.status(records)
        runs: dict[tuple[str, str, int], list[Job]] = {}
        for job in self.jobs.values():
            if job.stage not in ("finetune", "predict", "evaluate"):
                continue
            if job.organ is None or job.tag is None or job.seed is None:
                continue  # e.g. a prediction on an outside CT: not a run of the grid
            runs.setdefault((job.organ, job.tag, job.seed), []).append(job)
        cells: dict[tuple[str, str], Counter[str]] = {}
        for (organ, tag, _seed), jobs in runs.items():
            cell = cells.setdefault((organ, tag), Counter())
            cell[run_status([status[j.key] for j in jobs])] += 1
        return cells


def run_status(statuses: Iterable[str]) -> str:
    """Status of a run from its stage statuses, ordered finetune, predict, evaluate."""
    s = list(statuses)
    if not s:
        return "pending"
    if "failed" in s:
        return "failed"
    if "running" in s:
        return "running"
    if s[-1] == "done":
        return "done"
    return "pending"


# -- named grids ----------------------------------------------------------------------------
#: Defaults of each ``mobseg study --grid``; options given on the command line override them.
GRIDS: dict[str, dict[str, Any]] = {
    # The paper: 4 organs x 5 methods x 5 seeds, the bases ablation, mean objective, annotator 0.
    "paper": {},
    # Against the truth (phantom): every method with both objectives, both noise modes where
    # they apply and both annotator choices, 3 seeds, no ablation.
    "truth": {
        "organs": ("pancreas",),
        "seeds": 3,
        "ablation_bases": (),
        "source": "phantom",
        "objectives": MC_LOSSES,
        "noises": ("voxel", "block"),
        "annotators": ANNOTATOR_CHOICES,
    },
}


def grid_spec(name: str, **options: Any) -> StudySpec:
    """The spec of the named grid (:data:`GRIDS`), with ``options`` (None = the grid's) over it.

    Raises:
        UnknownNameError: ``name`` is not a grid.
        ConfigurationError: the truth grid on a source without the true label
            law (only the phantom has one).
    """
    if name not in GRIDS:
        raise UnknownNameError("grid", name, tuple(GRIDS))
    values = dict(GRIDS[name])
    values.update({k: v for k, v in options.items() if v is not None})
    spec = StudySpec(**values)
    if name == "truth" and spec.source != "phantom":
        raise ConfigurationError(
            f"--grid truth needs --source phantom, got {spec.source!r}.",
            "Only the phantom knows the true label law p* and draws several annotators.",
        )
    return spec


#: The choices of the grid's list options, by the name the errors use.
CHOICES: dict[str, tuple[str, ...]] = {
    "objective": MC_LOSSES,
    "noise mode": ("voxel", "block"),
    "annotator choice": ANNOTATOR_CHOICES,
}


def resolve_choices(values: Iterable[str] | None, kind: str) -> tuple[str, ...] | None:
    """Repeated or comma-separated values of ``kind`` (:data:`CHOICES`), checked.

    Returns:
        The values in order without repeats, or None when none were given.

    Raises:
        UnknownNameError: a value is not one of the kind's choices.
    """
    names = split_names(values)
    if not names:
        return None
    for n in names:
        if n not in CHOICES[kind]:
            raise UnknownNameError(kind, n, CHOICES[kind])
    return tuple(dict.fromkeys(names))


# -- parsing --------------------------------------------------------------------------------
def parse_bases(text: str | None) -> tuple[int, ...]:
    """Parse ``--bases-ablation``: ``1..5``, ``1,2,4``, ``2..3,5`` or ``none``.

    Raises:
        ConfigurationError: the text is not of that form or a range is empty.
    """
    if text is None or text.strip().lower() in ("", "none", "no", "off"):
        return ()
    values: list[int] = []
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:(?:\.\.|-)(\d+))?", part)
        if m is None:
            raise ConfigurationError(
                f"Cannot read --bases-ablation {text!r}.",
                "Write a range like 1..5, a list like 1,2,4, or none.",
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigurationError(f"The range {part!r} of --bases-ablation is empty.")
        values.extend(range(lo, hi + 1))
    return tuple(dict.fromkeys(values))


def split_names(values: Iterable[str] | None) -> list[str]:
    """Flatten repeated and comma-separated options: ``["a,b", "c"]`` -> ``[a, b, c]``."""
    out: list[str] = []
    for v in values or ():
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def resolve_organs(values: Iterable[str] | None) -> tuple[str, ...]:
    """Organ names (repeated or comma-separated), resolved; default the paper's four."""
    names = split_names(values)
    if not names:
        return PAPER_ORGANS
    return tuple(dict.fromkeys(resolve_organ(n) for n in names))


def resolve_methods(values: Iterable[str] | None) -> tuple[str, ...]:
    """Method names (repeated or comma-separated), checked; default all five."""
    names = split_names(values)
    if not names:
        return METHOD_NAMES
    return tuple(dict.fromkeys(check_method(n) for n in names))


# -- expansion ------------------------------------------------------------------------------
def _prepare_params(spec: StudySpec, organ: str) -> Any:
    from mobseg.stages.prepare import PrepareParams

    extra: dict[str, Any] = {}
    if spec.num_cases is not None:
        extra["num_cases"] = spec.num_cases
    if spec.size is not None:
        extra["size"] = spec.size
    return PrepareParams(
        organ=organ, source=spec.source, subset=spec.subset, seed=spec.split_seed, **extra
    )


def _pretrain_params(spec: StudySpec, organ: str) -> Any:
    from mobseg.stages.pretrain import PretrainParams

    return PretrainParams(
        organ=organ,
        preset=spec.preset,
        device=spec.device,
        epochs=spec.pretrain_epochs,
        num_gpus=spec.num_gpus,
    )


def _finetune_params(
    spec: StudySpec, organ: str, head: HeadConfig, seed: int, variant: RunVariant | None = None
) -> Any:
    """Params of one fine-tuning; ``variant`` gives objective, annotators and lr
    (None = the paper's objective, annotator 0, the spec's lr; its noise is the head's)."""
    from mobseg.stages.finetune import FinetuneParams

    variant = variant or RunVariant(head.method, noise=head.noise)
    stochastic = head.method != "deterministic"
    return FinetuneParams(
        organ=organ,
        head=head,
        loss=LossConfig(
            samples=spec.train_samples,
            mc_loss=variant.mc_loss if stochastic else "mean",
            antithetic=spec.antithetic and stochastic,
        ),
        seed=seed,
        preset=spec.preset,
        device=spec.device,
        epochs=spec.epochs,
        iterations=spec.iterations,
        lr=spec.lr if variant.lr is None else variant.lr,
        annotators=variant.annotators,
    )


def run_tag(
    spec: StudySpec, organ: str, head: HeadConfig, variant: RunVariant | None = None
) -> str:
    """Tag of the fine-tuned run of ``head`` (and ``variant``) in the study.

    The finetune stage's own :func:`mobseg.stages.finetune.run_tag`: the head's
    tag plus the suffix of every non-default option (``-lse``, ``-annall``,
    ``-x<hash>`` for a learning rate or schedule other than the paper's).
    """
    from mobseg.stages.finetune import run_tag as finetune_tag

    return finetune_tag(_finetune_params(spec, organ, head, 0, variant), spec.preset)


def configurations(spec: StudySpec) -> list[tuple[str, HeadConfig, RunVariant]]:
    """Every fine-tuned configuration (organ, head, variant), in plan order.

    The main grid (organs x methods x :meth:`StudySpec.method_variants`),
    then the explicit ``variants`` on each organ, then the bases ablation
    (mob, the first objective and annotator choice). Configurations with the
    same run tag are one configuration.
    """
    out: list[tuple[str, HeadConfig, RunVariant]] = []
    for organ in spec.organs:
        for method in spec.methods:
            for v in spec.method_variants(method):
                out.append((organ, spec.head(method, noise=v.noise), v))
        for v in spec.variants:
            out.append((organ, spec.head(v.method, noise=v.noise), v))
    first = spec.default_variant("mob")
    for m in spec.ablation_bases:
        out.append((spec.ablation_organ, spec.head("mob", bases=m), replace(first, noise="voxel")))
    seen: set[tuple[str, str]] = set()
    unique = []
    for organ, head, v in out:
        key = (organ, run_tag(spec, organ, head, v))
        if key not in seen:
            seen.add(key)
            unique.append((organ, head, v))
    return unique


def _run_option(head: HeadConfig | None, tag: str | None) -> dict[str, Any]:
    """``run=tag`` for the predict/evaluate params when the tag is not the head's own."""
    if head is None or tag is None or tag == head.tag():
        return {}
    return {"run": tag}


def _predict_params(
    spec: StudySpec,
    organ: str,
    head: HeadConfig | None,
    seed: int,
    input: Path | None = None,
    out: Path | None = None,
    tag: str | None = None,
) -> Any:
    """Params of a prediction; ``head=None`` predicts with the pretrained backbone."""
    from mobseg.stages.predict import PredictParams

    kwargs: dict[str, Any] = {
        "organ": organ,
        "seed": seed,
        "input": input,
        "out": out,
        "samples": spec.samples,
        "tta": spec.tta,
        "device": spec.device,
        # sample masks serve the test set's evaluation, not extra predictions
        "save_samples": spec.save_samples if input is None else 0,
    }
    if head is None:
        kwargs["backbone"] = True
    else:
        kwargs["head"] = head
    return PredictParams(**kwargs, **_run_option(head, tag))


def _evaluate_params(organ: str, head: HeadConfig | None, seed: int, tag: str | None = None) -> Any:
    """Params of one run's evaluation (``head=None``: the backbone, see :func:`_evaluate_job`)."""
    from mobseg.stages.evaluate import EvaluateParams

    return EvaluateParams(organ=organ, head=head, seed=seed, **_run_option(head, tag))


def _evaluate_job(
    organ: str, head: HeadConfig | None, seed: int, pk: str, tag: str | None = None
) -> Job:
    """The evaluation of one run; the backbone's goes through the study's adapter.

    ``evaluate.run`` selects runs by tag (``tag``, default ``head.tag()``) and
    seed; it has no way to select the backbone alone, so
    :func:`mobseg.study.adapters.evaluate_backbone` evaluates exactly
    ``predict/<organ>/backbone/seed0``.
    """
    tag = BACKBONE_TAG if head is None else (tag or head.tag())
    key = keys.evaluate_key(organ, tag, seed)
    runner = "mobseg.study.adapters:evaluate_backbone" if head is None else ""
    params = _evaluate_params(organ, head, seed, tag)
    return Job(
        "evaluate", key, params, (pk,), runner=runner, gpus=0, organ=organ, tag=tag, seed=seed
    )


def extra_prediction_key(organ: str, extra: ExtraPrediction, tag: str) -> str:
    """Manifest key of a prediction on an outside CT: ``predict/<organ>/<tag>/seed<S>/<name>``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(extra.out).name) or "extra"
    return f"{keys.predict_key(organ, tag, extra.seed)}/{name}"


def expand(spec: StudySpec) -> Plan:
    """Expand ``spec`` into its jobs and their dependencies (see the module docstring).

    Returns:
        The plan; its keys are the stages' manifest keys, so shared runs (the
        ablation's M equal to the main grid's M) appear once.
    """
    plan = Plan()
    organs = spec.all_organs
    for organ in organs:
        plan.add(Job("prepare", keys.prepare_key(organ), _prepare_params(spec, organ), gpus=0))
    for organ in organs:
        plan.add(
            Job(
                "pretrain",
                keys.pretrain_key(organ),
                _pretrain_params(spec, organ),
                deps=(keys.prepare_key(organ),),
                gpus=spec.num_gpus,
            )
        )

    evaluations: list[str] = []
    for organ, head, variant in configurations(spec):
        tag = run_tag(spec, organ, head, variant)
        for seed in spec.seed_list:
            fk = keys.finetune_key(organ, tag, seed)
            pk = keys.predict_key(organ, tag, seed)
            ek = keys.evaluate_key(organ, tag, seed)
            where = {"organ": organ, "tag": tag, "seed": seed}
            plan.add(
                Job(
                    "finetune",
                    fk,
                    _finetune_params(spec, organ, head, seed, variant),
                    deps=(keys.pretrain_key(organ),),
                    **where,
                )
            )
            pp = _predict_params(spec, organ, head, seed, tag=tag)
            plan.add(Job("predict", pk, pp, (fk,), **where))
            plan.add(_evaluate_job(organ, head, seed, pk, tag))
            if ek not in evaluations:
                evaluations.append(ek)

    if spec.baselines:
        evaluations += [k for k in add_baselines(spec, plan) if k not in evaluations]

    if spec.backbone:
        for organ in spec.organs:
            where = {"organ": organ, "tag": BACKBONE_TAG, "seed": 0}
            pk = keys.predict_key(organ, BACKBONE_TAG, 0)
            ek = keys.evaluate_key(organ, BACKBONE_TAG, 0)
            plan.add(
                Job(
                    "predict",
                    pk,
                    _predict_params(spec, organ, None, 0),
                    (keys.pretrain_key(organ),),
                    **where,
                )
            )
            plan.add(_evaluate_job(organ, None, 0, pk))
            evaluations.append(ek)

    for extra in spec.extra_predictions:
        organ = spec.organs[0]
        if extra.method == BACKBONE_TAG:
            head, tag, dep = None, BACKBONE_TAG, keys.pretrain_key(organ)
        else:
            variant = spec.default_variant(extra.method)
            head = spec.head(extra.method, noise=variant.noise)
            tag = run_tag(spec, organ, head, variant)
            dep = keys.finetune_key(organ, tag, extra.seed)
        if dep not in plan:
            raise ConfigurationError(
                f"The extra prediction with {tag} seed {extra.seed} needs a run the study "
                "does not make."
            )
        from mobseg.study.adapters import OutsidePrediction

        params = _predict_params(spec, organ, head, extra.seed, extra.input, extra.out, tag)
        key = extra_prediction_key(organ, extra, tag)
        runner = "mobseg.study.adapters:predict_outside"
        plan.add(Job("predict", key, OutsidePrediction(key, params), (dep,), runner=runner))

    if spec.report and evaluations:
        from mobseg.stages.report import ReportParams

        plan.add(
            Job(
                "report",
                keys.REPORT_KEY,
                ReportParams(),
                tuple(evaluations),
                gpus=0,
                after_any=True,
                refresh=True,
            )
        )
    return plan


#: Decoder dropout rate of the study's MC-dropout baseline (``finetune --mc-dropout``).
BASELINE_DROPOUT = 0.1


def add_baselines(spec: StudySpec, plan: Plan) -> list[str]:
    """Add the sampling-based baselines of ``--baselines`` to ``plan``; returns their evaluations.

    Per organ of the grid, every seed: the fine-tuned deterministic control
    (shared with the main grid when it has ``deterministic``), its MC-dropout
    variant (``finetune --mc-dropout``, rate :data:`BASELINE_DROPOUT`) with
    its T-pass prediction, the control's TTA mixture (``predict
    --tta-mixture``; not with the spec's TTA off), mob fine-tuned on the frozen backbone
    (``--freeze-backbone``); and, with two or more seeds, the deep ensemble
    of the control's seeds. Each is predicted and evaluated like a method.
    """
    from dataclasses import replace

    from mobseg.stages.ensemble import EnsembleParams
    from mobseg.stages.evaluate import EvaluateParams
    from mobseg.stages.finetune import run_tag as finetune_tag

    evaluations: list[str] = []
    control = spec.head("deterministic")
    for organ in spec.organs:
        variants = [
            (control, {}, False),
            (control, {"decoder_dropout": BASELINE_DROPOUT}, False),
            (spec.head("mob"), {"freeze_backbone": True}, False),
        ]
        if spec.tta:  # the TTA mixture needs the mirrored passes
            variants.append((control, {}, True))
        for head, options, mixture in variants:
            for seed in spec.seed_list:
                fp = replace(_finetune_params(spec, organ, head, seed), **options)
                tag = finetune_tag(fp, spec.preset)
                fk = keys.finetune_key(organ, tag, seed)
                plan.add(
                    Job(
                        "finetune",
                        fk,
                        fp,
                        deps=(keys.pretrain_key(organ),),
                        **_at(organ, tag, seed),
                    )
                )
                pp = replace(_predict_params(spec, organ, head, seed, tag=tag), tta_mixture=mixture)
                pk = keys.predict_key(organ, pp.tag, seed)
                plan.add(Job("predict", pk, pp, (fk,), **_at(organ, pp.tag, seed)))
                ep = EvaluateParams(organ=organ, seed=seed, run=pp.tag)
                ek = keys.evaluate_key(organ, pp.tag, seed)
                plan.add(Job("evaluate", ek, ep, (pk,), gpus=0, **_at(organ, pp.tag, seed)))
                evaluations.append(ek)
        if spec.seeds >= 2:
            ens = EnsembleParams(organ, member=run_tag(spec, organ, control), seeds=spec.seed_list)
            pk = keys.predict_key(organ, ens.tag, 0)
            members = tuple(keys.predict_key(organ, ens.member, seed) for seed in spec.seed_list)
            where = _at(organ, ens.tag, 0)
            runner = "mobseg.stages.ensemble:run"
            plan.add(Job("predict", pk, ens, members, runner=runner, gpus=0, **where))
            ek = keys.evaluate_key(organ, ens.tag, 0)
            ep = EvaluateParams(organ=organ, seed=0, run=ens.tag)
            plan.add(Job("evaluate", ek, ep, (pk,), gpus=0, **where))
            evaluations.append(ek)
    return evaluations


def _at(organ: str, tag: str, seed: int) -> dict[str, Any]:
    return {"organ": organ, "tag": tag, "seed": seed}


# -- the spec saved beside the manifest (read by `mobseg status`) ---------------------------
def spec_path(root: Path) -> Path:
    return Path(root) / "study" / "spec.json"


def save_spec(root: Path, spec: StudySpec) -> Path:
    """Write ``spec`` to ``<root>/study/spec.json`` (atomically) and return the path."""
    path = spec_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec.to_dict(), indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def load_spec(root: Path) -> StudySpec | None:
    """The spec of the last ``mobseg study`` / ``demo`` in ``root``, or None."""
    path = spec_path(root)
    if not path.exists():
        return None
    try:
        return StudySpec.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


_RUN_KEY = re.compile(r"^(finetune|predict|evaluate)/([^/]+)/([^/]+)/seed(\d+)$")


def plan_from_records(records: Mapping[str, StageRecord]) -> Plan:
    """A plan of what the manifest holds, for ``mobseg status`` without a saved spec.

    Only keys of the standard form are placed in the grid; jobs carry no params.
    """
    plan = Plan()
    for stage in STAGES:
        for key, rec in sorted(records.items()):
            if rec.stage != stage:
                continue
            m = _RUN_KEY.match(key)
            if m is not None:
                organ, tag, seed = m.group(2), m.group(3), int(m.group(4))
                plan.add(Job(stage, key, None, organ=organ, tag=tag, seed=seed))
            else:
                plan.add(Job(stage, key, None))
    return plan
