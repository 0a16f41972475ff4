"""Proper scoring rules of the voxel-wise predictive distribution: NLL and Brier.

SPEC section 6, for one organ (C = 2 classes, p = foreground probability,
t_n in {0, 1}):

    NLL   = (1/N) sum_n -ln max(p(t_n), 1e-8),  p(1) = p, p(0) = 1 - p,
    Brier = (1/N) sum_n sum_c (p_c - [t_n = c])^2 = (1/N) sum_n 2 (p_n - t_n)^2.

Per-voxel terms are evaluated in float32 (the precision of the files) and
summed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mobseg.metrics._common import (
    as_bool_mask,
    check_probability,
    check_same_shape,
    flat_chunks,
    nan_if_zero,
)

#: Floor of the probability of the true class inside the logarithm.
NLL_FLOOR = 1e-8


@dataclass
class ProbabilisticAccumulator:
    """Streaming sums of the NLL and Brier terms.

    Attributes:
        nll_sum: sum_n -ln max(p(t_n), 1e-8).
        brier_sum: sum_n sum_c (p_c - [t_n = c])^2.
        n: number of voxels.
    """

    nll_sum: float = 0.0
    brier_sum: float = 0.0
    n: int = 0

    def update(self, prob: np.ndarray, target: np.ndarray) -> ProbabilisticAccumulator:
        """Add voxels.

        Args:
            prob: Foreground probability, any shape, in [0, 1].
            target: 0/1 mask of the same shape.

        Returns:
            self.
        """
        check_same_shape(prob=prob, target=target)
        for p, t in flat_chunks(np.asarray(prob), np.asarray(target)):
            check_probability(p)
            self._add(p, as_bool_mask(t, "target"))
        return self

    def _add(self, p: np.ndarray, t: np.ndarray) -> None:
        """Add one validated flat chunk (p float, t bool)."""
        p32 = p.astype(np.float32, copy=False)
        p_true = np.where(t, p32, np.float32(1) - p32)
        np.maximum(p_true, np.float32(NLL_FLOOR), out=p_true)
        np.log(p_true, out=p_true)
        self.nll_sum -= float(p_true.sum(dtype=np.float64))
        diff = p32 - t  # float32
        np.square(diff, out=diff)
        self.brier_sum += 2.0 * float(diff.sum(dtype=np.float64))
        self.n += int(p.size)

    def merge(self, other: ProbabilisticAccumulator) -> ProbabilisticAccumulator:
        """Add the sums of ``other``; returns self."""
        self.nll_sum += other.nll_sum
        self.brier_sum += other.brier_sum
        self.n += other.n
        return self

    def nll(self) -> float:
        """Mean negative log-likelihood in nats per voxel (NaN without voxels)."""
        return nan_if_zero(self.nll_sum, self.n)

    def brier(self) -> float:
        """Mean Brier score per voxel, in [0, 2] (NaN without voxels)."""
        return nan_if_zero(self.brier_sum, self.n)


def negative_log_likelihood(prob: np.ndarray, target: np.ndarray) -> float:
    """Mean over voxels of -ln max(p(t_n), 1e-8).

    Args:
        prob: Foreground probability, any shape.
        target: 0/1 mask, same shape.
    """
    return ProbabilisticAccumulator().update(prob, target).nll()


def brier_score(prob: np.ndarray, target: np.ndarray) -> float:
    """Mean over voxels of sum_c (p_c - [t_n = c])^2 (two classes).

    Args:
        prob: Foreground probability, any shape.
        target: 0/1 mask, same shape.
    """
    return ProbabilisticAccumulator().update(prob, target).brier()


def binary_entropy(prob: np.ndarray) -> np.ndarray:
    """Predictive entropy H(p) = -p ln p - (1 - p) ln (1 - p) in nats (0 ln 0 = 0).

    Args:
        prob: Foreground probability, any shape.

    Returns:
        float32 array of the same shape, values in [0, ln 2].
    """
    p = np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0)
    q = np.float32(1) - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0) + np.where(q > 0, q * np.log(q), 0))
    return h.astype(np.float32, copy=False)
