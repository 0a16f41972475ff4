"""From voxel to subject: case-level uncertainty scores and failure detection.

A case's *score* aggregates a voxel map into one number that should be high
when the segmentation failed. Per case (S = ``p > 0.5``):

- ``mean_<map>_pred``: the mean of Var[p], the predictive entropy or the
  mutual information over S (over the whole volume when S is empty, as for
  the risk-coverage confidences of :mod:`mobseg.metrics.uncertainty`);
- ``mean_<map>_boundary``: the mean over the *boundary band* of S, the voxels
  within ``width`` voxels of S's surface (:func:`boundary_band`; over the
  whole volume when S is empty);
- ``volume_cv``: the coefficient of variation of the predicted volume over
  the model's K >= 2 sample masks, std (ddof = 1) / mean of the voxel counts
  (the voxel volume is constant within a case, so counts suffice); NaN with
  fewer than two samples or a zero mean.

*Failure detection* over the cases of one test split: a case has failed when
its Dice is strictly below the split's ``quantile`` (default 0.1) quantile of
Dice (numpy's linear interpolation; cases with undefined Dice are left out).
Each score is rated by the AUROC of flagging the failed cases
(:func:`auroc`, ties counted one half, as scikit-learn's ``roc_auc_score``)
and by Spearman's rank correlation with 1 - Dice (:func:`spearman`, average
ranks for ties, as ``scipy.stats.spearmanr``). The AUROC is NaN without a
failed and a non-failed case and 0.5 for a constant score (all pairs tied,
e.g. the zero Var of a deterministic model); Spearman's rho is NaN for a
constant score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Default width of the boundary band, in voxels.
DEFAULT_BOUNDARY_WIDTH = 2
#: Default quantile of Dice below which a case has failed.
DEFAULT_FAILURE_QUANTILE = 0.1

#: Case-level scores, as columns of the metrics CSV.
CASE_SCORES: tuple[str, ...] = (
    "mean_var_pred",
    "mean_entropy_pred",
    "mean_mi_pred",
    "mean_var_boundary",
    "mean_entropy_boundary",
    "mean_mi_boundary",
    "volume_cv",
)


def score_label(score: str) -> str:
    """Short name of a case score for derived columns (``mean_var_pred`` -> ``var_pred``)."""
    return score[len("mean_") :] if score.startswith("mean_") else score


#: Columns of the pooled row: the failure threshold, the failed count, and per score
#: ``fail_auroc_<label>`` and ``fail_spearman_<label>``.
FAILURE_COLUMNS: tuple[str, ...] = (
    "fail_dice_threshold",
    "n_failed",
    *(f"fail_{kind}_{score_label(s)}" for s in CASE_SCORES for kind in ("auroc", "spearman")),
)


def boundary_band(mask: np.ndarray, width: int = DEFAULT_BOUNDARY_WIDTH) -> np.ndarray:
    """Voxels within ``width`` voxels of the surface of ``mask``.

    The band is dilation^w(S) minus erosion^w(S) with the face-connected
    structuring element (6 neighbours in 3-D), i.e. the voxels outside S at
    city-block distance <= w from S and the voxels of S at city-block distance
    <= w from the complement. The volume's own border is not a surface (the
    erosion treats outside voxels as S).

    Args:
        mask: Boolean (or 0/1) mask, any dimension >= 1.
        width: w >= 1.

    Returns:
        Boolean band, same shape (all False when S is empty or fills the volume).
    """
    from scipy import ndimage

    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}.")
    m = np.asarray(mask).astype(bool)
    if not m.any():
        return np.zeros_like(m)
    st = ndimage.generate_binary_structure(m.ndim, 1)
    outer = ndimage.binary_dilation(m, st, iterations=width)
    inner = ndimage.binary_erosion(m, st, iterations=width, border_value=1)
    return outer & ~inner


def mask_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` dilated by ``margin`` voxels, clipped (None when empty)."""
    m = np.asarray(mask)
    if not m.any():
        return None
    out = []
    for ax in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != ax)
        idx = np.flatnonzero(m.any(axis=other) if other else m)
        out.append(slice(max(0, int(idx[0]) - margin), min(m.shape[ax], int(idx[-1]) + margin + 1)))
    return tuple(out)


def volume_cv(volumes: Sequence[float] | np.ndarray) -> float:
    """Coefficient of variation std (ddof = 1) / mean; NaN for < 2 values or mean 0."""
    v = np.asarray(volumes, dtype=np.float64).reshape(-1)
    if v.size < 2 or v.mean() == 0:
        return float("nan")
    return float(v.std(ddof=1) / v.mean())


def failure_labels(
    dice: Sequence[float] | np.ndarray, quantile: float = DEFAULT_FAILURE_QUANTILE
) -> tuple[np.ndarray, float]:
    """Failed cases: Dice strictly below the ``quantile`` quantile of the defined Dice.

    Args:
        dice: (n,) Dice per case; NaN = undefined (never failed, left out).
        quantile: In (0, 1).

    Returns:
        (failed, threshold): a boolean (n,) array (False where Dice is NaN) and
        the threshold (NaN without defined Dice).
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}.")
    d = np.asarray(dice, dtype=np.float64).reshape(-1)
    ok = ~np.isnan(d)
    if not ok.any():
        return np.zeros(d.shape, dtype=bool), float("nan")
    thr = float(np.quantile(d[ok], quantile))
    return ok & (np.where(ok, d, np.inf) < thr), thr


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], x.size]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = 0.5 * (s + 1 + e)
    return ranks


def auroc(labels: Sequence[bool] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """AUROC of ``score`` for positive ``labels`` (Mann-Whitney, ties one half).

    Pairs with a NaN score are dropped; NaN without both classes.
    """
    y = np.asarray(labels, dtype=bool).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and score {s.shape} must have one length.")
    keep = ~np.isnan(s)
    y, s = y[keep], s[keep]
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks); NaN pairs dropped; NaN if undefined."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"x {a.shape} and y {b.shape} must have one length.")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def failure_detection(
    rows: Sequence[Mapping[str, Any]], quantile: float = DEFAULT_FAILURE_QUANTILE
) -> dict[str, float]:
    """The :data:`FAILURE_COLUMNS` of a split from its case rows.

    Args:
        rows: Case rows with ``dice`` and the :data:`CASE_SCORES` (missing = NaN).
        quantile: Dice quantile that defines a failure.

    Returns:
        ``fail_dice_threshold``, ``n_failed`` and, per score, the AUROC of
        flagging failed cases and the Spearman correlation with 1 - Dice (over
        the cases with a defined Dice and score).
    """

    def col(name: str) -> np.ndarray:
        return np.array([float(r.get(name, np.nan)) for r in rows], dtype=np.float64)

    dice = col("dice")
    failed, thr = failure_labels(dice, quantile) if len(rows) else (np.zeros(0, bool), np.nan)
    out: dict[str, float] = {"fail_dice_threshold": thr, "n_failed": int(failed.sum())}
    ok = ~np.isnan(dice)
    for s in CASE_SCORES:
        score = col(s)
        label = score_label(s)
        out[f"fail_auroc_{label}"] = auroc(failed[ok], score[ok])
        out[f"fail_spearman_{label}"] = spearman(score[ok], 1.0 - dice[ok])
    return out
