"""All metrics of one test case in one streamed pass, and their pooling over a test set.

:func:`evaluate_case` walks the arrays of a case once, in slabs of rows along
the first axis, and feeds every accumulator of :mod:`mobseg.metrics`;
:class:`TestSetAccumulator` adds the cases' bins, histograms and sums into
the pooled ``ALL`` numbers. Peak memory is the input arrays plus a few
chunk-sized temporaries.

Definitions (SPEC section 6): S = ``p > 0.5`` (argmax of the mean
probability), G = the reference mask, errors = S != G.

Three regions. *Whole volume*: every voxel. *ROI*: the bounding box of G or
S, dilated by ``margin`` voxels and clipped to the volume (empty when G and S
are; its metrics are then NaN); whole-volume NLL and ECE are dominated by
easy background, the ROI variant is not. *Band* (phantom only): the voxels
with 0.01 < p* < 0.99 (:func:`mobseg.metrics.phantom.ambiguity_band`), where
the true label is uncertain. The ROI's box is found during the pass over the
whole volume; then only the ROI's voxels of p and G are read once more (no
second read of the volume, no copy of it).

Per case row (``CASE_COLUMNS``):

- ``dice`` (NaN when S and G are both empty), ``nll``, ``brier``, ``ece``,
  ``mce`` (15 bins), ``n_voxels`` (voxels evaluated), ``n_true`` = |G|,
  ``n_pred`` = |S|;
- ``nll_roi``, ``brier_roi``, ``ece_roi``, ``mce_roi``, ``n_voxels_roi``:
  the same scores in the ROI;
- ``auroc_var``/``auprc_var``, ``auroc_entropy``/``auprc_entropy``: error
  detection with Var[p] or the predictive entropy (computed from p when no
  entropy map is given; for two classes H(E[p]) is a function of p);
- ``mean_var_pred``, ``mean_entropy_pred``: mean uncertainty over S (over the
  evaluated voxels when S is empty); minus these is the case's confidence for
  the risk-coverage curves;
- ``ged2``, ``diversity``, ``reference_diversity``, ``diversity_ratio``
  (diversity / reference diversity), ``n_samples``, ``n_references``: only
  with >= 2 reference masks (samples default to S);
- only with the true probability p*, for the whole volume and with the
  suffix ``_band`` for the band (``n_voxels_band`` voxels):
  ``pstar_mae``, ``pstar_rmse`` (|p - p*|), ``pstar_nll``, ``pstar_brier``
  (expected under t ~ Bernoulli(p*), :mod:`mobseg.metrics.expected`),
  ``pstar_var_corr``, ``pstar_var_ratio`` (Var[p] against p*(1 - p*),
  :mod:`mobseg.metrics.variance_match`; with a variance map only).

The ``ALL`` row: ``dice`` is the mean over cases with a defined Dice (the
paper's statistic; ``n_nan_dice`` counts the others) and ``dice_std`` its
sample standard deviation; ``nll``, ``brier``, ``pstar_*`` (both regions) are
over every voxel of the test set (the correlation of all voxels pooled);
``ece``/``mce`` come from the summed bins (likewise in the ROI);
AUROC/AUPRC from the summed histograms; ``aurc_*``/``eaurc_*`` from the
per-case risks 1 - Dice and confidences; ``ged2`` and the diversities are
means over the cases that have them, and ``diversity_ratio`` is the ratio of
those two means.

Overlap measures (Dice, GED) do not depend on the background and are
computed on the whole volume only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mobseg.metrics._common import (
    CHUNK_VOXELS,
    as_bool_mask,
    check_finite_nonnegative,
    check_probability,
    check_same_shape,
    flat_chunks,
    nan_if_zero,
)
from mobseg.metrics.calibration import DEFAULT_BINS, CalibrationAccumulator
from mobseg.metrics.dice import DiceAccumulator
from mobseg.metrics.expected import ExpectedScoreAccumulator
from mobseg.metrics.failure import (
    DEFAULT_BOUNDARY_WIDTH,
    DEFAULT_FAILURE_QUANTILE,
    FAILURE_COLUMNS,
    boundary_band,
    failure_detection,
    volume_cv,
)
from mobseg.metrics.ged import OverlapAccumulator, diversity_ratio, ged_from_distances
from mobseg.metrics.phantom import BAND_HIGH, BAND_LOW, ProbabilityErrorAccumulator
from mobseg.metrics.probabilistic import ProbabilisticAccumulator, binary_entropy
from mobseg.metrics.uncertainty import (
    DEFAULT_SHIFT,
    ErrorDetectionAccumulator,
    aurc,
    excess_aurc,
    score_codes,
)
from mobseg.metrics.variance_match import VarianceMatchAccumulator

#: Suffix of the columns of the region of interest.
ROI = "_roi"
#: Suffix of the columns of the ambiguity band (phantom).
BAND = "_band"

#: Scores computed per region (whole volume and ROI).
REGION_SCORES: tuple[str, ...] = ("nll", "brier", "ece", "mce", "n_voxels")

#: Metrics against the true probability p*, per region (whole volume and band).
TRUTH_SCORES: tuple[str, ...] = (
    "pstar_mae",
    "pstar_rmse",
    "pstar_nll",
    "pstar_brier",
    "pstar_var_corr",
    "pstar_var_ratio",
)

CASE_COLUMNS: tuple[str, ...] = (
    "case",
    "dice",
    *REGION_SCORES,
    *(f"{c}{ROI}" for c in REGION_SCORES),
    "n_true",
    "n_pred",
    "fnr",
    "auroc_var",
    "auprc_var",
    "auroc_entropy",
    "auprc_entropy",
    "mean_var_pred",
    "mean_entropy_pred",
    "mean_mi_pred",
    "mean_var_boundary",
    "mean_entropy_boundary",
    "mean_mi_boundary",
    "n_voxels_boundary",
    "volume_cv",
    "ged2",
    "diversity",
    "reference_diversity",
    "diversity_ratio",
    "n_samples",
    "n_references",
    *TRUTH_SCORES,
    *(f"{c}{BAND}" for c in TRUTH_SCORES),
    f"n_voxels{BAND}",
)

#: Columns filled only in the pooled ``ALL`` row.
POOLED_COLUMNS: tuple[str, ...] = (
    "n_cases",
    "n_nan_dice",
    "dice_std",
    "aurc_var",
    "eaurc_var",
    "aurc_entropy",
    "eaurc_entropy",
    *FAILURE_COLUMNS,
)

ALL_COLUMNS: tuple[str, ...] = CASE_COLUMNS + POOLED_COLUMNS

NAN = float("nan")


def _widen_box(lo: list[float], hi: list[float], mask: np.ndarray, offset: int) -> None:
    """Widen the box [lo, hi] (inclusive, per axis) to the True voxels of a slab."""
    if not mask.any():
        return
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other) if other else mask)
        off = offset if ax == 0 else 0
        lo[ax] = min(lo[ax], int(idx[0]) + off)
        hi[ax] = max(hi[ax], int(idx[-1]) + off)


def _box_slices(
    lo: list[float], hi: list[float], shape: tuple[int, ...], margin: int
) -> tuple[slice, ...] | None:
    """The box dilated by ``margin`` and clipped to ``shape`` (None when empty)."""
    if not shape or lo[0] == math.inf:
        return None
    return tuple(
        slice(max(0, int(lo[a]) - margin), min(shape[a], int(hi[a]) + margin + 1))
        for a in range(len(shape))
    )


def roi_slices(
    prob: np.ndarray, target: np.ndarray, margin: int, chunk: int = CHUNK_VOXELS
) -> tuple[slice, ...] | None:
    """Bounding box of (p > 0.5) or G, dilated by ``margin`` voxels, clipped.

    Args:
        prob: Foreground probability, shape (N1, ..., Nd).
        target: 0/1 mask, same shape.
        margin: Voxels added on every side.
        chunk: Voxels per slab.

    Returns:
        One slice per axis, or None when both masks are empty.
    """
    check_same_shape(prob=prob, target=target)
    if prob.ndim == 0:
        return None
    lo = [math.inf] * prob.ndim
    hi = [-math.inf] * prob.ndim
    for start, stop in _slab_bounds(prob.shape, chunk):
        m = (prob[start:stop] > 0.5) | as_bool_mask(np.asarray(target[start:stop]), "target")
        _widen_box(lo, hi, m, start)
    return _box_slices(lo, hi, prob.shape, margin)


def _slab_bounds(shape: tuple[int, ...], chunk: int) -> list[tuple[int, int]]:
    """Row ranges along axis 0 of at most ``chunk`` voxels each (at least one row)."""
    per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    rows = max(1, chunk // max(per_row, 1))
    return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]


@dataclass
class RegionScores:
    """Calibration bins and proper scores of one region (whole volume or ROI).

    Args:
        n_bins: Calibration bins.
    """

    n_bins: int = DEFAULT_BINS
    calibration: CalibrationAccumulator = field(init=False)
    probabilistic: ProbabilisticAccumulator = field(default_factory=ProbabilisticAccumulator)

    def __post_init__(self) -> None:
        self.calibration = CalibrationAccumulator(self.n_bins)

    def add(self, p: np.ndarray, t: np.ndarray) -> None:
        """Add one validated flat chunk (p float, t bool)."""
        self.calibration._add(p, t)
        self.probabilistic._add(p, t)

    def merge(self, other: RegionScores) -> RegionScores:
        """Pool the voxels of ``other``; returns self."""
        self.calibration.merge(other.calibration)
        self.probabilistic.merge(other.probabilistic)
        return self

    def columns(self, suffix: str = "") -> dict[str, Any]:
        """``nll``, ``brier``, ``ece``, ``mce``, ``n_voxels``, each with ``suffix``."""
        values = (
            self.probabilistic.nll(),
            self.probabilistic.brier(),
            self.calibration.ece(),
            self.calibration.mce(),
            self.probabilistic.n,
        )
        return {f"{c}{suffix}": v for c, v in zip(REGION_SCORES, values, strict=True)}


@dataclass
class TruthScores:
    """Metrics of p and Var[p] against the true probability p* in one region.

    Attributes:
        error: |p - p*| sums (MAE, RMSE).
        expected: NLL and Brier expected under t ~ Bernoulli(p*).
        variance: Var[p] against p*(1 - p*) (fed only with a variance map).
        has_variance: whether a variance map was seen.
    """

    error: ProbabilityErrorAccumulator = field(default_factory=ProbabilityErrorAccumulator)
    expected: ExpectedScoreAccumulator = field(default_factory=ExpectedScoreAccumulator)
    variance: VarianceMatchAccumulator = field(default_factory=VarianceMatchAccumulator)
    has_variance: bool = False

    def add(self, p: np.ndarray, q: np.ndarray, v: np.ndarray | None) -> None:
        """Add one validated flat chunk (p, p* and optionally Var[p])."""
        self.error._add(p, q)
        self.expected._add(p, q)
        if v is not None:
            self.variance._add(v, q)
            self.has_variance = True

    def merge(self, other: TruthScores) -> TruthScores:
        """Pool the voxels of ``other``; returns self."""
        self.error.merge(other.error)
        self.expected.merge(other.expected)
        self.variance.merge(other.variance)
        self.has_variance = self.has_variance or other.has_variance
        return self

    def columns(self, suffix: str = "") -> dict[str, Any]:
        """The :data:`TRUTH_SCORES` of this region, each with ``suffix``."""
        var = self.has_variance
        values = (
            self.error.mae(),
            self.error.rmse(),
            self.expected.nll(),
            self.expected.brier(),
            self.variance.correlation() if var else NAN,
            self.variance.ratio() if var else NAN,
        )
        return {f"{c}{suffix}": v for c, v in zip(TRUTH_SCORES, values, strict=True)}


@dataclass
class CaseResult:
    """Metrics of one case, plus the accumulators that pool into the test set.

    Attributes:
        row: The case's CSV row (keys of :data:`CASE_COLUMNS`).
        whole: Calibration and scores of the whole volume.
        roi_scores: The same in the region of interest.
        error_var, error_entropy: error-detection histograms (whole volume;
            ``error_var`` None without a variance map).
        truth, truth_band: metrics against p*, whole volume and band (None
            without p*).
        roi: the ROI's slices (None when G and S are empty).
    """

    row: dict[str, Any]
    whole: RegionScores
    roi_scores: RegionScores
    error_var: ErrorDetectionAccumulator | None
    error_entropy: ErrorDetectionAccumulator
    truth: TruthScores | None = None
    truth_band: TruthScores | None = None
    roi: tuple[slice, ...] | None = None

    @property
    def calibration(self) -> CalibrationAccumulator:
        """Whole-volume calibration bins."""
        return self.whole.calibration

    @property
    def probabilistic(self) -> ProbabilisticAccumulator:
        """Whole-volume NLL and Brier sums."""
        return self.whole.probabilistic


def _ged(
    prob: np.ndarray,
    samples: Sequence[np.ndarray] | None,
    references: Sequence[np.ndarray],
    chunk: int,
) -> OverlapAccumulator:
    masks: list[np.ndarray] = list(samples) if samples else []
    n = len(masks) + len(references)
    acc = OverlapAccumulator(n + (0 if samples else 1))
    arrays = [prob, *masks, *references] if not samples else [*masks, *references]
    for part in flat_chunks(*arrays, chunk=chunk):
        if samples:
            b = [as_bool_mask(c, "mask") for c in part]
        else:
            b = [part[0] > 0.5] + [as_bool_mask(c, "reference mask") for c in part[1:]]
        acc._add(b)
    return acc


def evaluate_case(
    prob: np.ndarray,
    target: np.ndarray,
    *,
    case: str = "",
    variance: np.ndarray | None = None,
    entropy: np.ndarray | None = None,
    mutual_information: np.ndarray | None = None,
    references: Sequence[np.ndarray] = (),
    samples: Sequence[np.ndarray] | None = None,
    true_prob: np.ndarray | None = None,
    margin: int = 10,
    n_bins: int = DEFAULT_BINS,
    shift: int = DEFAULT_SHIFT,
    chunk: int = CHUNK_VOXELS,
    boundary_width: int = DEFAULT_BOUNDARY_WIDTH,
) -> CaseResult:
    """Every metric of one case, whole volume and ROI, in one streamed pass.

    Args:
        prob: Foreground probability p, shape (N1, ..., Nd), float, in [0, 1].
        target: Reference mask G (0/1), same shape.
        case: Case id for the row.
        variance: Var[p] per voxel (>= 0), same shape, or None.
        entropy: Predictive entropy per voxel (nats), or None to compute it from p.
        mutual_information: MI per voxel (nats, >= 0), or None.
        references: Reference masks for GED (used when there are >= 2).
        samples: Model samples (masks) for GED; None = the single S.
        true_prob: The true foreground probability p* (phantom), or None.
        margin: ROI margin in voxels.
        n_bins: Calibration bins.
        shift: Error-detection histogram resolution (see mobseg.metrics.uncertainty).
        chunk: Voxels per chunk.
        boundary_width: Width in voxels of the boundary band of S for the
            case scores ``mean_*_boundary`` (:mod:`mobseg.metrics.failure`).

    Returns:
        The :class:`CaseResult`.

    Raises:
        ValueError: shapes differ, p outside [0, 1] or NaN, masks not 0/1,
            negative or NaN uncertainty, negative margin; the message names
            the array.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    if boundary_width < 1:
        raise ValueError(f"boundary_width must be >= 1, got {boundary_width}.")
    prob = np.asarray(prob)
    target = np.asarray(target)
    named = {"prob": prob, "target": target}
    for name, arr in (
        ("variance", variance),
        ("entropy", entropy),
        ("mutual_information", mutual_information),
        ("true_prob", true_prob),
    ):
        if arr is not None:
            named[name] = np.asarray(arr)
    for i, r in enumerate(references):
        named[f"reference{i}"] = np.asarray(r)
    for i, s in enumerate(samples or ()):
        named[f"sample{i}"] = np.asarray(s)
    check_same_shape(**named)
    keys = ("prob", "target", "variance", "entropy", "true_prob", "mutual_information")
    arrays = [named.get(k) for k in keys]
    if prob.ndim == 0:
        arrays = [None if a is None else a.reshape(1) for a in arrays]

    dice = DiceAccumulator()
    whole = RegionScores(n_bins)
    in_roi = RegionScores(n_bins)
    err_var = ErrorDetectionAccumulator(shift) if variance is not None else None
    err_ent = ErrorDetectionAccumulator(shift)
    truth = TruthScores() if true_prob is not None else None
    band = TruthScores() if true_prob is not None else None
    sums = dict.fromkeys(("var", "ent", "mi"), 0.0)
    sums.update({f"{k}_all": 0.0 for k in ("var", "ent", "mi")})

    shape = arrays[0].shape  # type: ignore[union-attr]
    lo = [math.inf] * len(shape)
    hi = [-math.inf] * len(shape)
    lo_s = [math.inf] * len(shape)  # the box of S alone (boundary band)
    hi_s = [-math.inf] * len(shape)
    for start, stop in _slab_bounds(shape, chunk):
        p, t, v, h, q, mi = (None if a is None else a[start:stop].reshape(-1) for a in arrays)
        check_probability(p, "probability")
        t = as_bool_mask(t, "ground-truth mask")
        s = p > 0.5
        _widen_box(lo, hi, (s | t).reshape((stop - start, *shape[1:])), start)
        _widen_box(lo_s, hi_s, s.reshape((stop - start, *shape[1:])), start)
        dice.intersection += int(np.count_nonzero(s & t))
        dice.n_pred += int(np.count_nonzero(s))
        dice.n_true += int(np.count_nonzero(t))
        whole.add(p, t)
        err = s ^ t
        if v is not None and err_var is not None:
            check_finite_nonnegative(v, "variance")
            err_var._add_codes(score_codes(v, shift), err)
            sums["var"] += float(np.sum(v, where=s, dtype=np.float64))
            sums["var_all"] += float(np.sum(v, dtype=np.float64))
        if mi is not None:
            check_finite_nonnegative(mi, "mutual information")
            sums["mi"] += float(np.sum(mi, where=s, dtype=np.float64))
            sums["mi_all"] += float(np.sum(mi, dtype=np.float64))
        if h is None:
            h = binary_entropy(p)
        else:
            check_finite_nonnegative(h, "entropy")
        err_ent._add_codes(score_codes(h, shift), err)
        sums["ent"] += float(np.sum(h, where=s, dtype=np.float64))
        sums["ent_all"] += float(np.sum(h, dtype=np.float64))
        if truth is not None and band is not None and q is not None:
            check_probability(q, "true probability p*")
            truth.add(p, q, v)
            sel = (q > BAND_LOW) & (q < BAND_HIGH)
            band.add(p[sel], q[sel], None if v is None else v[sel])

    # The ROI: its voxels were validated above; read them once more (a view per slab).
    roi = _box_slices(lo, hi, shape, margin)
    if roi is not None:
        for p, t in flat_chunks(arrays[0][roi], arrays[1][roi], chunk=chunk):  # type: ignore[index]
            in_roi.add(p, as_bool_mask(t, "ground-truth mask"))

    n_vox = whole.probabilistic.n
    n_pred = dice.n_pred

    def mean_over_pred(pred_sum: float, all_sum: float) -> float:
        return nan_if_zero(pred_sum, n_pred) if n_pred else nan_if_zero(all_sum, n_vox)

    boundary = _boundary_means(arrays, lo_s, hi_s, shape, boundary_width, sums, n_vox)

    row: dict[str, Any] = {c: NAN for c in CASE_COLUMNS}
    row.update(
        case=case,
        dice=dice.compute(),
        **whole.columns(),
        **in_roi.columns(ROI),
        n_true=dice.n_true,
        n_pred=n_pred,
        fnr=1.0 - nan_if_zero(dice.intersection, dice.n_true),
        auroc_entropy=err_ent.auroc(),
        auprc_entropy=err_ent.auprc(),
        mean_entropy_pred=mean_over_pred(sums["ent"], sums["ent_all"]),
        n_samples=0,
        n_references=len(references),
        **boundary,
    )
    if err_var is not None:
        row.update(
            auroc_var=err_var.auroc(),
            auprc_var=err_var.auprc(),
            mean_var_pred=mean_over_pred(sums["var"], sums["var_all"]),
        )
    if mutual_information is not None:
        row["mean_mi_pred"] = mean_over_pred(sums["mi"], sums["mi_all"])
    if samples is not None and len(samples) >= 2:
        row["volume_cv"] = volume_cv([int(np.count_nonzero(np.asarray(m) > 0)) for m in samples])
    if truth is not None and band is not None:
        row.update(truth.columns(), **band.columns(BAND))
        row[f"n_voxels{BAND}"] = band.error.n
    if len(references) >= 2:
        acc = _ged(prob, samples, references, chunk)
        n_s = len(samples) if samples else 1
        g = ged_from_distances(acc.distance(), n_s)
        row.update(
            ged2=g.ged2,
            diversity=g.diversity,
            reference_diversity=g.reference_diversity,
            diversity_ratio=diversity_ratio(g.diversity, g.reference_diversity),
            n_samples=n_s,
        )
    return CaseResult(row, whole, in_roi, err_var, err_ent, truth, band, roi)


