"""Files of an evaluation: reading predictions and masks, writing the metrics CSV.

File contract (SPEC section 7). In a prediction folder, per case:
``<case>_prob.nii.gz`` (float foreground probability, required),
``<case>_var.nii.gz`` (Var[p], optional), ``<case>_entropy.nii.gz``
(predictive entropy in nats, optional; computed from p when absent),
``<case>_mi.nii.gz`` (mutual information in nats, optional) and,
optionally, model samples ``<case>_sample<k>.nii.gz`` (0/1 masks, used for
GED). References: ``<case>.nii.gz`` (0/1 mask) and, for GED in standalone
mode, further raters' masks ``<case>_ref<k>.nii.gz`` in the same folder and,
optionally, the true probability ``<case>_p_true.nii.gz`` (as the phantom
writes it) for the metrics against p*.

Every file of a case must have the ground truth's size, spacing, origin and
direction; probabilities must lie in [0, 1] without NaN, masks must hold only
0 and 1. Any violation raises :class:`mobseg.errors.InvalidInputError` naming
the case and the file.

Images are read one case at a time with :func:`mobseg.data.nifti.read_image`
(the whole gzip stream verified; NaN and infinite voxels found in the raw
bytes, because SimpleITK's reader turns them into 0) and compared with the ground
truth's grid by :func:`mobseg.data.nifti.check_same_geometry`. The arrays are
views of the SimpleITK buffers, so holding a case costs its files' sizes once.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from mobseg.errors import InvalidInputError
from mobseg.fsutil import atomic_write_bytes
from mobseg.metrics._common import PROB_TOL
from mobseg.metrics.case import ALL_COLUMNS, CaseResult, TestSetAccumulator, evaluate_case
from mobseg.metrics.failure import DEFAULT_BOUNDARY_WIDTH, DEFAULT_FAILURE_QUANTILE

PROB_SUFFIX = "_prob.nii.gz"
VAR_SUFFIX = "_var.nii.gz"
ENTROPY_SUFFIX = "_entropy.nii.gz"
MI_SUFFIX = "_mi.nii.gz"
NIFTI = ".nii.gz"
PTRUE_SUFFIX = "_p_true.nii.gz"
_SAMPLE_RE = r"_sample(\d+)\.nii\.gz$"
_REF_RE = r"_ref(\d+)\.nii\.gz$"


@dataclass
class Volume:
    """An image's voxels as a (z, y, x) numpy view, with its image.

    Attributes:
        array: The voxels (a view of ``image``'s buffer; keep the Volume alive).
        image: The SimpleITK image owning the buffer (its geometry is the grid).
        path: The file.
    """

    array: np.ndarray
    image: Any
    path: Path


def _read_image(path: Path, case: str) -> Volume:
    """Read and verify one NIfTI file (mobseg.data.nifti: complete gzip, finite values)."""
    import SimpleITK as sitk

    from mobseg.data.nifti import read_image

    if not path.is_file():
        raise InvalidInputError("File not found.", case=case, path=str(path))
    img = read_image(path, case)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidInputError(
            f"Expected one value per voxel, found {img.GetNumberOfComponentsPerPixel()} "
            "(multi-class probability maps are not supported; give the organ's probability).",
            case=case,
            path=str(path),
        )
    return Volume(sitk.GetArrayViewFromImage(img), img, path)


def _check_geometry(vol: Volume, reference: Volume, case: str, what: str) -> None:
    from mobseg.data.nifti import check_same_geometry

    check_same_geometry(reference.image, vol.image, case, vol.path, what=what)


def _check_probability_file(vol: Volume, case: str, what: str) -> None:
    a = vol.array
    if a.dtype.kind != "f":
        raise InvalidInputError(
            f"The {what} must be stored as floating point, found {a.dtype}.",
            case=case,
            path=str(vol.path),
        )
    lo, hi = float(a.min()), float(a.max())
    if lo < -PROB_TOL or hi > 1 + PROB_TOL:
        raise InvalidInputError(
            f"The {what} must lie in [0, 1], found values in [{lo:.6g}, {hi:.6g}].",
            case=case,
            path=str(vol.path),
        )


def _check_mask_file(vol: Volume, case: str, what: str) -> None:
    a = vol.array
    lo, hi = a.min(), a.max()
    bad = not (lo >= 0 and hi <= 1)
    if not bad and a.dtype.kind == "f":
        bad = not bool(np.all((a == 0) | (a == 1)))
    if bad:
        raise InvalidInputError(
            f"The {what} must hold only 0 and 1, found values in [{lo}, {hi}].",
            case=case,
            path=str(vol.path),
            hint="Give one binary mask per case (organ = 1).",
        )


def _check_score_file(vol: Volume, case: str, what: str) -> None:
    lo = float(vol.array.min())
    if lo < -1e-6:
        raise InvalidInputError(
            f"The {what} must be >= 0, found {lo:.6g}.", case=case, path=str(vol.path)
        )


@dataclass
class CaseFiles:
    """The files of one case.

    Attributes:
        case: Case id.
        prob: ``<case>_prob.nii.gz``.
        gt: The reference mask ``<case>.nii.gz``.
        var: ``<case>_var.nii.gz`` or None.
        entropy: ``<case>_entropy.nii.gz`` or None.
        mi: ``<case>_mi.nii.gz`` or None.
        samples: Model samples (masks) for GED.
        references: Reference masks for GED (used when >= 2).
        true_prob: The phantom's p* or None.
    """

    case: str
    prob: Path
    gt: Path
    var: Path | None = None
    entropy: Path | None = None
    mi: Path | None = None
    samples: list[Path] = field(default_factory=list)
    references: list[Path] = field(default_factory=list)
    true_prob: Path | None = None


def _numbered(folder: Path, case: str, pattern: str) -> list[Path]:
    rx = re.compile("^" + re.escape(case) + pattern)
    found = []
    for p in folder.glob(f"{glob_escape(case)}_*.nii.gz"):
        m = rx.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def glob_escape(text: str) -> str:
    """Escape glob metacharacters of a case id."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def prediction_files(pred_dir: Path, case: str, gt: Path) -> CaseFiles:
    """The prediction files of ``case`` in ``pred_dir`` (optional ones when present).

    Raises:
        InvalidInputError: ``<case>_prob.nii.gz`` is missing.
    """
    prob = pred_dir / f"{case}{PROB_SUFFIX}"
    if not prob.is_file():
        raise InvalidInputError(
            f"No prediction {prob.name} for this case.",
            case=case,
            path=str(pred_dir),
            hint="Predict every test case (or rerun predict with --force).",
        )
    var = pred_dir / f"{case}{VAR_SUFFIX}"
    ent = pred_dir / f"{case}{ENTROPY_SUFFIX}"
    mi = pred_dir / f"{case}{MI_SUFFIX}"
    return CaseFiles(
        case=case,
        prob=prob,
        gt=gt,
        var=var if var.is_file() else None,
        entropy=ent if ent.is_file() else None,
        mi=mi if mi.is_file() else None,
        samples=_numbered(pred_dir, case, _SAMPLE_RE),
    )


def standalone_cases(pred_dir: Path, gt_dir: Path) -> list[CaseFiles]:
    """The cases of ``pred_dir`` (every ``<case>_prob.nii.gz``), matched to ``gt_dir``.

    Extra reference masks ``<case>_ref<k>.nii.gz`` in ``gt_dir`` join
    ``<case>.nii.gz`` as the references of GED; ``<case>_p_true.nii.gz`` there
    is the true probability p* (phantom).

    Every ground truth needs a prediction too: a ``<case>.nii.gz`` in
    ``gt_dir`` without ``<case>_prob.nii.gz`` in ``pred_dir`` is an error
    (scores over a silent subset of the test set would look complete).

    Raises:
        InvalidInputError: a folder is missing, holds no predictions, a case
            has no ground truth (the message names the case), or ground-truth
            cases have no prediction (the message counts and names them).
    """
    for folder, what in ((pred_dir, "--pred"), (gt_dir, "--gt")):
        if not folder.is_dir():
            raise InvalidInputError(f"The {what} folder does not exist.", path=str(folder))
    cases = sorted(p.name[: -len(PROB_SUFFIX)] for p in pred_dir.glob(f"*{PROB_SUFFIX}"))
    if not cases:
        raise InvalidInputError(
            f"No <case>{PROB_SUFFIX} files in the --pred folder.",
            path=str(pred_dir),
            hint="Give the folder written by `mobseg predict` (SPEC section 7).",
        )
    ref = re.compile(_REF_RE)
    truths = {
        p.name[: -len(NIFTI)]
        for p in gt_dir.glob(f"*{NIFTI}")
        if not ref.search(p.name) and not p.name.endswith(PTRUE_SUFFIX)  # a case's companions
    }
    unpredicted = sorted(truths - set(cases))
    if unpredicted:
        shown = ", ".join(unpredicted[:5]) + (", ..." if len(unpredicted) > 5 else "")
        raise InvalidInputError(
            f"{len(unpredicted)} of {len(truths)} ground-truth cases have no prediction "
            f"(<case>{PROB_SUFFIX}) in {pred_dir}: {shown}.",
            path=str(gt_dir),
            hint="Predict them, or give a --gt folder holding only the cases to score.",
        )
    out = []
    for case in cases:
        gt = gt_dir / f"{case}{NIFTI}"
        if not gt.is_file():
            raise InvalidInputError(
                f"No ground truth {gt.name} for this case.", case=case, path=str(gt_dir)
            )
        files = prediction_files(pred_dir, case, gt)
        refs = _numbered(gt_dir, case, _REF_RE)
        files.references = [gt, *refs] if refs else []
        pstar = gt_dir / f"{case}{PTRUE_SUFFIX}"
        files.true_prob = pstar if pstar.is_file() else None
        out.append(files)
    return out


def evaluate_files(
    files: CaseFiles,
    margin: int = 10,
    chunk: int | None = None,
    boundary_width: int = DEFAULT_BOUNDARY_WIDTH,
) -> CaseResult:
    """Read, check and evaluate one case (see :func:`mobseg.metrics.case.evaluate_case`).

    Args:
        files: The case's files.
        margin: ROI margin in voxels.
        chunk: Voxels per chunk (None = the default).
        boundary_width: Width in voxels of S's boundary band (case scores).

    Raises:
        InvalidInputError: a file is missing or unreadable, its geometry differs
            from the ground truth's, p is outside [0, 1] or NaN, a mask is not
            0/1, an uncertainty map is negative or NaN.
    """
    case = files.case
    gt = _read_image(files.gt, case)
    _check_mask_file(gt, case, "ground-truth mask")

    def read(path: Path | None, kind: str, what: str) -> Volume | None:
        if path is None:
            return None
        vol = _read_image(path, case)
        _check_geometry(vol, gt, case, what)
        {"prob": _check_probability_file, "mask": _check_mask_file, "score": _check_score_file}[
            kind
        ](vol, case, what)
        return vol

    prob = cast(Volume, read(files.prob, "prob", "probability"))
    var = read(files.var, "score", "variance")
    ent = read(files.entropy, "score", "entropy")
    mi = read(files.mi, "score", "mutual information")
    pstar = read(files.true_prob, "prob", "true probability p*")
    refs = [read(p, "mask", "reference mask") for p in files.references]
    samples = [read(p, "mask", "sample mask") for p in files.samples]
    kwargs: dict[str, Any] = {} if chunk is None else {"chunk": chunk}
    try:
        return evaluate_case(
            prob.array,
            gt.array,
            case=case,
            variance=None if var is None else var.array,
            entropy=None if ent is None else ent.array,
            mutual_information=None if mi is None else mi.array,
            references=[r.array for r in refs if r is not None],
            samples=[s.array for s in samples if s is not None] or None,
            true_prob=None if pstar is None else pstar.array,
            margin=margin,
            boundary_width=boundary_width,
            **kwargs,
        )
    except ValueError as exc:  # every array was checked above; keep the case in the message
        raise InvalidInputError(str(exc), case=case, path=str(files.prob)) from exc


def threshold_histogram(files: CaseFiles, size: int | None = None) -> Any:
    """Read a case's probability and mask into a conformal threshold histogram.

    Args:
        files: The case (only ``prob`` and ``gt`` are read).
        size: K of the threshold grid (None = the default).

    Returns:
        A :class:`mobseg.metrics.conformal.ThresholdHistogram`.

    Raises:
        InvalidInputError: as :func:`evaluate_files`.
    """
    from mobseg.metrics.conformal import DEFAULT_GRID, ThresholdHistogram

    case = files.case
    gt = _read_image(files.gt, case)
    _check_mask_file(gt, case, "ground-truth mask")
    prob = _read_image(files.prob, case)
    _check_geometry(prob, gt, case, "probability")
    _check_probability_file(prob, case, "probability")
    return ThresholdHistogram(size or DEFAULT_GRID).add(prob.array, gt.array > 0)


def evaluate_many(
    cases: Sequence[CaseFiles],
    margin: int = 10,
    on_case: Callable[[str], None] | None = None,
    boundary_width: int = DEFAULT_BOUNDARY_WIDTH,
    failure_quantile: float = DEFAULT_FAILURE_QUANTILE,
) -> TestSetAccumulator:
    """Evaluate cases one at a time and pool them.

    Args:
        cases: The cases' files.
        margin: ROI margin in voxels.
        on_case: Called with each case id after it is done (progress).
        boundary_width: Width in voxels of S's boundary band (case scores).
        failure_quantile: Dice quantile below which a case has failed.

    Returns:
        The :class:`TestSetAccumulator` (rows and pooled sums).
    """
    acc = TestSetAccumulator(failure_quantile=failure_quantile)
    for files in cases:
        acc.add(evaluate_files(files, margin, boundary_width=boundary_width))
        if on_case is not None:
            on_case(files.case)
    return acc


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    return "nan" if math.isnan(v) else f"{v:.10g}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a checked, fsynced temporary file and rename.

    Raises:
        StorageError: the file cannot be written in full (disk full, read-only
            folder, a file where a folder should be).
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def write_metrics_csv(path: Path, rows: Iterable[dict[str, Any]], pooled: dict[str, Any]) -> None:
    """Write one row per case and the ``ALL`` row (columns :data:`ALL_COLUMNS`).

    NaN is written as ``nan``; pooled-only columns are ``nan`` in case rows.
    """
    import io as _io

    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ALL_COLUMNS)
    for row in [*rows, pooled]:
        writer.writerow([_format(row.get(c, float("nan"))) for c in ALL_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def read_metrics_csv(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Read a metrics CSV: (case rows, ``ALL`` row or None); numbers as float."""
    rows: list[dict[str, Any]] = []
    pooled = None
    with open(path, encoding="utf-8", newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k == "case":
                    row[k] = v
                else:
                    try:
                        row[k] = float(v) if v not in ("", None) else float("nan")
                    except ValueError:
                        row[k] = v
            if row.get("case") == "ALL":
                pooled = row
            else:
                rows.append(row)
    return rows, pooled
