"""Error of p against the phantom's true probability p*, against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mobseg.metrics.phantom import ProbabilityErrorAccumulator, probability_error


def test_equals_brute_force_and_streams() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((4, 5, 6)).astype(np.float32)
    q = rng.random((4, 5, 6)).astype(np.float32)
    diffs = [float(a) - float(b) for a, b in zip(p.ravel(), q.ravel(), strict=True)]
    mae = sum(abs(d) for d in diffs) / len(diffs)
    rmse = math.sqrt(sum(d * d for d in diffs) / len(diffs))
    assert probability_error(p, q) == (pytest.approx(mae), pytest.approx(rmse))
    acc = ProbabilityErrorAccumulator()
    for sl in np.array_split(np.arange(p.size), 3):
        acc.merge(ProbabilityErrorAccumulator().update(p.ravel()[sl], q.ravel()[sl]))
    assert acc.mae() == pytest.approx(mae) and acc.rmse() == pytest.approx(rmse)


def test_perfect_is_zero_and_empty_is_nan() -> None:
    p = np.linspace(0, 1, 11)
    assert probability_error(p, p) == (0.0, 0.0)
    assert math.isnan(ProbabilityErrorAccumulator().mae())


def test_rejects_invalid_true_probability() -> None:
    with pytest.raises(ValueError, match=r"true probability p\* must lie in \[0, 1\]"):
        probability_error(np.array([0.5]), np.array([1.5]))


def test_ambiguity_band_is_strict_open_interval() -> None:
    from mobseg.metrics.phantom import ambiguity_band

    q = np.array([0.0, 0.01, 0.0100001, 0.5, 0.9899999, 0.99, 1.0])
    assert ambiguity_band(q).tolist() == [False, False, True, True, True, False, False]
