"""GED^2 and diversity against brute force, on random and on real masks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mobseg.metrics.ged import OverlapAccumulator, generalized_energy_distance, iou_distance


def _d(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool).ravel().tolist(), b.astype(bool).ravel().tolist()
    inter = sum(x and y for x, y in zip(a, b, strict=True))
    union = sum(x or y for x, y in zip(a, b, strict=True))
    return 0.0 if union == 0 else 1 - inter / union


def _brute_ged(samples: list[np.ndarray], refs: list[np.ndarray]) -> tuple[float, float, float]:
    cross = sum(_d(s, y) for s in samples for y in refs) / (len(samples) * len(refs))

    def distinct(ms: list[np.ndarray]) -> float:
        pairs = [(i, j) for i in range(len(ms)) for j in range(len(ms)) if i != j]
        return sum(_d(ms[i], ms[j]) for i, j in pairs) / len(pairs) if pairs else math.nan

    ss, yy = distinct(samples), distinct(refs)
    ged = 2 * cross - (0 if math.isnan(ss) else ss) - (0 if math.isnan(yy) else yy)
    return ged, ss, yy


@pytest.mark.parametrize(("n_s", "n_r"), [(1, 2), (3, 2), (4, 3)])
def test_equals_brute_force(n_s: int, n_r: int) -> None:
    rng = np.random.default_rng(n_s * 10 + n_r)
    base = rng.random((4, 5, 6))
    samples = [(base + 0.2 * rng.random(base.shape)) > 0.7 for _ in range(n_s)]
    refs = [((base + 0.3 * rng.random(base.shape)) > 0.75).astype(np.uint8) for _ in range(n_r)]
    got = generalized_energy_distance(samples, refs)
    ged, ss, yy = _brute_ged(samples, refs)
    assert got.ged2 == pytest.approx(ged)
    assert got.reference_diversity == pytest.approx(yy)
    if n_s == 1:
        assert math.isnan(got.diversity)
    else:
        assert got.diversity == pytest.approx(ss)
    assert (got.n_samples, got.n_references) == (n_s, n_r)


def test_empty_masks_have_iou_one_and_distinct_pair_convention() -> None:
    empty = np.zeros((3, 3), dtype=np.uint8)
    assert iou_distance(empty, empty) == 0.0
    full = np.ones((3, 3), dtype=np.uint8)
    assert iou_distance(empty, full) == 1.0
    # Same two masks as samples and references: the cross term averages all 4 pairs
    # (0.5) but the diversities average distinct pairs only (1 each), so the unbiased
    # estimate is 2 * 0.5 - 1 - 1 = -1: it can be negative for small sets.
    got = generalized_energy_distance([empty, full], [empty, full])
    assert (got.cross, got.diversity, got.reference_diversity) == (0.5, 1.0, 1.0)
    assert got.ged2 == pytest.approx(-1.0)


def test_streaming_in_pieces_equals_whole() -> None:
    rng = np.random.default_rng(1)
    masks = [rng.random(3000) < 0.4 for _ in range(4)]
    whole = OverlapAccumulator(4).update(masks)
    parts = OverlapAccumulator(4)
    for sl in np.array_split(np.arange(3000), 4):
        parts.update([m[sl] for m in masks])
    np.testing.assert_array_equal(whole.inter, parts.inter)


def test_errors_name_shapes_and_counts() -> None:
    with pytest.raises(ValueError, match=r"mask0 \(3,\), mask1 \(4,\)"):
        generalized_energy_distance([np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ValueError, match="Need >= 1 sample"):
        generalized_energy_distance([], [np.zeros(4)])


def test_real_two_raters_of_the_example(totalseg_example: Path) -> None:
    """The shared CT's two segmentations act as two raters of the pancreas."""
    first = sitk.GetArrayFromImage(
        sitk.ReadImage(str(totalseg_example / "s0000/segmentations/pancreas.nii.gz"))
    )
    multi = totalseg_example / "reference/s0000_total_multilabel.nii.gz"
    labels = json.loads(multi.with_name("s0000_total_multilabel.labels.json").read_text())
    value = next(int(k) for k, v in labels.items() if v == "pancreas")
    second = (sitk.GetArrayFromImage(sitk.ReadImage(str(multi))) == value).astype(np.uint8)
    # SOURCE.md: Dice 0.81 between the raters, i.e. d = 1 - IoU = 1 - 0.81 / 1.19
    d = iou_distance(first, second)
    assert d == pytest.approx(1 - 0.81 / (2 - 0.81), abs=0.01)
    # A model that predicts rater 1 exactly: GED^2 = 2 * d / 2 - d = 0 against both raters.
    got = generalized_energy_distance([first], [first, second])
    assert got.cross == pytest.approx(d / 2)
    assert got.ged2 == pytest.approx(0.0, abs=1e-12)
    # The union of both raters lies 'between' them: d(U, A) + d(U, B) = d(A, B) exactly.
    union = (first | second).astype(np.uint8)
    assert generalized_energy_distance([union], [first, second]).ged2 == pytest.approx(0.0)
    # A prediction shifted by 3 voxels (9 mm) is farther from both raters.
    shifted = np.roll(first, 3, axis=2)
    expected = _d(shifted, first) + _d(shifted, second) - d
    got = generalized_energy_distance([shifted], [first, second]).ged2
    assert got == pytest.approx(expected) and got > 0.3


def test_diversity_ratio() -> None:
    from mobseg.metrics.ged import diversity_ratio

    assert diversity_ratio(0.1, 0.25) == pytest.approx(0.4)
    assert math.isnan(diversity_ratio(float("nan"), 0.25))  # one sample: no diversity
    assert math.isnan(diversity_ratio(0.1, 0.0))  # annotators agree: undefined
