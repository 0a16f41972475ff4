"""Error of the predicted probability against the known truth p* (phantom only).

The synthetic phantom draws every voxel's label from a known foreground
probability p*. A model that learned the data-generating process predicts
p = p*; the distance between the two measures that directly, without the
noise of a single drawn label:

    MAE  = (1/N) sum_n |p_n - p*_n|,   RMSE = sqrt((1/N) sum_n (p_n - p*_n)^2).

Most voxels of a volume are certain (p* = 0 or 1), so whole-volume means are
dominated by them. The *ambiguity band* is the set of voxels whose label is
genuinely uncertain, :data:`BAND_LOW` < p* < :data:`BAND_HIGH` (0.01 and
0.99, strict); :func:`ambiguity_band` gives its mask and the evaluation reports
every metric against p* for the whole volume and for the band.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mobseg.metrics._common import check_probability, check_same_shape, flat_chunks, nan_if_zero

#: Lower and upper bound (both excluded) of p* in the ambiguity band.
BAND_LOW = 0.01
BAND_HIGH = 0.99


def ambiguity_band(true_prob: np.ndarray) -> np.ndarray:
    """Mask of the voxels whose true probability is uncertain: 0.01 < p* < 0.99.

    Args:
        true_prob: The true foreground probability p*, any shape.

    Returns:
        bool array of the same shape.
    """
    q = np.asarray(true_prob)
    return (q > BAND_LOW) & (q < BAND_HIGH)


@dataclass
class ProbabilityErrorAccumulator:
    """Streaming sums of |p - p*| and (p - p*)^2.

    Attributes:
        abs_sum: sum_n |p_n - p*_n|.
        sq_sum: sum_n (p_n - p*_n)^2.
        n: number of voxels.
    """

    abs_sum: float = 0.0
    sq_sum: float = 0.0
    n: int = 0

    def update(self, prob: np.ndarray, true_prob: np.ndarray) -> ProbabilityErrorAccumulator:
        """Add voxels.

        Args:
            prob: Predicted foreground probability, any shape.
            true_prob: The true p*, same shape.

        Returns:
            self.
        """
        check_same_shape(prob=prob, true_prob=true_prob)
        for p, q in flat_chunks(np.asarray(prob), np.asarray(true_prob)):
            check_probability(p)
            check_probability(q, "true probability p*")
            self._add(p, q)
        return self

    def _add(self, p: np.ndarray, q: np.ndarray) -> None:
        """Add one validated flat chunk."""
        diff = p.astype(np.float64) - q
        self.abs_sum += float(np.abs(diff).sum())
        self.sq_sum += float(np.dot(diff, diff))
        self.n += int(p.size)

    def merge(self, other: ProbabilityErrorAccumulator) -> ProbabilityErrorAccumulator:
        """Add the sums of ``other``; returns self."""
        self.abs_sum += other.abs_sum
        self.sq_sum += other.sq_sum
        self.n += other.n
        return self

    def mae(self) -> float:
        """Mean absolute error (NaN without voxels)."""
        return nan_if_zero(self.abs_sum, self.n)

    def rmse(self) -> float:
        """Root mean squared error (NaN without voxels)."""
        return float(np.sqrt(nan_if_zero(self.sq_sum, self.n)))


def probability_error(prob: np.ndarray, true_prob: np.ndarray) -> tuple[float, float]:
    """(MAE, RMSE) of the predicted probability against p*.

    Args:
        prob: Predicted foreground probability, any shape.
        true_prob: The true probability p*, same shape.
    """
    acc = ProbabilityErrorAccumulator().update(prob, true_prob)
    return acc.mae(), acc.rmse()
