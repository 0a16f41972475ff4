"""All metrics of one test case in one streamed pass, and their pooling over a test set.

:func:`evaluate_case` walks the arrays of a case once, in flat chunks, and
feeds every accumulator of :mod:`mobseg.metrics`; :class:`TestSetAccumulator`
adds the cases' bins, histograms and sums into the pooled ``ALL`` numbers.
Peak memory is the input arrays plus a few chunk-sized temporaries.

Definitions (SPEC section 6): S = ``p > 0.5`` (argmax of the mean
probability), G = the reference mask, errors = S != G.

Per case row (``CASE_COLUMNS``):

- ``dice`` (NaN when S and G are both empty), ``nll``, ``brier``, ``ece``,
  ``mce`` (15 bins), ``n_voxels`` (voxels evaluated), ``n_true`` = |G|,
  ``n_pred`` = |S|;
- ``auroc_var``/``auprc_var``, ``auroc_entropy``/``auprc_entropy``: error
  detection with Var[p] or the predictive entropy (computed from p when no
  entropy map is given; for two classes H(E[p]) is a function of p);
- ``mean_var_pred``, ``mean_entropy_pred``: mean uncertainty over S (over the
  evaluated voxels when S is empty); minus these is the case's confidence for
  the risk-coverage curves;
- ``ged2``, ``diversity``, ``reference_diversity``, ``n_samples``,
  ``n_references``: only with >= 2 reference masks (samples default to S);
- ``pstar_mae``, ``pstar_rmse``: only with the true probability p*.

The ``ALL`` row: ``dice`` is the mean over cases with a defined Dice (the
paper's statistic; ``n_nan_dice`` counts the others) and ``dice_std`` its
sample standard deviation; ``nll``, ``brier``, ``pstar_*`` are voxel means over
the whole test set; ``ece``/``mce`` come from the summed bins; AUROC/AUPRC from
the summed histograms; ``aurc_*``/``eaurc_*`` from the per-case risks
1 - Dice and confidences; ``ged2`` and the diversities are means over the cases
that have them.

``region="roi"`` restricts the voxel metrics of a case to the bounding box of
G or S, dilated by ``margin`` voxels and clipped to the volume. Overlap
measures (Dice, GED) do not depend on the background, so GED is always
computed on the whole volume.
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
from mobseg.metrics.ged import OverlapAccumulator, ged_from_distances
from mobseg.metrics.phantom import ProbabilityErrorAccumulator
from mobseg.metrics.probabilistic import ProbabilisticAccumulator, binary_entropy
from mobseg.metrics.uncertainty import (
    DEFAULT_SHIFT,
    ErrorDetectionAccumulator,
    aurc,
    excess_aurc,
    score_codes,
)

REGIONS = ("all", "roi")

CASE_COLUMNS: tuple[str, ...] = (
    "case",
    "dice",
    "nll",
    "brier",
    "ece",
    "mce",
    "n_voxels",
    "n_true",
    "n_pred",
    "auroc_var",
    "auprc_var",
    "auroc_entropy",
    "auprc_entropy",
    "mean_var_pred",
    "mean_entropy_pred",
    "ged2",
    "diversity",
    "reference_diversity",
    "n_samples",
    "n_references",
    "pstar_mae",
    "pstar_rmse",
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
)

ALL_COLUMNS: tuple[str, ...] = CASE_COLUMNS + POOLED_COLUMNS

NAN = float("nan")


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
    shape = prob.shape
    if prob.ndim == 0:
        return None
    per_row = int(np.prod(shape[1:], dtype=np.int64)) if prob.ndim > 1 else 1
    rows = max(1, chunk // max(per_row, 1))
    lo = [math.inf] * prob.ndim
    hi = [-math.inf] * prob.ndim
    for start in range(0, shape[0], rows):
        m = (prob[start : start + rows] > 0.5) | as_bool_mask(
            np.asarray(target[start : start + rows]), "target"
        )
        if not m.any():
            continue
        for ax in range(prob.ndim):
            other = tuple(a for a in range(prob.ndim) if a != ax)
            idx = np.flatnonzero(m.any(axis=other) if other else m)
            off = start if ax == 0 else 0
            lo[ax] = min(lo[ax], int(idx[0]) + off)
            hi[ax] = max(hi[ax], int(idx[-1]) + off)
    if lo[0] == math.inf:
        return None
    return tuple(
        slice(max(0, int(lo[a]) - margin), min(shape[a], int(hi[a]) + margin + 1))
        for a in range(prob.ndim)
    )


@dataclass
class CaseResult:
    """Metrics of one case, plus the accumulators that pool into the test set.

    Attributes:
        row: The case's CSV row (keys of :data:`CASE_COLUMNS`).
        calibration, probabilistic, error_var, error_entropy, pstar: the case's
            accumulators (None where not computed).
        roi: the region evaluated (None = whole volume or empty ROI).
    """

    row: dict[str, Any]
    calibration: CalibrationAccumulator
    probabilistic: ProbabilisticAccumulator
    error_var: ErrorDetectionAccumulator | None
    error_entropy: ErrorDetectionAccumulator
    pstar: ProbabilityErrorAccumulator | None
    roi: tuple[slice, ...] | None = None


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
    references: Sequence[np.ndarray] = (),
    samples: Sequence[np.ndarray] | None = None,
    true_prob: np.ndarray | None = None,
    region: str = "all",
    margin: int = 10,
    n_bins: int = DEFAULT_BINS,
    shift: int = DEFAULT_SHIFT,
    chunk: int = CHUNK_VOXELS,
) -> CaseResult:
    """Every metric of one case, streamed over flat chunks of the arrays.

    Args:
        prob: Foreground probability p, shape (N1, ..., Nd), float, in [0, 1].
        target: Reference mask G (0/1), same shape.
        case: Case id for the row.
        variance: Var[p] per voxel (>= 0), same shape, or None.
        entropy: Predictive entropy per voxel (nats), or None to compute it from p.
        references: Reference masks for GED (used when there are >= 2).
        samples: Model samples (masks) for GED; None = the single S.
        true_prob: The true foreground probability p* (phantom), or None.
        region: ``all`` or ``roi`` (see module docstring).
        margin: ROI margin in voxels.
        n_bins: Calibration bins.
        shift: Error-detection histogram resolution (see mobseg.metrics.uncertainty).
        chunk: Voxels per chunk.

    Returns:
        The :class:`CaseResult`.

    Raises:
        ValueError: shapes differ, p outside [0, 1] or NaN, masks not 0/1,
            negative or NaN uncertainty; the message names the array.
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}.")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    prob = np.asarray(prob)
    target = np.asarray(target)
    named = {"prob": prob, "target": target}
    for name, arr in (("variance", variance), ("entropy", entropy), ("true_prob", true_prob)):
        if arr is not None:
            named[name] = np.asarray(arr)
    for i, r in enumerate(references):
        named[f"reference{i}"] = np.asarray(r)
    for i, s in enumerate(samples or ()):
        named[f"sample{i}"] = np.asarray(s)
    check_same_shape(**named)

    roi: tuple[slice, ...] | None = None
    full_prob = prob
    if region == "roi":
        roi = roi_slices(prob, target, margin, chunk)
        if roi is None:
            roi = tuple(slice(0, 0) for _ in prob.shape)

    def crop(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None or roi is None else a[roi]

    if roi is not None:
        prob, target = crop(prob), crop(target)  # type: ignore[assignment]
        variance, entropy, true_prob = crop(variance), crop(entropy), crop(true_prob)

    dice = DiceAccumulator()
    cal = CalibrationAccumulator(n_bins)
    pr = ProbabilisticAccumulator()
    err_var = ErrorDetectionAccumulator(shift) if variance is not None else None
    err_ent = ErrorDetectionAccumulator(shift)
    pstar = ProbabilityErrorAccumulator() if true_prob is not None else None
    sums = {"var_pred": 0.0, "ent_pred": 0.0, "var_all": 0.0, "ent_all": 0.0}

    for p, t, v, h, q in flat_chunks(prob, target, variance, entropy, true_prob, chunk=chunk):
        check_probability(p, "probability")
        t = as_bool_mask(t, "ground-truth mask")
        s = p > 0.5
        dice.intersection += int(np.count_nonzero(s & t))
        dice.n_pred += int(np.count_nonzero(s))
        dice.n_true += int(np.count_nonzero(t))
        cal._add(p, t)
        pr._add(p, t)
        err = s ^ t
        if v is not None and err_var is not None:
            check_finite_nonnegative(v, "variance")
            err_var._add_codes(score_codes(v, shift), err)
            sums["var_pred"] += float(np.sum(v, where=s, dtype=np.float64))
            sums["var_all"] += float(np.sum(v, dtype=np.float64))
        if h is None:
            h = binary_entropy(p)
        else:
            check_finite_nonnegative(h, "entropy")
        err_ent._add_codes(score_codes(h, shift), err)
        sums["ent_pred"] += float(np.sum(h, where=s, dtype=np.float64))
        sums["ent_all"] += float(np.sum(h, dtype=np.float64))
        if pstar is not None and q is not None:
            check_probability(q, "true probability p*")
            pstar._add(p, q)

    n_vox = pr.n
    n_pred = dice.n_pred

    def mean_over_pred(pred_sum: float, all_sum: float) -> float:
        return nan_if_zero(pred_sum, n_pred) if n_pred else nan_if_zero(all_sum, n_vox)

    row: dict[str, Any] = {c: NAN for c in CASE_COLUMNS}
    row.update(
        case=case,
        dice=dice.compute(),
        nll=pr.nll(),
        brier=pr.brier(),
        ece=cal.ece(),
        mce=cal.mce(),
        n_voxels=n_vox,
        n_true=dice.n_true,
        n_pred=n_pred,
        auroc_entropy=err_ent.auroc(),
        auprc_entropy=err_ent.auprc(),
        mean_entropy_pred=mean_over_pred(sums["ent_pred"], sums["ent_all"]),
        n_samples=0,
        n_references=len(references),
    )
    if err_var is not None:
        row.update(
            auroc_var=err_var.auroc(),
            auprc_var=err_var.auprc(),
            mean_var_pred=mean_over_pred(sums["var_pred"], sums["var_all"]),
        )
    if pstar is not None:
        row.update(pstar_mae=pstar.mae(), pstar_rmse=pstar.rmse())
    if len(references) >= 2:
        acc = _ged(full_prob, samples, references, chunk)
        n_s = len(samples) if samples else 1
        g = ged_from_distances(acc.distance(), n_s)
        row.update(
            ged2=g.ged2,
            diversity=g.diversity,
            reference_diversity=g.reference_diversity,
            n_samples=n_s,
        )
    return CaseResult(row, cal, pr, err_var, err_ent, pstar, roi if region == "roi" else None)


@dataclass
class TestSetAccumulator:
    """Pools the cases of one test set (one run) into the ``ALL`` row.

    Args:
        n_bins: Calibration bins.
        shift: Error-detection histogram resolution.

    Attributes:
        rows: The case rows, in the order added.
    """

    __test__ = False  # not a pytest class, despite the name

    n_bins: int = DEFAULT_BINS
    shift: int = DEFAULT_SHIFT
    rows: list[dict[str, Any]] = field(default_factory=list)
    calibration: CalibrationAccumulator = field(init=False)
    probabilistic: ProbabilisticAccumulator = field(init=False)
    error_var: ErrorDetectionAccumulator = field(init=False)
    error_entropy: ErrorDetectionAccumulator = field(init=False)
    pstar: ProbabilityErrorAccumulator = field(init=False)
    has_var: bool = field(init=False, default=False)
    has_pstar: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.calibration = CalibrationAccumulator(self.n_bins)
        self.probabilistic = ProbabilisticAccumulator()
        self.error_var = ErrorDetectionAccumulator(self.shift)
        self.error_entropy = ErrorDetectionAccumulator(self.shift)
        self.pstar = ProbabilityErrorAccumulator()

    def add(self, result: CaseResult) -> None:
        """Add one case (its accumulators are merged, then may be dropped)."""
        self.rows.append(dict(result.row))
        self.calibration.merge(result.calibration)
        self.probabilistic.merge(result.probabilistic)
        self.error_entropy.merge(result.error_entropy)
        if result.error_var is not None:
            self.error_var.merge(result.error_var)
            self.has_var = True
        if result.pstar is not None:
            self.pstar.merge(result.pstar)
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
            nll=self.probabilistic.nll(),
            brier=self.probabilistic.brier(),
            ece=self.calibration.ece(),
            mce=self.calibration.mce(),
            n_voxels=int(sum(int(r["n_voxels"]) for r in self.rows)),
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
            row.update(pstar_mae=self.pstar.mae(), pstar_rmse=self.pstar.rmse())
        return row
