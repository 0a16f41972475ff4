"""Conformal risk control of the organ's false-negative rate (Angelopoulos et al. 2022).

The organ mask at threshold lambda is C(lambda) = {p >= lambda}. Its loss on a
case with reference mask G is the false-negative rate

    FNR(lambda) = |G minus C(lambda)| / |G|  (0 when G is empty),

the share of true organ voxels left out. FNR is non-decreasing in lambda and
bounded by B = 1. Given n calibration cases (the validation split) and a
level alpha, conformal risk control picks

    lambda_hat = max { lambda in Lambda : n/(n+1) * mean_i FNR_i(lambda) + B/(n+1) <= alpha },

and for a new case exchangeable with the calibration cases,
E[FNR(lambda_hat)] <= alpha, the expectation taken over the calibration set
and the new case (Theorem 1 of the paper, written there for losses that
decrease in lambda; here the sets shrink as lambda grows, so the largest
admissible lambda is taken). When no lambda is admissible (n < 1/alpha - 1),
lambda_hat = 0: every voxel is predicted and FNR = 0, which keeps the bound.

Lambda is a grid, lambda_k = k / K for k = 0..K (K = :data:`DEFAULT_GRID`,
steps of 1e-4). FNR_i is computed exactly at every grid point from a
histogram of the case's probabilities with the grid points as edges
(:class:`ThresholdHistogram`), so no voxel list is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Default level alpha of the expected FNR.
DEFAULT_ALPHA = 0.1
#: Default K: the thresholds are k / K, k = 0..K.
DEFAULT_GRID = 10_000


def threshold_grid(size: int = DEFAULT_GRID) -> np.ndarray:
    """The thresholds k / size, k = 0..size (float64)."""
    if size < 1:
        raise ValueError(f"grid size must be >= 1, got {size}.")
    return np.arange(size + 1, dtype=np.float64) / size


@dataclass
class ThresholdHistogram:
    """Counts of a case's voxels by threshold bin, for G and for all voxels.

    Bin j holds the voxels with lambda_j <= p < lambda_{j+1} (the last bin:
    p = 1), so ``p < lambda_k`` exactly when the bin is below k.

    Args:
        size: K of the grid.

    Attributes:
        true_counts: (K+1,) counts of the voxels of G.
        all_counts: (K+1,) counts of every voxel.
    """

    size: int = DEFAULT_GRID
    true_counts: np.ndarray = field(init=False)
    all_counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.grid = threshold_grid(self.size)
        self.true_counts = np.zeros(self.size + 1, dtype=np.int64)
        self.all_counts = np.zeros(self.size + 1, dtype=np.int64)

    def add(self, prob: np.ndarray, target: np.ndarray) -> ThresholdHistogram:
        """Add voxels (p in [0, 1], G boolean, same shape); returns self."""
        p = np.asarray(prob).reshape(-1)
        t = np.asarray(target).reshape(-1).astype(bool)
        if p.shape != t.shape:
            raise ValueError(f"prob {p.shape} and target {t.shape} differ.")
        j = np.clip(np.searchsorted(self.grid, p, side="right") - 1, 0, self.size)
        k = self.size + 1
        self.all_counts += np.bincount(j, minlength=k)
        self.true_counts += np.bincount(j[t], minlength=k)
        return self

    @property
    def n_true(self) -> int:
        return int(self.true_counts.sum())

    def fnr(self) -> np.ndarray:
        """(K+1,) FNR(lambda_k) = |{G, p < lambda_k}| / |G|; zeros when G is empty."""
        below = np.r_[0, np.cumsum(self.true_counts)[:-1]]
        n = self.n_true
        return below / n if n else np.zeros(self.size + 1)

    def volume(self) -> np.ndarray:
        """(K+1,) |{p >= lambda_k}| in voxels."""
        below = np.r_[0, np.cumsum(self.all_counts)[:-1]]
        return self.all_counts.sum() - below


@dataclass(frozen=True)
class ConformalThreshold:
    """The calibrated threshold.

    Attributes:
        lam: lambda_hat.
        index: Its index k in the grid.
        feasible: False when no lambda met the bound (lam = 0 then).
        n: Calibration cases.
        alpha: The level.
    """

    lam: float
    index: int
    feasible: bool
    n: int
    alpha: float


def crc_bound(fnr: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """n/(n+1) * mean_i FNR_i(lambda) + B/(n+1) per grid point; fnr is (n, L)."""
    f = np.asarray(fnr, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 1:
        raise ValueError(f"fnr must be (n >= 1, L), got {f.shape}.")
    n = f.shape[0]
    return n / (n + 1) * f.mean(axis=0) + bound / (n + 1)


def crc_threshold(
    fnr: np.ndarray, grid: np.ndarray, alpha: float = DEFAULT_ALPHA, bound: float = 1.0
) -> ConformalThreshold:
    """The largest grid lambda whose corrected calibration risk is <= alpha.

    Args:
        fnr: (n, L) FNR of each calibration case at each grid point.
        grid: (L,) increasing thresholds.
        alpha: Level in (0, 1).
        bound: B, the loss's upper bound.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
    g = np.asarray(grid, dtype=np.float64)
    risk = crc_bound(fnr, bound)
    if risk.shape != g.shape:
        raise ValueError(f"fnr has {risk.size} thresholds, the grid {g.size}.")
    ok = np.flatnonzero(risk <= alpha)
    n = int(np.asarray(fnr).shape[0])
    if ok.size == 0:
        return ConformalThreshold(float(g[0]), 0, False, n, alpha)
    k = int(ok.max())
    return ConformalThreshold(float(g[k]), k, True, n, alpha)


def calibrate(
    calibration: Sequence[ThresholdHistogram], alpha: float = DEFAULT_ALPHA
) -> ConformalThreshold:
    """lambda_hat from the calibration cases' histograms (one grid)."""
    if not calibration:
        raise ValueError("No calibration cases.")
    fnr = np.stack([h.fnr() for h in calibration])
    return crc_threshold(fnr, calibration[0].grid, alpha)


def held_out_risk(
    test: Sequence[ThresholdHistogram], threshold: ConformalThreshold, n_pred: Sequence[int]
) -> dict[str, float]:
    """Achieved FNR and volume cost of lambda_hat on test cases.

    Args:
        test: Histograms of the test cases.
        threshold: From :func:`calibrate`.
        n_pred: |S| = |{p > 0.5}| per test case (the default mask).

    Returns:
        ``crc_fnr`` (mean over cases of FNR(lambda_hat)), ``crc_volume_ratio``
        (sum_i |C_i(lambda_hat)| / sum_i |S_i|, NaN when every S is empty) and
        ``crc_extra_volume`` (that ratio minus 1).
    """
    k = threshold.index
    fnr = np.array([h.fnr()[k] for h in test], dtype=np.float64)
    vol = float(sum(int(h.volume()[k]) for h in test))
    base = float(sum(int(v) for v in n_pred))
    ratio = vol / base if base else float("nan")
    return {
        "crc_fnr": float(fnr.mean()) if fnr.size else float("nan"),
        "crc_volume_ratio": ratio,
        "crc_extra_volume": ratio - 1.0,
    }
