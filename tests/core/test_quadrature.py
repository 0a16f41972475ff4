"""Exact two-class moments (mobseg.core.quadrature) against independent oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from mobseg.core.quadrature import binary_maps

M_VALUES = [-40.0, -21.0, -8.0, -2.0, -0.3, 0.0, 0.5, 1.5, 4.0, 19.0, 35.0]
S_VALUES = [0.0, 1e-4, 0.05, 0.5, 1.0, 2.0, 3.0, 8.0, 30.0, 100.0]


def _sigmoid(d: float) -> float:
    return float(special.expit(d))


def _entropy(d: float) -> float:
    p = special.expit(d)
    return float(np.logaddexp(0.0, -d) + (1.0 - p) * d)


def _quad(f, m: float, s: float) -> float:
    """E[f(d)], d ~ N(m, s^2), by adaptive quadrature (scipy)."""
    if s == 0.0:
        return f(m)
    pts = [p for p in (-m / s, -3.0, 0.0, 3.0) if -40 < p < 40]
    val, _ = integrate.quad(
        lambda x: f(m + s * x) * stats.norm.pdf(x),
        -40,
        40,
        points=sorted(set(pts)),
        limit=500,
        epsabs=1e-14,
        epsrel=1e-13,
    )
    return val


@pytest.fixture(scope="module")
def grid_maps():
    m, s = np.meshgrid(M_VALUES, S_VALUES)
    maps = binary_maps(torch.tensor(m), torch.tensor(s**2))
    return m, s, maps


def test_matches_scipy_quad_within_1e6(grid_maps):
    m, s, maps = grid_maps
    worst = 0.0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            mm, ss = float(m[i, j]), float(s[i, j])
            ep = _quad(_sigmoid, mm, ss)
            ep2 = _quad(lambda d: _sigmoid(d) ** 2, mm, ss)
            eh = _quad(_entropy, mm, ss)
            p = np.clip(ep, 0, 1)
            hp = -special.xlogy(p, p) - special.xlogy(1 - p, 1 - p)
            errs = [
                abs(float(maps.mean_p[i, j]) - ep),
                abs(float(maps.var_p[i, j]) - (ep2 - ep**2)),
                abs(float(maps.expected_entropy[i, j]) - eh),
                abs(float(maps.predictive_entropy[i, j]) - hp),
                abs(float(maps.mutual_information[i, j]) - max(hp - eh, 0.0)),
            ]
            worst = max(worst, *errs)
    assert worst <= 1e-6, worst


def test_float32_close_to_float64(grid_maps):
    m, s, maps64 = grid_maps
    maps32 = binary_maps(torch.tensor(m, dtype=torch.float32), torch.tensor(s**2).float())
    assert maps32.mean_p.dtype == torch.float32
    for name in ("mean_p", "var_p", "expected_entropy", "mutual_information"):
        diff = (getattr(maps32, name).double() - getattr(maps64, name)).abs().max()
        assert diff <= 2e-6, (name, float(diff))


def test_matches_a_million_draws():
    gen = torch.Generator().manual_seed(0)
    for m, s in [(0.7, 1.3), (-2.0, 4.0), (3.0, 0.2)]:
        d = m + s * torch.randn(10**6, generator=gen, dtype=torch.float64)
        p = torch.sigmoid(d)
        h = torch.nn.functional.softplus(-d) + (1 - p) * d
        maps = binary_maps(torch.tensor([m], dtype=torch.float64), torch.tensor([s * s]).double())
        for est, samples in [(maps.mean_p, p), (maps.expected_entropy, h)]:
            se = samples.std() / 1000
            assert abs(float(est[0]) - float(samples.mean())) < 5 * float(se)
        se_var = ((p - p.mean()) ** 2).std() / 1000
        assert abs(float(maps.var_p[0]) - float(p.var())) < 5 * float(se_var)


def test_point_mass_has_zero_variance_and_mi_by_computation():
    m = torch.linspace(-30, 30, 2001, dtype=torch.float32)
    maps = binary_maps(m, torch.zeros_like(m))
    assert torch.equal(maps.var_p, torch.zeros_like(m))
    assert torch.equal(maps.mutual_information, torch.zeros_like(m))
    assert torch.allclose(maps.mean_p, torch.sigmoid(m), atol=1e-7)
    assert torch.allclose(maps.expected_entropy, maps.predictive_entropy, atol=1e-7)


def test_variance_bound_and_orderings():
    gen = torch.Generator().manual_seed(1)
    m = 10 * torch.randn(20000, generator=gen, dtype=torch.float64)
    s2 = torch.rand(20000, generator=gen, dtype=torch.float64) ** 4 * 50
    maps = binary_maps(m, s2)
    assert (maps.var_p <= s2 / 16 + 1e-12).all()
    assert (maps.var_p <= maps.mean_p * (1 - maps.mean_p) + 1e-12).all()
    assert (maps.mutual_information >= 0).all()
    assert (maps.expected_entropy <= np.log(2) + 1e-12).all()
    # symmetry: d -> -d swaps the classes
    flipped = binary_maps(-m, s2)
    assert torch.allclose(flipped.mean_p, 1 - maps.mean_p, atol=1e-12)
    assert torch.allclose(flipped.var_p, maps.var_p, atol=1e-12)


def test_shapes_chunking_and_errors():
    m = torch.randn(3, 5, 7)
    v = torch.rand(3, 5, 7)
    whole = binary_maps(m, v)
    chunked = binary_maps(m, v, chunk=11)
    assert whole.mean_p.shape == (3, 5, 7)
    for name in ("mean_p", "var_p", "expected_entropy", "predictive_entropy"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-7)
    with pytest.raises(ValueError, match=r"\(3, 5, 7\).*\(3, 5\)"):
        binary_maps(m, v[..., 0])
    with pytest.raises(ValueError, match="variance must be >= 0"):
        binary_maps(m, -v)
    with pytest.raises(ValueError, match="finite"):
        binary_maps(m.clone().fill_(float("nan")), v)


def test_voxels_give_the_same_maps_alone_or_among_others():
    # all voxels wide (s > 1: no gather / scatter) vs the same voxels among narrow ones
    gen = torch.Generator().manual_seed(2)
    m = 8 * torch.randn(300, generator=gen, dtype=torch.float64)
    wide = 1.0 + 30 * torch.rand(300, generator=gen, dtype=torch.float64)
    narrow = torch.rand(300, generator=gen, dtype=torch.float64) ** 2
    alone = binary_maps(m, wide)
    mixed = binary_maps(torch.cat([m, m]), torch.cat([narrow, wide]))
    for name in ("mean_p", "var_p", "expected_entropy", "predictive_entropy"):
        torch.testing.assert_close(getattr(alone, name), getattr(mixed, name)[300:])
