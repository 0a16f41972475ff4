"""``mobseg demo``: the built-in study that ``make demo`` runs on a laptop.

On the synthetic phantom (organ ``pancreas``) at the ``cpu`` preset:
prepare, pretrain the backbone, fine-tune all five methods (mob with M = 3
bases, the paper's configuration) for two seeds, and beside them
:data:`DEMO_BEST`, the configuration that learns the annotators' spread
best, with a deterministic control trained alike (:func:`control_of`);
predict and evaluate every run and the backbone itself, write the report,
and predict the real CT of ``../shared/data/totalseg_example`` with the mob
run of seed 0 when that folder exists. Everything is resumable: a rerun
continues where it stopped. :func:`comparison` gives the numbers the demo
prints at the end (the paper's mob, the best configuration, its control,
against the truth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mobseg.core.config import METHOD_NAMES
from mobseg.errors import InvalidInputError
from mobseg.study.grid import ExtraPrediction, RunVariant, StudySpec, run_tag

DEMO_ORGAN = "pancreas"
DEMO_SEEDS = 2
DEMO_CASES = 32
DEMO_SIZE = 64
DEMO_PRESET = "cpu"

#: The configuration the demo shows beside the paper's: the lead sets it from the truth
#: grid's finding (docs/study.md, "Against the truth"). The SSN objective on a random
#: annotator per case and step, at a learning rate where the heads leave their start.
#: The best configuration of the truth grid at the demo's schedule (docs/study.md,
#: "Finding": lowrank with the SSN objective on all annotators at lr 3e-3 beat the
#: control trained alike by 28 % on band NLL* and 29 % on GED^2; the same head trained
#: alone at lr 3e-2 did better still, see there).
DEMO_BEST = RunVariant("lowrank", mc_loss="logsumexp", annotators="all", lr=3e-3)


def control_of(variant: RunVariant) -> RunVariant:
    """The deterministic control trained alike: same annotators and learning rate."""
    return RunVariant("deterministic", annotators=variant.annotators, lr=variant.lr)


#: Where ``mobseg demo`` looks for the real example CT, relative to the current folder.
DEFAULT_EXAMPLE = Path("..") / "shared" / "data" / "totalseg_example"


def find_example_ct(path: Path) -> Path | None:
    """The CT to predict in ``path``.

    ``path`` may be a CT file (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``), a
    case folder holding ``ct.nii.gz``, or a dataset folder in
    TotalSegmentator layout (the first ``<case>/ct.nii.gz``). Returns None
    when ``path`` does not exist or holds no CT.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    if (path / "ct.nii.gz").is_file():
        return path / "ct.nii.gz"
    cases = sorted(p / "ct.nii.gz" for p in path.iterdir() if (p / "ct.nii.gz").is_file())
    return cases[0] if cases else None


def example_name(ct: Path) -> str:
    """Name of the example's output folder: the case folder (``s0000``) or the file stem."""
    if ct.name == "ct.nii.gz":
        return ct.parent.name
    name = ct.name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_example(example: Path | None) -> tuple[Path | None, str]:
    """The example CT to predict, and a sentence saying what the demo does with it.

    Args:
        example: ``--example``; None = :data:`DEFAULT_EXAMPLE`, skipped with a
            note when absent.

    Raises:
        InvalidInputError: an explicitly given ``--example`` holds no CT.
    """
    if example is None:
        ct = find_example_ct(DEFAULT_EXAMPLE)
        if ct is None:
            return None, (
                f"No real example CT at {DEFAULT_EXAMPLE} (relative to {Path.cwd()}); "
                "the demo skips the prediction on a real CT (give one with --example)."
            )
        return ct.resolve(), f"Real example CT: {ct.resolve()}"
    ct = find_example_ct(example)
    if ct is None:
        raise InvalidInputError(
            "No CT found here (expected a CT file, a folder with ct.nii.gz, or a "
            "TotalSegmentator-style folder of <case>/ct.nii.gz).",
            path=str(example),
            hint="Check --example.",
        )
    return ct.resolve(), f"Real example CT: {ct.resolve()}"


