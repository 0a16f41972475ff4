"""Dice overlap of a binary segmentation with its reference (SPEC section 6).

Dice = 2 |S and G| / (|S| + |G|), with S the predicted organ mask (the argmax of
the mean probability, i.e. ``p > 0.5`` for one organ) and G the reference
mask. When both masks are empty the Dice is undefined: it is NaN, excluded from
means, and counted separately (``n_nan_dice``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mobseg.metrics._common import as_bool_mask, check_same_shape, flat_chunks


def segmentation_from_probability(prob: np.ndarray) -> np.ndarray:
    """S = argmax of (1 - p, p) per voxel, i.e. ``p > 0.5`` (a tie goes to background).

    Args:
        prob: Foreground probability, any shape.

    Returns:
        Bool array of the same shape.
    """
    return np.asarray(prob) > 0.5


@dataclass
class DiceAccumulator:
    """Streaming Dice of one case: counts |S and G|, |S| and |G| chunk by chunk.

    Attributes:
        intersection: |S and G| so far.
        n_pred: |S| so far.
        n_true: |G| so far.
    """

    intersection: int = 0
    n_pred: int = 0
    n_true: int = 0

    def update(self, seg: np.ndarray, target: np.ndarray) -> DiceAccumulator:
        """Add voxels.

        Args:
            seg: Predicted mask S (bool or 0/1), any shape.
            target: Reference mask G (bool or 0/1), same shape.

        Returns:
            self, for chaining.
        """
        check_same_shape(seg=seg, target=target)
        for s, t in flat_chunks(np.asarray(seg), np.asarray(target)):
            s = as_bool_mask(s, "segmentation")
            t = as_bool_mask(t, "target")
            self.intersection += int(np.count_nonzero(s & t))
            self.n_pred += int(np.count_nonzero(s))
            self.n_true += int(np.count_nonzero(t))
        return self

    def merge(self, other: DiceAccumulator) -> DiceAccumulator:
        """Add the counts of ``other`` (pooled, 'global' Dice); returns self."""
        self.intersection += other.intersection
        self.n_pred += other.n_pred
        self.n_true += other.n_true
        return self

    def compute(self) -> float:
        """Dice in [0, 1]; NaN when both masks are empty."""
        denom = self.n_pred + self.n_true
        return 2.0 * self.intersection / denom if denom else float("nan")


def dice(seg: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary masks of one shape; NaN when both are empty.

    Args:
        seg: Predicted mask S, bool or 0/1, any shape.
        target: Reference mask G, same shape.

    Returns:
        2 |S and G| / (|S| + |G|).

    Raises:
        ValueError: shapes differ or a mask holds values other than 0/1.
    """
    return DiceAccumulator().update(seg, target).compute()
