"""Monte-Carlo moments: exact chunked accumulation, quadrature oracle, numerics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from core_factories import build, random_params

from mobseg.core.distributions import DeterministicLogits, DiagonalLogits, LogitDistribution
from mobseg.core.inference import (
    MCMoments,
    mc_moments,
    mutual_information,
    predictive_entropy,
    probability_variance,
)


class Scripted(LogitDistribution):
    """Hands out pre-drawn samples in order and records every request size."""

    def __init__(self, samples: torch.Tensor) -> None:
        super().__init__(samples.mean(0))
        self.samples = samples
        self.requests: list[int] = []

    def rsample(self, k, antithetic=False, generator=None):
        start = sum(self.requests)
        self.requests.append(k)
        return self.samples[start : start + k]


@pytest.mark.parametrize("spatial", [(4, 3, 5), (6, 7)], ids=["3d", "2d"])
def test_chunked_moments_equal_brute_force(spatial) -> None:
    torch.manual_seed(0)
    samples = torch.randn(7, 2, 3, *spatial, dtype=torch.float64) * 4
    dist = Scripted(samples)
    m = mc_moments(dist, k=7, chunk=3)
    assert dist.requests == [3, 3, 1]  # never more than `chunk` samples in memory
    p = torch.softmax(samples, 2)
    torch.testing.assert_close(m.mean_p, p.mean(0))
    torch.testing.assert_close(m.mean_p2, (p**2).mean(0))
    ent = torch.distributions.Categorical(logits=samples.movedim(2, -1)).entropy()  # (k, B, *sp)
    assert m.mean_entropy.shape == (2, 1, *spatial)
    torch.testing.assert_close(m.mean_entropy[:, 0], ent.mean(0))
    assert m.samples == 7


def test_moments_match_gauss_hermite_quadrature() -> None:
    """C = 2, diagonal: delta = eta_1 - eta_0 ~ N(mu_1 - mu_0, d_0 + d_1), p_1 = sigmoid(delta)."""
    mu = torch.tensor([[[[-2.0, 0.3, 1.5]], [[0.5, 0.0, -1.0]]]])  # (1, 2, 1, 3)
    var = torch.tensor([[[[0.5, 2.0, 0.1]], [[1.0, 0.5, 3.0]]]])
    k = 20_000
    m = mc_moments(
        DiagonalLogits(mu, var), k, chunk=4000, generator=torch.Generator().manual_seed(0)
    )
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    for n in range(3):
        mean = float(mu[0, 1, 0, n] - mu[0, 0, 0, n])
        sd = math.sqrt(float(var[0, 0, 0, n] + var[0, 1, 0, n]))
        p1 = 1 / (1 + np.exp(-(mean + sd * x)))
        h = -(p1 * np.log(p1) + (1 - p1) * np.log1p(-p1))
        for got, f in [
            (m.mean_p[0, 1, 0, n], p1),
            (m.mean_p2[0, 1, 0, n], p1**2),
            (m.mean_entropy[0, 0, 0, n], h),
        ]:
            want = float((w * f).sum())
            se = math.sqrt(float((w * (f - want) ** 2).sum()) / k)
            assert abs(float(got) - want) < 4 * se + 1e-9
        assert float(m.mean_p[0, 0, 0, n] + m.mean_p[0, 1, 0, n]) == pytest.approx(1.0)


def test_deterministic_is_evaluated_once_and_exactly() -> None:
    mu = torch.randn(2, 3, 4, 5, 6)
    m = mc_moments(DeterministicLogits(mu), k=30)
    p = torch.softmax(mu, 1)
    torch.testing.assert_close(m.mean_p, p)
    torch.testing.assert_close(m.mean_p2, p**2)
    assert float(m.variance().abs().max()) == pytest.approx(0.0, abs=1e-7)
    assert float(m.mutual_information().abs().max()) == pytest.approx(0.0, abs=1e-6)
    assert m.samples == 30


@pytest.mark.parametrize("method", ["lowrank", "single-basis", "mob"])
def test_structured_distributions_give_valid_moments(method) -> None:
    dist = build(method, random_params(method, 2, 3, (5, 4, 6), dtype=torch.float32))
    m = mc_moments(dist, k=25, chunk=10)
    torch.testing.assert_close(m.mean_p.sum(1), torch.ones(2, 5, 4, 6))
    assert (m.variance() >= 0).all() and (m.variance() <= 0.25 + 1e-6).all()
    assert (m.mutual_information() >= 0).all()
    assert (m.mean_entropy <= m.predictive_entropy() + 1e-5).all()  # Jensen
    assert float(m.mutual_information().max()) > 0


def test_extreme_logits_and_half_precision() -> None:
    mu = torch.tensor([1e4, -1e4, 0.0, 3.0]).view(1, 1, 2, 2)
    mu = torch.cat([torch.zeros_like(mu), mu], 1)  # (1, 2, 2, 2)
    var = torch.full_like(mu, 1e-3)
    m = mc_moments(DiagonalLogits(mu.half(), var.half()), k=8, chunk=3)
    assert m.mean_p.dtype == torch.float32
    for t in (m.mean_p, m.mean_p2, m.mean_entropy):
        assert torch.isfinite(t).all()
    assert float(m.mean_p[0, 1, 0, 0]) == 1.0 and float(m.mean_p[0, 1, 0, 1]) == 0.0
    assert float(m.mean_entropy[0, 0, 0, 0]) == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m2 = mc_moments(DiagonalLogits(mu * 5, var), k=4)
    assert torch.isfinite(m2.mean_entropy).all()


def test_derived_quantities() -> None:
    uniform = torch.full((1, 4, 2, 2), 0.25)
    torch.testing.assert_close(predictive_entropy(uniform), torch.full((1, 1, 2, 2), math.log(4)))
    assert predictive_entropy(torch.tensor([[1.0, 0.0]]).view(1, 2, 1)).item() == 0.0
    # Rounding below zero is clamped.
    assert float(probability_variance(torch.tensor([0.5]), torch.tensor([0.2499999]))) == 0.0
    mi = mutual_information(uniform, torch.full((1, 1, 2, 2), 0.5))
    torch.testing.assert_close(mi, torch.full((1, 1, 2, 2), math.log(4) - 0.5))
    moments = MCMoments(uniform, uniform**2, torch.zeros(1, 1, 2, 2), samples=1)
    torch.testing.assert_close(moments.predictive_entropy(), predictive_entropy(uniform))


def test_argument_validation() -> None:
    dist = DeterministicLogits(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="k >= 1"):
        mc_moments(dist, 0)
    with pytest.raises(ValueError, match="chunk >= 1"):
        mc_moments(dist, 3, chunk=0)