def _boundary_means(
    arrays: list[np.ndarray | None],
    lo_s: list[float],
    hi_s: list[float],
    shape: tuple[int, ...],
    width: int,
    sums: dict[str, float],
    n_vox: int,
) -> dict[str, Any]:
    """``mean_*_boundary`` and ``n_voxels_boundary`` of the band of S (see the module doc).

    Only S's box, dilated by ``width + 1`` voxels, is read again: the band lies
    inside it, and its outer layers hold no S voxel, so the band computed in
    the box equals the band computed in the whole volume. With S empty the
    means are those of the whole volume (``sums``), like ``mean_*_pred``.
    """
    prob, _t, var, ent, _q, mi = arrays
    out: dict[str, Any] = {"n_voxels_boundary": 0}
    box = _box_slices(lo_s, hi_s, shape, width + 1)
    maps = {"var": var, "entropy": ent, "mi": mi}
    if box is None:
        for name, key in (("var", "var"), ("entropy", "ent"), ("mi", "mi")):
            if maps[name] is not None or name == "entropy":
                out[f"mean_{name}_boundary"] = nan_if_zero(sums[f"{key}_all"], n_vox)
        return out
    p = np.asarray(prob[box])  # type: ignore[index]
    band = boundary_band(p > 0.5, width)
    n = int(np.count_nonzero(band))
    out["n_voxels_boundary"] = n
    for name, arr in maps.items():
        if arr is None and name == "entropy":
            values = binary_entropy(p[band])
        elif arr is None:
            continue
        else:
            values = np.asarray(arr[box])[band]
        out[f"mean_{name}_boundary"] = nan_if_zero(float(np.sum(values, dtype=np.float64)), n)
    return out


