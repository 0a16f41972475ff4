"""Var[p] against the annotators' variance p*(1 - p*): against scipy and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr

from mobseg.metrics.variance_match import (
    VarianceMatchAccumulator,
    annotator_variance,
    variance_correlation,
    variance_ratio,
)


def _data(seed: int, shape: tuple[int, ...] = (6, 7, 8)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.random(shape).astype(np.float32)
    v = (q * (1 - q) * rng.uniform(0.2, 0.6, shape) + rng.uniform(0, 1e-3, shape)).astype(
        np.float32
    )
    return v, q


def test_correlation_and_ratio_equal_scipy_and_numpy() -> None:
    v, q = _data(0)
    a = q.astype(np.float64) * (1 - q.astype(np.float64))
    assert variance_correlation(v, q) == pytest.approx(pearsonr(v.ravel(), a.ravel())[0], rel=1e-9)
    assert variance_ratio(v, q) == pytest.approx(v.astype(np.float64).mean() / a.mean(), rel=1e-9)
    np.testing.assert_allclose(annotator_variance(q), a)


def test_streamed_equals_all_at_once_even_for_tiny_offset_variances() -> None:
    v, q = _data(1)
    v = v * 1e-4 + np.float32(1e-3)  # small spread on a large offset: naive sums cancel
    whole = VarianceMatchAccumulator().update(v, q)
    parts = VarianceMatchAccumulator()
    for sl in np.array_split(np.arange(v.size), 7):
        parts.merge(VarianceMatchAccumulator().update(v.ravel()[sl], q.ravel()[sl]))
    a = q.astype(np.float64) * (1 - q.astype(np.float64))
    ref = pearsonr(v.ravel().astype(np.float64), a.ravel())[0]
    assert whole.correlation() == pytest.approx(ref, rel=1e-9)
    assert parts.correlation() == pytest.approx(ref, rel=1e-9)
    assert parts.ratio() == pytest.approx(whole.ratio(), rel=1e-12)
    np.testing.assert_array_equal(parts.bin_count, whole.bin_count)
    np.testing.assert_allclose(parts.bin_v, whole.bin_v, rtol=1e-12)


def test_binned_curve_against_brute_force() -> None:
    v, q = _data(2)
    acc = VarianceMatchAccumulator(n_bins=5).update(v, q)
    curve = acc.curve()
    a = q.astype(np.float64).ravel() * (1 - q.astype(np.float64).ravel())
    vv = v.astype(np.float64).ravel()
    edges = np.linspace(0, 0.25, 6)
    assert curve["edges"] == pytest.approx(list(edges))
    for b in range(5):
        inside = (a >= edges[b]) & ((a < edges[b + 1]) if b < 4 else (a <= edges[b + 1]))
        assert curve["count"][b] == int(inside.sum())
        if inside.any():
            assert curve["model_variance"][b] == pytest.approx(vv[inside].mean())
            assert curve["annotator_variance"][b] == pytest.approx(a[inside].mean())
        else:
            assert curve["model_variance"][b] is None
    assert sum(curve["count"]) == v.size


def test_perfect_match_zero_model_and_empty() -> None:
    q = np.linspace(0.02, 0.98, 50)
    a = q * (1 - q)
    assert variance_correlation(a, q) == pytest.approx(1.0)
    assert variance_ratio(a, q) == pytest.approx(1.0)
    assert variance_ratio(0.5 * a, q) == pytest.approx(0.5)
    assert variance_correlation(0.5 * a, q) == pytest.approx(1.0)
    zero = np.zeros_like(q)
    assert math.isnan(variance_correlation(zero, q))  # a deterministic model: no spread
    assert variance_ratio(zero, q) == 0.0
    assert math.isnan(variance_ratio(zero, np.zeros_like(q)))  # certain truth: mean a = 0
    assert math.isnan(VarianceMatchAccumulator().correlation())
    assert math.isnan(VarianceMatchAccumulator().ratio())


def test_errors_name_the_arrays() -> None:
    with pytest.raises(ValueError, match=r"variance \(2,\), true_prob \(3,\)"):
        variance_ratio(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="variance must be >= 0"):
        variance_ratio(np.array([-1.0]), np.array([0.5]))
    with pytest.raises(ValueError, match="Cannot merge 5 bins into 10 bins"):
        VarianceMatchAccumulator().merge(VarianceMatchAccumulator(n_bins=5))
