"""Dice against a brute-force version."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mobseg.metrics.dice import DiceAccumulator, dice, segmentation_from_probability


def _brute_dice(seg: np.ndarray, target: np.ndarray) -> float:
    inter = total = 0
    for s, t in zip(seg.reshape(-1).tolist(), target.reshape(-1).tolist(), strict=True):
        inter += int(s and t)
        total += int(bool(s)) + int(bool(t))
    return 2 * inter / total if total else math.nan


@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seg = rng.random((5, 6, 7)) < 0.3
    target = (rng.random((5, 6, 7)) < 0.25).astype(np.uint8)
    assert dice(seg, target) == pytest.approx(_brute_dice(seg, target))


def test_known_values_and_empty_masks() -> None:
    t = np.zeros((3, 4), dtype=np.uint8)
    assert math.isnan(dice(t, t))  # both empty: undefined
    t[1, 1:3] = 1
    assert dice(t, t) == 1.0
    assert dice(1 - t, t) == 0.0
    assert dice(np.zeros_like(t), t) == 0.0


def test_argmax_of_probability_breaks_ties_to_background() -> None:
    p = np.array([0.49, 0.5, 0.51])
    assert segmentation_from_probability(p).tolist() == [False, False, True]


def test_streamed_merge_equals_whole() -> None:
    rng = np.random.default_rng(9)
    seg = rng.random(1000) < 0.5
    target = rng.random(1000) < 0.5
    acc = DiceAccumulator()
    for sl in np.array_split(np.arange(1000), 5):
        acc.merge(DiceAccumulator().update(seg[sl], target[sl]))
    assert acc.compute() == pytest.approx(dice(seg, target))


def test_shape_and_value_errors() -> None:
    with pytest.raises(ValueError, match=r"seg \(2, 2\), target \(4,\)"):
        dice(np.zeros((2, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        dice(np.array([0, 1]), np.array([0, 3]))
