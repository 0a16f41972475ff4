"""Calibration of the foreground probability: ECE, MCE and reliability bins.

SPEC section 6. The foreground probability p of every voxel falls into one of
``n_bins`` (15) equal-width bins [i/n, (i+1)/n); the last bin is closed at 1.
A value exactly on an edge goes to the bin that starts there. Per bin b:

    n_b = number of voxels, conf_b = mean p, acc_b = fraction of organ voxels,

    ECE = sum_b (n_b / N) |acc_b - conf_b|,   MCE = max_{b: n_b > 0} |acc_b - conf_b|.

These equal torchmetrics' ``BinaryCalibrationError(n_bins=15, norm="l1")`` and
``norm="max"`` on the same voxels, with one difference at a single value: a
probability of exactly 1.0 lands in torchmetrics' own 16th bin ([1, 1]), here
in the last bin [14/15, 1]. Only the bin sums are stored (3 x n_bins numbers),
so a whole test set is summarised by adding the bins of its cases
(:meth:`CalibrationAccumulator.merge`), at no extra memory.

Bin indices are computed as floor(n * p) in float64, which is exact for
float32 probabilities (the NIfTI files are float32); for float64 inputs an
explicit comparison with the float64 edges i/n repairs the rounding of n * p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mobseg.metrics._common import as_bool_mask, check_probability, check_same_shape, flat_chunks

DEFAULT_BINS = 15


def bin_index(prob: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """Bin of every probability: i such that p in [i/n, (i+1)/n), last bin closed.

    Args:
        prob: Probabilities, 1-D (any float dtype).
        n_bins: Number of equal-width bins n.

    Returns:
        intp array of the same shape with values in [0, n - 1].
    """
    p64 = prob.astype(np.float64, copy=False)
    idx = np.floor(p64 * n_bins).astype(np.intp)
    np.clip(idx, 0, n_bins - 1, out=idx)
    if prob.dtype == np.float64:
        # n * p may round across an integer; compare with the float64 edges.
        edges = np.arange(n_bins + 2, dtype=np.float64) / n_bins
        edges[-1] = np.inf
        idx -= p64 < edges[idx]
        idx += p64 >= edges[idx + 1]
        np.clip(idx, 0, n_bins - 1, out=idx)
    return idx


@dataclass
class ReliabilityBins:
    """The bins of a reliability diagram (all arrays of length n_bins).

    Attributes:
        edges: Bin edges, length n_bins + 1 (0, 1/n, ..., 1).
        count: n_b, voxels per bin.
        confidence: conf_b, mean predicted probability (NaN for empty bins).
        accuracy: acc_b, fraction of organ voxels (NaN for empty bins).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN as None)."""

        def clean(a: np.ndarray) -> list[Any]:
            return [None if not np.isfinite(v) else float(v) for v in a]

        return {
            "edges": [float(e) for e in self.edges],
            "count": [int(c) for c in self.count],
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReliabilityBins:
        """Inverse of :meth:`to_dict`."""

        def arr(key: str) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in data[key]], dtype=np.float64)

        return cls(
            edges=np.asarray(data["edges"], dtype=np.float64),
            count=np.asarray(data["count"], dtype=np.int64),
            confidence=arr("confidence"),
            accuracy=arr("accuracy"),
        )


@dataclass
class CalibrationAccumulator:
    """Streaming calibration bins of the foreground probability.

    Args:
        n_bins: Number of equal-width bins (15 in the paper).

    Attributes:
        count: (n_bins,) int64, voxels per bin.
        positives: (n_bins,) int64, organ voxels per bin.
        prob_sum: (n_bins,) float64, sum of p per bin.
    """

    n_bins: int = DEFAULT_BINS
    count: np.ndarray = field(init=False)
    positives: np.ndarray = field(init=False)
    prob_sum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}.")
        self.count = np.zeros(self.n_bins, dtype=np.int64)
        self.positives = np.zeros(self.n_bins, dtype=np.int64)
        self.prob_sum = np.zeros(self.n_bins, dtype=np.float64)

    def update(self, prob: np.ndarray, target: np.ndarray) -> CalibrationAccumulator:
        """Add voxels.

        Args:
            prob: Foreground probability p, any shape, values in [0, 1].
            target: 0/1 organ mask of the same shape.

        Returns:
            self, for chaining.

        Raises:
            ValueError: shapes differ, p outside [0, 1] or NaN, target not 0/1.
        """
        check_same_shape(prob=prob, target=target)
        for p, t in flat_chunks(np.asarray(prob), np.asarray(target)):
            check_probability(p)
            self._add(p, as_bool_mask(t, "target"))
        return self

    def _add(self, p: np.ndarray, t: np.ndarray) -> None:
        """Add one validated flat chunk (p float, t bool)."""
        n = self.n_bins
        idx = bin_index(p, n)
        both = np.bincount(idx * 2 + t, minlength=2 * n).reshape(n, 2)
        self.count += both.sum(axis=1)
        self.positives += both[:, 1]
        self.prob_sum += np.bincount(idx, weights=p, minlength=n)

    def merge(self, other: CalibrationAccumulator) -> CalibrationAccumulator:
        """Add the bins of ``other`` (same n_bins); returns self."""
        if other.n_bins != self.n_bins:
            raise ValueError(f"Cannot merge {other.n_bins} bins into {self.n_bins} bins.")
        self.count += other.count
        self.positives += other.positives
        self.prob_sum += other.prob_sum
        return self

    @property
    def total(self) -> int:
        """N, the number of voxels seen."""
        return int(self.count.sum())

    def _gaps(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.abs(self.positives - self.prob_sum) / self.count

    def ece(self) -> float:
        """Expected calibration error; NaN when no voxel was seen."""
        total = self.total
        if total == 0:
            return float("nan")
        return float(np.abs(self.positives - self.prob_sum).sum() / total)

    def mce(self) -> float:
        """Maximum calibration error over non-empty bins; NaN when no voxel was seen."""
        gaps = self._gaps()[self.count > 0]
        return float(gaps.max()) if gaps.size else float("nan")

    def reliability(self) -> ReliabilityBins:
        """Per-bin confidence and accuracy for a reliability diagram."""
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(self.count > 0, self.prob_sum / self.count, np.nan)
            acc = np.where(self.count > 0, self.positives / self.count, np.nan)
        return ReliabilityBins(
            edges=np.arange(self.n_bins + 1, dtype=np.float64) / self.n_bins,
            count=self.count.copy(),
            confidence=conf,
            accuracy=acc,
        )

    @classmethod
    def from_reliability(cls, bins: ReliabilityBins) -> CalibrationAccumulator:
        """Rebuild the sums from stored reliability bins (to pool saved runs)."""
        acc = cls(n_bins=len(bins.count))
        acc.count = np.asarray(bins.count, dtype=np.int64).copy()
        with np.errstate(invalid="ignore"):
            acc.positives = np.rint(np.nan_to_num(bins.accuracy) * acc.count).astype(np.int64)
        acc.prob_sum = np.nan_to_num(bins.confidence) * acc.count
        return acc


def expected_calibration_error(
    prob: np.ndarray, target: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width bins.

    Args:
        prob: Foreground probability, any shape.
        target: 0/1 mask, same shape.
        n_bins: Number of bins.
    """
    return CalibrationAccumulator(n_bins).update(prob, target).ece()


def maximum_calibration_error(
    prob: np.ndarray, target: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """MCE = max over non-empty bins of |acc_b - conf_b|.

    Args:
        prob: Foreground probability, any shape.
        target: 0/1 mask, same shape.
        n_bins: Number of bins.
    """
    return CalibrationAccumulator(n_bins).update(prob, target).mce()
