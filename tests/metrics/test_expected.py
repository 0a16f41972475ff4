"""NLL and Brier expected under the true law p*: against brute-force enumeration of labels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from mobseg.metrics import brier_score, negative_log_likelihood
from mobseg.metrics.expected import ExpectedScoreAccumulator, expected_brier, expected_nll


def _enumerated(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """E over every label configuration t ~ prod Bernoulli(q) of the existing NLL and Brier."""
    nll = brier = 0.0
    for bits in itertools.product((0, 1), repeat=p.size):
        t = np.array(bits, dtype=np.uint8)
        w = float(np.prod(np.where(t == 1, q.astype(np.float64), 1.0 - q)))
        nll += w * negative_log_likelihood(p, t)
        brier += w * brier_score(p, t)
    return nll, brier


def test_equals_the_expectation_over_all_label_configurations() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(9).astype(np.float32)
    q = rng.random(9).astype(np.float32)
    p[0], q[1], q[2], p[3] = 0.0, 0.0, 1.0, 1.0  # floors and certain voxels included
    nll, brier = _enumerated(p, q)
    assert expected_nll(p, q) == pytest.approx(nll, rel=1e-5)
    assert expected_brier(p, q) == pytest.approx(brier, rel=1e-5)


def test_closed_forms_and_streaming() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((5, 6, 7))
    q = rng.random((5, 6, 7))
    brute_nll = np.mean(-(q * np.log(p) + (1 - q) * np.log(1 - p)))
    brute_brier = np.mean(2 * ((p - q) ** 2 + q * (1 - q)))
    assert expected_nll(p, q) == pytest.approx(brute_nll)
    assert expected_brier(p, q) == pytest.approx(brute_brier)
    acc = ExpectedScoreAccumulator()
    for sl in np.array_split(np.arange(p.size), 4):
        acc.merge(ExpectedScoreAccumulator().update(p.ravel()[sl], q.ravel()[sl]))
    assert acc.n == p.size
    assert acc.nll() == pytest.approx(brute_nll) and acc.brier() == pytest.approx(brute_brier)


def test_perfect_model_reaches_the_true_entropy_and_label_variance() -> None:
    q = np.linspace(0, 1, 101)
    ent = np.mean([scipy_entropy([x, 1 - x]) for x in q])  # nats, 0 ln 0 = 0
    assert expected_nll(q, q) == pytest.approx(ent, rel=1e-6)  # float32 terms
    assert expected_brier(q, q) == pytest.approx(np.mean(2 * q * (1 - q)))
    # any other p is worse (Gibbs' inequality; Brier is strictly proper)
    worse = np.clip(q + 0.1, 0, 1)
    assert expected_nll(worse, q) > expected_nll(q, q)
    assert expected_brier(worse, q) > expected_brier(q, q)
    # certain truth: the expected scores are the scores against the one possible mask
    t = (q > 0.5).astype(np.uint8)
    p = np.full(q.shape, 0.3)
    assert expected_nll(p, t.astype(np.float64)) == pytest.approx(negative_log_likelihood(p, t))
    assert expected_brier(p, t.astype(np.float64)) == pytest.approx(brier_score(p, t))
    # a confident wrong voxel costs the floor: -ln 1e-8
    assert expected_nll(np.array([0.0]), np.array([1.0])) == pytest.approx(-math.log(1e-8))


def test_empty_is_nan_and_errors_name_the_arrays() -> None:
    assert math.isnan(ExpectedScoreAccumulator().nll())
    assert math.isnan(ExpectedScoreAccumulator().brier())
    with pytest.raises(ValueError, match=r"prob \(3,\), true_prob \(4,\)"):
        expected_nll(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match=r"true probability p\* must lie in \[0, 1\]"):
        expected_brier(np.array([0.5]), np.array([-0.5]))
