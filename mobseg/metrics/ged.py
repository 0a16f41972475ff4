"""Generalised energy distance and sample diversity (SSN definitions; SPEC section 6).

With model samples S, S' and reference masks Y, Y' of one case and the
distance d(A, B) = 1 - IoU(A, B) of the organ masks (IoU of two empty masks
= 1, so d = 0):

    GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')].

E[d(S, Y)] averages all sample/reference pairs. E[d(S, S')] (the *sample
diversity*) and E[d(Y, Y')] (the reference diversity) average distinct pairs
only (i != j). With a single mask there is no distinct pair: its diversity is
reported as NaN and enters GED^2 as 0 (a single mask has no spread).

With distinct pairs in the self terms every term is an unbiased estimate, so
GED^2 estimates the population value without bias, but a single case's
estimate can be slightly negative for small sets (e.g. the same two masks as
samples and references give 2 * 0.5 - 1 - 1 = -1).

The *diversity ratio* E[d(S, S')] / E[d(Y, Y')] compares the spread of the
model's samples with the annotators' (1 = the same spread; NaN when either
is undefined or the annotators agree perfectly).

Only intersection counts are needed, so :class:`OverlapAccumulator` streams
any number of masks chunk by chunk and keeps an m x m integer matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from mobseg.metrics._common import as_bool_mask, check_same_shape, flat_chunks


@dataclass
class GedResult:
    """GED^2 and its terms for one case.

    Attributes:
        ged2: 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')].
        cross: E[d(S, Y)] over all sample/reference pairs.
        diversity: E[d(S, S')] over distinct sample pairs (NaN for one sample).
        reference_diversity: E[d(Y, Y')] over distinct reference pairs (NaN for one).
        n_samples: number of samples.
        n_references: number of references.
    """

    ged2: float
    cross: float
    diversity: float
    reference_diversity: float
    n_samples: int
    n_references: int


@dataclass
class OverlapAccumulator:
    """Streaming pairwise intersections of m binary masks.

    Args:
        n_masks: m, number of masks passed to every update.

    Attributes:
        inter: (m, m) int64; inter[i, j] = |A_i and A_j|, inter[i, i] = |A_i|.
    """

    n_masks: int
    inter: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.n_masks < 1:
            raise ValueError(f"n_masks must be >= 1, got {self.n_masks}.")
        self.inter = np.zeros((self.n_masks, self.n_masks), dtype=np.int64)

    def update(self, masks: Sequence[np.ndarray]) -> OverlapAccumulator:
        """Add voxels of all masks (same shape, 0/1 or bool).

        Args:
            masks: m arrays of one shape.

        Returns:
            self.
        """
        if len(masks) != self.n_masks:
            raise ValueError(f"Expected {self.n_masks} masks, got {len(masks)}.")
        check_same_shape(**{f"mask{i}": np.asarray(m) for i, m in enumerate(masks)})
        for chunk in flat_chunks(*[np.asarray(m) for m in masks]):
            self._add([as_bool_mask(c, "mask") for c in chunk])
        return self

    def _add(self, b: Sequence[np.ndarray]) -> None:
        """Add one flat chunk of every mask (bool)."""
        for i in range(self.n_masks):
            self.inter[i, i] += int(np.count_nonzero(b[i]))
        for i, j in combinations(range(self.n_masks), 2):
            v = int(np.count_nonzero(b[i] & b[j]))
            self.inter[i, j] += v
            self.inter[j, i] += v

    def distance(self) -> np.ndarray:
        """(m, m) matrix of d = 1 - IoU (0 for two empty masks)."""
        size = np.diag(self.inter).astype(np.float64)
        union = size[:, None] + size[None, :] - self.inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, self.inter / union, 1.0)
        return 1.0 - iou


def _mean_distinct(d: np.ndarray) -> float:
    m = d.shape[0]
    if m < 2:
        return float("nan")
    return float((d.sum() - np.trace(d)) / (m * (m - 1)))


def ged_from_distances(dist: np.ndarray, n_samples: int) -> GedResult:
    """GED^2 from the distance matrix of [samples..., references...].

    Args:
        dist: (m, m) distances, the first ``n_samples`` rows are samples.
        n_samples: number of samples (>= 1); the rest are references (>= 1).
    """
    m = dist.shape[0]
    n_ref = m - n_samples
    if n_samples < 1 or n_ref < 1:
        raise ValueError(f"Need >= 1 sample and >= 1 reference, got {n_samples} and {n_ref}.")
    d_ss = dist[:n_samples, :n_samples]
    d_yy = dist[n_samples:, n_samples:]
    cross = float(dist[:n_samples, n_samples:].mean())
    div = _mean_distinct(d_ss)
    ref_div = _mean_distinct(d_yy)
    ged2 = 2 * cross - (0.0 if np.isnan(div) else div) - (0.0 if np.isnan(ref_div) else ref_div)
    return GedResult(ged2, cross, div, ref_div, n_samples, n_ref)


def diversity_ratio(diversity: float, reference_diversity: float) -> float:
    """Sample diversity over annotator diversity (NaN when undefined or divided by 0).

    Args:
        diversity: E[d(S, S')] of the model's samples.
        reference_diversity: E[d(Y, Y')] of the reference masks.
    """
    if not (np.isfinite(diversity) and np.isfinite(reference_diversity)):
        return float("nan")
    return float(diversity) / float(reference_diversity) if reference_diversity else float("nan")


def iou_distance(a: np.ndarray, b: np.ndarray) -> float:
    """d(A, B) = 1 - |A and B| / |A or B|; 0 when both masks are empty.

    Args:
        a: 0/1 mask, any shape.
        b: 0/1 mask, same shape.
    """
    return float(OverlapAccumulator(2).update([a, b]).distance()[0, 1])


def generalized_energy_distance(
    samples: Sequence[np.ndarray], references: Sequence[np.ndarray]
) -> GedResult:
    """GED^2 and diversities of ``samples`` against ``references`` (one case).

    Args:
        samples: >= 1 predicted masks, one shape.
        references: >= 1 reference masks, same shape.

    Returns:
        The :class:`GedResult`.
    """
    masks = [*samples, *references]
    if not samples or not references:
        raise ValueError(
            f"Need >= 1 sample and >= 1 reference, got {len(samples)} and {len(references)}."
        )
    acc = OverlapAccumulator(len(masks)).update(masks)
    return ged_from_distances(acc.distance(), len(samples))
