"""``mobseg demo``: the built-in study that ``make demo`` runs on a laptop.

On the synthetic phantom (organ ``pancreas``) at the ``cpu`` preset:
prepare, pretrain the backbone, fine-tune all five methods (mob with M = 3
bases) for two seeds, predict and evaluate every run and the backbone
itself, write the report, and predict the real CT of
``../shared/data/totalseg_example`` with the mob run of seed 0 when that
folder exists. Everything is resumable: a rerun continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from mobseg.core.config import METHOD_NAMES
from mobseg.errors import InvalidInputError
from mobseg.study.grid import ExtraPrediction, StudySpec

DEMO_ORGAN = "pancreas"
DEMO_SEEDS = 2
DEMO_CASES = 32
DEMO_SIZE = 64
DEMO_PRESET = "cpu"

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
) -> StudySpec:
    """The demo's study: one organ, five methods x ``seeds``, backbone, report, example CT.

    Args:
        root: The workdir; the example's prediction goes to ``<root>/example/<name>``.
        example_ct: The real CT to predict with the mob run of seed 0, or None.
        seeds: Seeds per method.
        num_cases: Phantom cases.
        size: Phantom edge length in voxels.
        preset: Preset of pretraining and fine-tuning.
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
        extra_predictions=extras,
    )