def demo_spec(
    root: Path,
    example_ct: Path | None,
    seeds: int = DEMO_SEEDS,
    num_cases: int = DEMO_CASES,
    size: int = DEMO_SIZE,
    preset: str = DEMO_PRESET,
    best: RunVariant | None = DEMO_BEST,
) -> StudySpec:
    """The demo's study: one organ, five methods x ``seeds``, the best configuration and its
    control x ``seeds``, backbone, report, example CT.

    Args:
        root: The workdir; the example's prediction goes to ``<root>/example/<name>``.
        example_ct: The real CT to predict with the mob run of seed 0, or None.
        seeds: Seeds per method.
        num_cases: Phantom cases.
        size: Phantom edge length in voxels.
        preset: Preset of pretraining and fine-tuning.
        best: The configuration shown beside the paper's (:data:`DEMO_BEST`);
            None = the paper's configurations only.
    """
    extras: tuple[ExtraPrediction, ...] = ()
    if example_ct is not None:
        out = Path(root) / "example" / example_name(example_ct)
        extras = (ExtraPrediction(input=example_ct, out=out, method="mob", seed=0),)
    return StudySpec(
        organs=(DEMO_ORGAN,),
        methods=METHOD_NAMES,
        seeds=seeds,
        ablation_bases=(),
        backbone=True,
        report=True,
        preset=preset,
        source="phantom",
        num_cases=num_cases,
        size=size,
        variants=() if best is None else (best, control_of(best)),
        extra_predictions=extras,
    )


#: (summary key, header) of the demo's closing comparison (all against the truth p*).
COMPARISON_COLUMNS: tuple[tuple[str, str], ...] = (
    ("pstar_nll_band", "band NLL*"),
    ("pstar_mae_band", "band |p - p*|"),
    ("ged2", "GED^2"),
    ("diversity_ratio", "diversity / annotators'"),
)


@dataclass(frozen=True)
class ComparisonRow:
    """One row of the demo's closing comparison.

    Attributes:
        label: What the row is.
        tag: Its run tag.
        values: Mean over the evaluated seeds per :data:`COMPARISON_COLUMNS` key (NaN = none).
        seeds: Number of evaluated seeds.
    """

    label: str
    tag: str
    values: dict[str, float]
    seeds: int


def comparison(root: Path, spec: StudySpec) -> list[ComparisonRow]:
    """The paper's mob, the demo's best configuration and its control, against the truth.

    Reads the evaluations in the workdir ``root`` (means over seeds; rows
    without an evaluation have NaN values and 0 seeds).
    """
    from mobseg.report.collect import collect, mean_std
    from mobseg.workspace import Workspace

    organ = spec.organs[0]
    rows = [("Paper's configuration (mob, mean objective, annotator 0)", RunVariant("mob"))]
    for v in spec.variants:
        what = "control" if v.method == "deterministic" else "best configuration"
        lr = spec.lr if v.lr is None else v.lr
        detail = f"{v.method}, {v.mc_loss}, annotators {v.annotators}, lr {lr:g}"
        if v.method == "deterministic":
            detail = f"deterministic, annotators {v.annotators}, lr {lr:g}"
        rows.append((f"Demo's {what} ({detail})", v))
    results = collect(Workspace(Path(root)))
    out = []
    for label, v in rows:
        tag = run_tag(spec, organ, spec.head(v.method, noise=v.noise), v)
        group = results.group(organ, tag)
        values = {}
        for key, _ in COMPARISON_COLUMNS:
            m, _, _ = mean_std([r.value(key) for r in group])
            values[key] = m if math.isfinite(m) else float("nan")
        out.append(ComparisonRow(label, tag, values, len(group)))
    return out
