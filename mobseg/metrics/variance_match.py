"""The model's Var[p] against the annotators' per-voxel variance p*(1 - p*) (phantom only).

A voxel whose label is drawn from Bernoulli(p*) has the label variance
a = p*(1 - p*) (0 where every annotator agrees, 0.25 at p* = 0.5). A model that
represents the annotators' spread in its logit distribution has a large
Var[p] (the ``_var`` map) exactly where a is large. Over the voxels of a
region, with v_n = Var[p]_n:

    corr  = Pearson correlation of (v_n, a_n)
          = sum (v - mean v)(a - mean a) / sqrt(sum (v - mean v)^2 sum (a - mean a)^2),
    ratio = mean v / mean a.

corr is NaN when either has no spread (e.g. a deterministic model's zero map),
ratio is NaN when mean a = 0. Binned curve: the voxels fall into
:data:`DEFAULT_BINS` equal-width bins of a on [0, 0.25] (last bin closed); per
bin the count, the mean a and the mean v are kept, for a plot of v against a
with the identity as the target.

Streaming: each chunk's count, means and centred sums of squares and
products are merged with the pairwise update of Chan, Golub and LeVeque
(1979), so the correlation of 10^9 voxels keeps float64 accuracy (the naive
sum-of-squares formula cancels catastrophically for small variances).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mobseg.metrics._common import (
    check_finite_nonnegative,
    check_probability,
    check_same_shape,
    flat_chunks,
    nan_if_zero,
)

#: Bins of p*(1 - p*) on [0, 0.25] for the binned curve.
DEFAULT_BINS = 10

#: Largest Bernoulli variance (at p* = 0.5): the upper edge of the bins.
MAX_BERNOULLI_VARIANCE = 0.25


def annotator_variance(true_prob: np.ndarray) -> np.ndarray:
    """The label variance p*(1 - p*) per voxel, float64.

    Args:
        true_prob: The true probability p*, any shape.
    """
    q = np.clip(np.asarray(true_prob, dtype=np.float64), 0.0, 1.0)
    return q * (1.0 - q)


@dataclass
class VarianceMatchAccumulator:
    """Streaming correlation, ratio and binned curve of Var[p] against p*(1 - p*).

    Args:
        n_bins: Bins of p*(1 - p*) on [0, 0.25].

    Attributes:
        n: voxels seen.
        mean_v, mean_a: running means of v = Var[p] and a = p*(1 - p*).
        m2_v, m2_a: centred sums of squares; c_va: centred sum of products.
        bin_count, bin_v, bin_a: per bin of a, voxels and sums of v and a.
    """

    n_bins: int = DEFAULT_BINS
    n: int = 0
    mean_v: float = 0.0
    mean_a: float = 0.0
    m2_v: float = 0.0
    m2_a: float = 0.0
    c_va: float = 0.0
    bin_count: np.ndarray = field(init=False)
    bin_v: np.ndarray = field(init=False)
    bin_a: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}.")
        self.bin_count = np.zeros(self.n_bins, dtype=np.int64)
        self.bin_v = np.zeros(self.n_bins, dtype=np.float64)
        self.bin_a = np.zeros(self.n_bins, dtype=np.float64)

    def update(self, variance: np.ndarray, true_prob: np.ndarray) -> VarianceMatchAccumulator:
        """Add voxels.

        Args:
            variance: The model's Var[p] per voxel (>= 0), any shape.
            true_prob: The true probability p*, same shape.

        Returns:
            self.

        Raises:
            ValueError: shapes differ, negative or NaN variance, p* outside [0, 1].
        """
        check_same_shape(variance=variance, true_prob=true_prob)
        for v, q in flat_chunks(np.asarray(variance), np.asarray(true_prob)):
            check_finite_nonnegative(v, "variance")
            check_probability(q, "true probability p*")
            self._add(v, q)
        return self

    def _add(self, v: np.ndarray, q: np.ndarray) -> None:
        """Add one validated flat chunk (v = Var[p], q = p*)."""
        if v.size == 0:
            return
        dv = np.maximum(v.astype(np.float64), 0.0)
        q64 = q.astype(np.float64)
        da = np.clip(q64, 0.0, 1.0)
        da *= 1.0 - da  # a = p*(1 - p*)
        idx = (da * (self.n_bins / MAX_BERNOULLI_VARIANCE)).astype(np.intp)  # a >= 0: floor
        np.minimum(idx, self.n_bins - 1, out=idx)
        part = VarianceMatchAccumulator(self.n_bins)
        part.bin_count = np.bincount(idx, minlength=self.n_bins).astype(np.int64)
        part.bin_v = np.bincount(idx, weights=dv, minlength=self.n_bins)
        part.bin_a = np.bincount(idx, weights=da, minlength=self.n_bins)
        n = int(dv.size)
        mv, ma = float(part.bin_v.sum()) / n, float(part.bin_a.sum()) / n
        dv -= mv  # centred in place
        da -= ma
        part.n, part.mean_v, part.mean_a = n, mv, ma
        part.m2_v, part.m2_a, part.c_va = float(dv @ dv), float(da @ da), float(dv @ da)
        self.merge(part)

    def merge(self, other: VarianceMatchAccumulator) -> VarianceMatchAccumulator:
        """Pool the voxels of ``other`` (same n_bins); returns self."""
        if other.n_bins != self.n_bins:
            raise ValueError(f"Cannot merge {other.n_bins} bins into {self.n_bins} bins.")
        if other.n == 0:
            return self
        na, nb = self.n, other.n
        n = na + nb
        dv, da = other.mean_v - self.mean_v, other.mean_a - self.mean_a
        w = na * nb / n
        self.m2_v += other.m2_v + dv * dv * w
        self.m2_a += other.m2_a + da * da * w
        self.c_va += other.c_va + dv * da * w
        self.mean_v += dv * nb / n
        self.mean_a += da * nb / n
        self.n = n
        self.bin_count += other.bin_count
        self.bin_v += other.bin_v
        self.bin_a += other.bin_a
        return self

    def correlation(self) -> float:
        """Pearson correlation of Var[p] and p*(1 - p*) (NaN without spread in either)."""
        denom = self.m2_v * self.m2_a
        if self.n < 2 or not denom > 0:
            return float("nan")
        return float(np.clip(self.c_va / np.sqrt(denom), -1.0, 1.0))

    def ratio(self) -> float:
        """mean Var[p] / mean p*(1 - p*) (NaN without voxels or when mean p*(1 - p*) = 0)."""
        if self.n == 0:
            return float("nan")
        return nan_if_zero(self.mean_v, self.mean_a)

    def curve(self) -> dict[str, Any]:
        """The binned curve, JSON-ready: edges, count, mean a and mean v per bin (None if empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mv = np.where(self.bin_count > 0, self.bin_v / self.bin_count, np.nan)
            ma = np.where(self.bin_count > 0, self.bin_a / self.bin_count, np.nan)

        def clean(a: np.ndarray) -> list[Any]:
            return [None if not np.isfinite(x) else float(x) for x in a]

        edges = np.linspace(0.0, MAX_BERNOULLI_VARIANCE, self.n_bins + 1)
        return {
            "edges": [float(e) for e in edges],
            "count": [int(c) for c in self.bin_count],
            "annotator_variance": clean(ma),
            "model_variance": clean(mv),
        }


def variance_correlation(variance: np.ndarray, true_prob: np.ndarray) -> float:
    """Pearson correlation of Var[p] and p*(1 - p*) over all voxels.

    Args:
        variance: The model's Var[p], any shape.
        true_prob: The true probability p*, same shape.
    """
    return VarianceMatchAccumulator().update(variance, true_prob).correlation()


def variance_ratio(variance: np.ndarray, true_prob: np.ndarray) -> float:
    """mean Var[p] / mean p*(1 - p*) over all voxels.

    Args:
        variance: The model's Var[p], any shape.
        true_prob: The true probability p*, same shape.
    """
    return VarianceMatchAccumulator().update(variance, true_prob).ratio()