@dataclass
class TestSetAccumulator:
    """Pools the cases of one test set (one run) into the ``ALL`` row.

    Args:
        n_bins: Calibration bins.
        shift: Error-detection histogram resolution.
        failure_quantile: Dice quantile below which a case has failed (the
            ``fail_*`` columns, :func:`mobseg.metrics.failure.failure_detection`).

    Attributes:
        rows: The case rows, in the order added.
        whole, roi_scores: pooled scores of the whole volume and of the ROIs.
        truth, truth_band: pooled metrics against p* (whole volume, band).
    """

    __test__ = False  # not a pytest class, despite the name

    n_bins: int = DEFAULT_BINS
    shift: int = DEFAULT_SHIFT
    failure_quantile: float = DEFAULT_FAILURE_QUANTILE
    rows: list[dict[str, Any]] = field(default_factory=list)
    whole: RegionScores = field(init=False)
    roi_scores: RegionScores = field(init=False)
    error_var: ErrorDetectionAccumulator = field(init=False)
    error_entropy: ErrorDetectionAccumulator = field(init=False)
    truth: TruthScores = field(default_factory=TruthScores)
    truth_band: TruthScores = field(default_factory=TruthScores)
    has_var: bool = field(init=False, default=False)
    has_pstar: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.whole = RegionScores(self.n_bins)
        self.roi_scores = RegionScores(self.n_bins)
        self.error_var = ErrorDetectionAccumulator(self.shift)
        self.error_entropy = ErrorDetectionAccumulator(self.shift)

    @property
    def calibration(self) -> CalibrationAccumulator:
        """Pooled whole-volume calibration bins."""
        return self.whole.calibration

    @property
    def probabilistic(self) -> ProbabilisticAccumulator:
        """Pooled whole-volume NLL and Brier sums."""
        return self.whole.probabilistic

    def add(self, result: CaseResult) -> None:
        """Add one case (its accumulators are merged, then may be dropped)."""
        self.rows.append(dict(result.row))
        self.whole.merge(result.whole)
        self.roi_scores.merge(result.roi_scores)
        self.error_entropy.merge(result.error_entropy)
        if result.error_var is not None:
            self.error_var.merge(result.error_var)
            self.has_var = True
        if result.truth is not None and result.truth_band is not None:
            self.truth.merge(result.truth)
            self.truth_band.merge(result.truth_band)
            self.has_pstar = True

    def _column(self, name: str) -> np.ndarray:
        return np.array([float(r[name]) for r in self.rows], dtype=np.float64)

    def pooled_row(self) -> dict[str, Any]:
        """The ``ALL`` row (keys of :data:`ALL_COLUMNS`)."""
        row: dict[str, Any] = {c: NAN for c in ALL_COLUMNS}
        dice = self._column("dice") if self.rows else np.zeros(0)
        valid = dice[~np.isnan(dice)]
        risk = 1.0 - dice

        def nanmean(name: str) -> float:
            col = self._column(name) if self.rows else np.zeros(0)
            col = col[~np.isnan(col)]
            return float(col.mean()) if col.size else NAN

        row.update(
            case="ALL",
            dice=float(valid.mean()) if valid.size else NAN,
            dice_std=float(valid.std(ddof=1)) if valid.size > 1 else NAN,
            **self.whole.columns(),
            **self.roi_scores.columns(ROI),
            n_true=int(sum(int(r["n_true"]) for r in self.rows)),
            n_pred=int(sum(int(r["n_pred"]) for r in self.rows)),
            auroc_entropy=self.error_entropy.auroc(),
            auprc_entropy=self.error_entropy.auprc(),
            mean_entropy_pred=nanmean("mean_entropy_pred"),
            ged2=nanmean("ged2"),
            diversity=nanmean("diversity"),
            reference_diversity=nanmean("reference_diversity"),
            n_samples=int(sum(int(r["n_samples"]) for r in self.rows)),
            n_references=int(sum(int(r["n_references"]) for r in self.rows)),
            n_cases=len(self.rows),
            n_nan_dice=int(dice.size - valid.size),
        )
        row["diversity_ratio"] = diversity_ratio(row["diversity"], row["reference_diversity"])
        for name in ("fnr", "mean_mi_pred", "volume_cv"):
            row[name] = nanmean(name)
        for name in ("var", "entropy", "mi"):
            row[f"mean_{name}_boundary"] = nanmean(f"mean_{name}_boundary")
        row["n_voxels_boundary"] = int(sum(int(r["n_voxels_boundary"]) for r in self.rows))
        row.update(failure_detection(self.rows, self.failure_quantile))
        if self.rows:
            conf_ent = -self._column("mean_entropy_pred")
            row.update(aurc_entropy=aurc(risk, conf_ent), eaurc_entropy=excess_aurc(risk, conf_ent))
        if self.has_var:
            conf_var = -self._column("mean_var_pred")
            row.update(
                auroc_var=self.error_var.auroc(),
                auprc_var=self.error_var.auprc(),
                mean_var_pred=nanmean("mean_var_pred"),
                aurc_var=aurc(risk, conf_var),
                eaurc_var=excess_aurc(risk, conf_var),
            )
        if self.has_pstar:
            row.update(self.truth.columns(), **self.truth_band.columns(BAND))
            row[f"n_voxels{BAND}"] = self.truth_band.error.n
        return row
