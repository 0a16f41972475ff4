"""ECE, MCE and reliability bins against torchmetrics and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError

from mobseg.metrics.calibration import (
    CalibrationAccumulator,
    ReliabilityBins,
    bin_index,
    expected_calibration_error,
    maximum_calibration_error,
)


def _torchmetrics(prob: np.ndarray, target: np.ndarray, norm: str) -> float:
    metric = BinaryCalibrationError(n_bins=15, norm=norm)
    metric.update(torch.from_numpy(prob), torch.from_numpy(target.astype(np.int64)))
    return float(metric.compute())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_torchmetrics_l1_and_max(dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    prob = rng.random((7, 11, 13)).astype(dtype)
    target = (rng.random(prob.shape) < prob**1.7).astype(np.uint8)  # miscalibrated
    assert expected_calibration_error(prob, target) == pytest.approx(
        _torchmetrics(prob, target, "l1"), abs=1e-6
    )
    assert maximum_calibration_error(prob, target) == pytest.approx(
        _torchmetrics(prob, target, "max"), abs=1e-6
    )


def test_skewed_realistic_distribution_equals_torchmetrics_float64() -> None:
    # Most voxels near 0, a few near 1, as in a segmentation.
    rng = np.random.default_rng(3)
    prob = np.concatenate([rng.beta(0.3, 20, 20000), rng.beta(8, 1, 800)])
    target = (rng.random(prob.size) < prob).astype(np.uint8)
    assert expected_calibration_error(prob, target) == pytest.approx(
        _torchmetrics(prob, target, "l1"), rel=1e-9
    )
    assert maximum_calibration_error(prob, target) == pytest.approx(
        _torchmetrics(prob, target, "max"), rel=1e-9
    )


def test_value_one_goes_to_last_bin_unlike_torchmetrics_16th_bin() -> None:
    # SPEC: the last bin is closed at 1. torchmetrics gives 1.0 a 16th bin of its
    # own; moving 1.0 one ulp down puts it into torchmetrics' last regular bin,
    # which must then agree with our treatment of 1.0.
    prob = np.array([1.0, 1.0, 0.95, 0.2, 0.1], dtype=np.float32)
    target = np.array([0, 1, 1, 0, 1], dtype=np.uint8)
    below = prob.copy()
    below[below == 1.0] = np.nextafter(np.float32(1), np.float32(0))
    ours = expected_calibration_error(prob, target)
    assert ours == pytest.approx(_torchmetrics(below, target, "l1"), abs=1e-6)
    assert ours != pytest.approx(_torchmetrics(prob, target, "l1"), abs=1e-3)
    # hand-computed: bin 14 = {1, 1, 0.95}: conf 0.98333, acc 2/3; bin 1 = {0.1}: 0.1 vs 1;
    # bin 3 = {0.2}: 0.2 vs 0.
    expected = (3 * abs(2 / 3 - 2.95 / 3) + abs(1 - 0.1) + abs(0 - 0.2)) / 5
    assert ours == pytest.approx(expected, abs=1e-6)


def test_edges_go_to_the_bin_that_starts_there() -> None:
    edges = np.arange(16, dtype=np.float64) / 15
    assert bin_index(edges).tolist() == [*range(15), 14]
    just_below = np.nextafter(edges[1:], 0)
    assert bin_index(just_below).tolist() == list(range(15))
    e32 = (np.arange(16) / 15).astype(np.float32)
    # float32 values: floor(15 p) in float64 is exact, so p >= i/15 exactly.
    expected = [int(np.floor(np.float64(v) * 15)) for v in e32]
    assert bin_index(e32).tolist() == [min(e, 14) for e in expected]


def test_known_values_perfect_inverted_constant() -> None:
    target = np.zeros((4, 5, 6), dtype=np.uint8)
    target[1:3, 1:4, 2:5] = 1
    perfect = target.astype(np.float32)
    assert expected_calibration_error(perfect, target) == 0.0
    assert maximum_calibration_error(perfect, target) == 0.0
    inverted = 1.0 - perfect
    assert expected_calibration_error(inverted, target) == pytest.approx(1.0)
    assert maximum_calibration_error(inverted, target) == pytest.approx(1.0)
    half = np.full(target.shape, 0.5, dtype=np.float32)
    frac = target.mean()
    assert expected_calibration_error(half, target) == pytest.approx(abs(frac - 0.5))
    assert maximum_calibration_error(half, target) == pytest.approx(abs(frac - 0.5))


def test_streamed_pieces_equal_all_at_once() -> None:
    rng = np.random.default_rng(5)
    prob = rng.random(10_000).astype(np.float32)
    target = (rng.random(10_000) < 0.3).astype(np.uint8)
    whole = CalibrationAccumulator().update(prob, target)
    parts = CalibrationAccumulator()
    for piece in np.array_split(np.arange(10_000), 7):
        parts.merge(CalibrationAccumulator().update(prob[piece], target[piece]))
    np.testing.assert_array_equal(whole.count, parts.count)
    np.testing.assert_array_equal(whole.positives, parts.positives)
    np.testing.assert_allclose(whole.prob_sum, parts.prob_sum, rtol=1e-12)
    assert whole.ece() == pytest.approx(parts.ece(), rel=1e-12)
    assert whole.total == 10_000


def test_reliability_bins_and_round_trip() -> None:
    prob = np.array([0.01, 0.02, 0.5, 0.52, 0.99], dtype=np.float64)
    target = np.array([0, 1, 1, 0, 1], dtype=np.uint8)
    acc = CalibrationAccumulator().update(prob, target)
    rel = acc.reliability()
    assert rel.count.tolist()[0] == 2 and rel.count.sum() == 5
    assert rel.confidence[0] == pytest.approx(0.015)
    assert rel.accuracy[0] == pytest.approx(0.5)
    assert np.isnan(rel.confidence[1])  # empty bin
    back = ReliabilityBins.from_dict(rel.to_dict())
    np.testing.assert_array_equal(back.count, rel.count)
    rebuilt = CalibrationAccumulator.from_reliability(back)
    assert rebuilt.ece() == pytest.approx(acc.ece(), rel=1e-12)
    assert rebuilt.mce() == pytest.approx(acc.mce(), rel=1e-12)


def test_empty_input_gives_nan() -> None:
    acc = CalibrationAccumulator()
    assert np.isnan(acc.ece()) and np.isnan(acc.mce())


@pytest.mark.parametrize(
    ("prob", "target", "message"),
    [
        (np.zeros((2, 3)), np.zeros((3, 2)), r"prob \(2, 3\), target \(3, 2\)"),
        (np.array([0.2, np.nan]), np.array([0, 1]), "NaN"),
        (np.array([0.2, 1.5]), np.array([0, 1]), r"\[0, 1\]"),
        (np.array([0.2, 0.5]), np.array([0, 2]), "only 0 and 1"),
        (np.array([1, 0]), np.array([0, 1]), "floating-point"),
    ],
)
def test_invalid_inputs_raise_value_error(
    prob: np.ndarray, target: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(prob, target)
