"""NLL, Brier and entropy against torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mobseg.metrics.probabilistic import (
    ProbabilisticAccumulator,
    binary_entropy,
    brier_score,
    negative_log_likelihood,
)


def _torch_nll(prob: np.ndarray, target: np.ndarray) -> float:
    p = torch.from_numpy(prob.astype(np.float64)).reshape(-1)
    probs = torch.stack([1 - p, p], dim=1).clamp_min(1e-8)
    return float(F.nll_loss(torch.log(probs), torch.from_numpy(target.reshape(-1)).long()))


def _torch_brier(prob: np.ndarray, target: np.ndarray) -> float:
    p = torch.from_numpy(prob.astype(np.float64)).reshape(-1)
    probs = torch.stack([1 - p, p], dim=1)
    onehot = F.one_hot(torch.from_numpy(target.reshape(-1)).long(), 2).double()
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nll_and_brier_equal_torch(seed: int) -> None:
    rng = np.random.default_rng(seed)
    prob = rng.random((6, 9, 10)).astype(np.float32)
    prob.flat[:5] = [0.0, 1.0, 1e-12, 1 - 1e-7, 0.5]  # exercise the 1e-8 floor
    target = (rng.random(prob.shape) < 0.4).astype(np.uint8)
    assert negative_log_likelihood(prob, target) == pytest.approx(
        _torch_nll(prob, target), rel=1e-5
    )
    assert brier_score(prob, target) == pytest.approx(_torch_brier(prob, target), rel=1e-6)


def test_known_values() -> None:
    target = np.array([[0, 1, 1], [0, 0, 1]], dtype=np.uint8)
    perfect = target.astype(np.float32)
    assert negative_log_likelihood(perfect, target) == 0.0
    assert brier_score(perfect, target) == 0.0
    inverted = 1 - perfect
    assert negative_log_likelihood(inverted, target) == pytest.approx(-math.log(1e-8), rel=1e-6)
    assert brier_score(inverted, target) == pytest.approx(2.0)
    half = np.full(target.shape, 0.5, dtype=np.float32)
    assert negative_log_likelihood(half, target) == pytest.approx(math.log(2))
    assert brier_score(half, target) == pytest.approx(0.5)


def test_streamed_equals_all_at_once() -> None:
    rng = np.random.default_rng(4)
    prob = rng.random(5000).astype(np.float32)
    target = (rng.random(5000) < prob).astype(np.uint8)
    whole = ProbabilisticAccumulator().update(prob, target)
    parts = ProbabilisticAccumulator()
    for sl in np.array_split(np.arange(5000), 6):
        parts.merge(ProbabilisticAccumulator().update(prob[sl], target[sl]))
    assert parts.n == whole.n == 5000
    assert parts.nll() == pytest.approx(whole.nll(), rel=1e-12)
    assert parts.brier() == pytest.approx(whole.brier(), rel=1e-12)


def test_binary_entropy_equals_torch_bernoulli() -> None:
    p = np.array([0.0, 1e-6, 0.1, 0.5, 0.9, 1.0], dtype=np.float32)
    expected = torch.distributions.Bernoulli(probs=torch.from_numpy(p).double()).entropy()
    np.testing.assert_allclose(binary_entropy(p), expected.numpy(), atol=1e-6)


def test_empty_gives_nan_and_shape_error_names_shapes() -> None:
    acc = ProbabilisticAccumulator()
    assert math.isnan(acc.nll()) and math.isnan(acc.brier())
    with pytest.raises(ValueError, match=r"prob \(3,\), target \(4,\)"):
        negative_log_likelihood(np.zeros(3), np.zeros(4))
