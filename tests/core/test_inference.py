"""Per-voxel parameters and maps (mobseg.core.inference) against independent oracles."""

from __future__ import annotations

import pytest
import torch
from core_factories import VARIANTS, build, random_params, variant_id

from mobseg.core.distributions import DeterministicLogits
from mobseg.core.inference import (
    marginal_parameters,
    multiclass_maps,
    num_parameter_channels,
    unpack_parameters,
    voxel_maps,
)
from mobseg.core.quadrature import binary_maps


def _dist(method: str, opts: dict, classes: int, spatial=(4, 3, 5), seed: int = 0):
    return build(method, random_params(method, 1, classes, spatial, seed=seed), **opts)


@pytest.mark.parametrize(("method", "opts"), VARIANTS, ids=[variant_id(*v) for v in VARIANTS])
@pytest.mark.parametrize("classes", [2, 3])
def test_parameters_match_the_empirical_marginals(method: str, opts: dict, classes: int) -> None:
    """Mean and (co)variance of 20,000 joint samples, voxel by voxel, within 5 standard errors."""
    dist = _dist(method, opts, classes, spatial=(3, 2, 4))
    params = marginal_parameters(dist)[0].double()
    assert params.shape == (num_parameter_channels(classes), 3, 2, 4)
    torch.manual_seed(0)
    k = 20000
    eta = dist.rsample(k)[:, 0].double()  # (k, C, *sp)
    if classes == 2:
        mean, var = params[0], params[1]
        d = eta[:, 1] - eta[:, 0]
        assert ((d.mean(0) - mean).abs() <= 5 * (var / k).sqrt()).all()
        assert ((d.var(0) - var).abs() <= 5 * var * (2 / k) ** 0.5).all()
    else:
        mean, cov = unpack_parameters(params, classes)
        dev = eta - eta.mean(0)
        emp = torch.einsum("kisxy,kjsxy->ijsxy", dev, dev) / (k - 1)
        var = torch.diagonal(cov, dim1=0, dim2=1).movedim(-1, 0)  # (C, *sp)
        assert ((eta.mean(0) - mean).abs() <= 5 * (var / k).sqrt()).all()
        # se of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / k)
        se = ((var[:, None] * var[None, :] + cov**2) / k).sqrt()
        assert ((emp - cov).abs() <= 5 * se).all()


def test_point_mass_parameters_and_maps() -> None:
    mu = torch.randn(1, 2, 3, 4, 5) * 4
    params = marginal_parameters(DeterministicLogits(mu))[0]
    torch.testing.assert_close(params[0], mu[0, 1] - mu[0, 0])
    assert torch.equal(params[1], torch.zeros_like(params[1]))
    maps = voxel_maps(params, 2)
    assert torch.equal(maps.var, torch.zeros_like(maps.var))
    assert torch.equal(maps.mi, torch.zeros_like(maps.mi))
    torch.testing.assert_close(maps.prob, torch.softmax(mu[0], 0)[1])
    assert torch.equal(maps.seg, (mu[0, 1] > mu[0, 0]).to(torch.uint8))


def test_two_class_maps_are_the_quadrature() -> None:
    params = torch.stack([torch.randn(6, 5, 4) * 3, torch.rand(6, 5, 4) * 4])
    maps = voxel_maps(params, 2)
    ref = binary_maps(params[0], params[1])
    assert torch.equal(maps.prob, ref.mean_p) and torch.equal(maps.var, ref.var_p)
    assert torch.equal(maps.entropy, ref.predictive_entropy)
    assert torch.equal(maps.mi, ref.mutual_information)
    # the segmentation m > 0 is argmax E[p]
    assert torch.equal(maps.seg.bool(), maps.prob > 0.5)


def test_multiclass_maps_match_brute_force_monte_carlo() -> None:
    """C = 3, correlated logits: MC maps from the (mean, cov) parameters vs direct sampling."""
    dist = _dist("single-basis", {"noise": "voxel"}, 3, spatial=(2, 2, 3), seed=4)
    params = marginal_parameters(dist)[0]
    gen = torch.Generator().manual_seed(0)
    maps = voxel_maps(params, 3, samples=60000, generator=gen)
    assert maps.prob.shape == (2, 2, 2, 3) and maps.var.shape == (2, 2, 2, 3)
    torch.manual_seed(1)
    p = torch.softmax(dist.rsample(60000)[:, 0].double(), dim=1)  # (k, C, *sp)
    h = -(p * p.log()).sum(1)
    torch.testing.assert_close(maps.prob.double(), p.mean(0)[1:], atol=0.01, rtol=0)
    torch.testing.assert_close(maps.var.double(), p.var(0)[1:], atol=0.005, rtol=0)
    torch.testing.assert_close(maps.expected_entropy.double(), h.mean(0), atol=0.01, rtol=0)
    pm = p.mean(0)
    torch.testing.assert_close(maps.entropy.double(), -(pm * pm.log()).sum(0), atol=0.01, rtol=0)
    assert torch.equal(
        maps.seg,
        torch.cat([1 - maps.prob.sum(0, keepdim=True), maps.prob]).argmax(0).to(torch.uint8),
    )


def test_multiclass_point_mass_and_singular_covariance() -> None:
    mu = torch.randn(1, 4, 3, 3, 2) * 3
    params = marginal_parameters(DeterministicLogits(mu))[0]
    maps = voxel_maps(params, 4, samples=7)
    assert torch.equal(maps.var, torch.zeros_like(maps.var))
    assert torch.equal(maps.mi, torch.zeros_like(maps.mi))
    torch.testing.assert_close(maps.prob, torch.softmax(mu[0], 0)[1:])
    # rank-one covariance (a single shared direction) is PSD but singular
    mean = torch.zeros(3, 2, 2, 2)
    v = torch.tensor([1.0, -1.0, 0.5])
    cov = (torch.outer(v, v)[..., None, None, None]).expand(3, 3, 2, 2, 2).clone()
    out = multiclass_maps(mean, cov, samples=2000, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out.var).all() and (out.var > 0).all()


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="expected 2 parameter channels"):
        voxel_maps(torch.zeros(3, 2, 2, 2), 2)
    with pytest.raises(ValueError, match="expected 9 parameter channels"):
        unpack_parameters(torch.zeros(5, 2, 2, 2), 3)
    with pytest.raises(ValueError, match="cov must have shape"):
        multiclass_maps(torch.zeros(3, 2, 2), torch.zeros(3, 3, 2, 3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        num_parameter_channels(1)


@pytest.mark.parametrize(("method", "opts"), VARIANTS, ids=[variant_id(*v) for v in VARIANTS])
def test_difference_variance_equals_the_covariance_formula(method: str, opts: dict) -> None:
    """Each distribution's own var(eta_1 - eta_0) = Sigma_00 + Sigma_11 - 2 Sigma_01, exactly."""
    dist = _dist(method, opts, 2, spatial=(5, 3, 6), seed=2)
    cov = dist.voxel_covariance()
    ref = cov[..., 0, 0] + cov[..., 1, 1] - 2 * cov[..., 0, 1]
    torch.testing.assert_close(dist.difference_variance(), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="C = 2"):
        _dist(method, opts, 3).difference_variance()
