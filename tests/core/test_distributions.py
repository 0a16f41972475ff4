"""Logit distributions: moments against sampling and brute force, log_prob, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_factories import VARIANTS, build, random_params, variant_id
from torch.autograd import gradcheck

from mobseg.core.distributions import (
    DeterministicLogits,
    DiagonalLogits,
    LowRankLogits,
    MixtureOfBasesLogits,
    SingleBasisLogits,
)

SPATIAL = [(3, 2, 2), (3, 4)]  # 12 voxels; P = 2 gives uneven pieces (2 + 1) on the first axis
IDS = [variant_id(m, o) for m, o in VARIANTS]


# --------------------------------------------------------------- brute-force oracle
def _pieces(n: int, parts: int) -> np.ndarray:
    """Piece of every position along an axis, from numpy's own array_split."""
    out = np.empty(n, dtype=int)
    for i, chunk in enumerate(np.array_split(np.arange(n), parts)):
        out[chunk] = i
    return out


def _blocks(spatial: tuple[int, ...], parts: int) -> np.ndarray:
    ids = [_pieces(n, parts) for n in spatial]
    grid = np.zeros(spatial, dtype=int)
    for idx in np.ndindex(*spatial):
        p = 0
        for ax, i in enumerate(idx):
            p = p * parts + ids[ax][i]
        grid[idx] = p
    return grid.reshape(-1)


def oracle_covariance(method: str, params: dict, opts: dict, parts: int = 2) -> np.ndarray:
    """(B, C*N, C*N) covariance written out from SPEC section 3, voxel pair by voxel pair."""
    p = {k: v.detach().double().numpy() for k, v in params.items()}
    b, c = p["mu"].shape[:2]
    sp = p["mu"].shape[2:]
    n = int(np.prod(sp))
    cov = np.zeros((b, c * n, c * n))
    for bi in range(b):
        cov[bi] += np.diag(p["variance"][bi].reshape(-1))
    if method == "diagonal":
        return cov
    if method == "lowrank":
        fac = p["factor"].reshape(b, c, -1, n)  # (B, C, R, N)
        for bi in range(b):
            pm = np.zeros((c * n, fac.shape[2]))
            for ci in range(c):
                for v in range(n):
                    pm[ci * n + v] = fac[bi, ci, :, v]  # same voxel: spatially aligned
            cov[bi] += pm @ pm.T
        return cov
    noise = opts.get("noise", "voxel")
    blocks = _blocks(sp, parts)
    a = p["coeffs"].reshape(b, -1, n)
    for bi in range(b):
        for v in range(n):
            for w in range(n):
                if noise == "voxel" and v != w:
                    continue
                if noise == "block" and blocks[v] != blocks[w]:
                    continue
                if method == "single-basis":
                    basis = p["basis"]
                else:
                    wts = p["weights"][bi, blocks[v]]
                    if opts.get("mixing") == "hard":
                        wts = np.eye(len(wts))[np.argmax(wts)]
                    basis = np.einsum("m,mcr->cr", wts, p["bases"])
                block = basis @ np.diag(a[bi, :, v] * a[bi, :, w]) @ basis.T
                for ci in range(c):
                    for cj in range(c):
                        cov[bi, ci * n + v, cj * n + w] += block[ci, cj]
    return cov


# ------------------------------------------------------------ covariance by sampling
@pytest.mark.parametrize(("method", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("spatial", SPATIAL, ids=["3d", "2d"])
@pytest.mark.parametrize("classes", [2, 3])
def test_empirical_covariance_matches_analytic(method, opts, spatial, classes) -> None:
    params = random_params(method, 2, classes, spatial, seed=classes)
    dist = build(method, params, **opts)
    n = 50_000
    gen = torch.Generator().manual_seed(1234)
    x = dist.rsample(n, generator=gen).reshape(n, 2, -1)
    emp = torch.stack([torch.cov(x[:, b].T) for b in range(2)])
    ana = dist.dense_covariance()
    err = float((emp - ana).norm() / ana.norm())
    assert err < 0.05, f"relative Frobenius error {err:.3f}"
    mean_err = float((x.mean(0) - dist.mean.reshape(2, -1)).abs().max())
    assert mean_err < 0.05


@pytest.mark.parametrize(("method", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("spatial", SPATIAL, ids=["3d", "2d"])
def test_analytic_covariance_equals_brute_force(method, opts, spatial) -> None:
    params = random_params(method, 2, 3, spatial, seed=5)
    dist = build(method, params, **opts)
    want = oracle_covariance(method, params, opts)
    dense = dist.dense_covariance()
    np.testing.assert_allclose(dense.numpy(), want, rtol=1e-10, atol=1e-10)
    # voxel_covariance and logit_variance are the diagonal C x C blocks of it.
    b, c, n = 2, 3, int(np.prod(spatial))
    blocks = dense.reshape(b, c, n, c, n).diagonal(dim1=2, dim2=4).permute(0, 3, 1, 2)
    torch.testing.assert_close(dist.voxel_covariance().reshape(b, n, c, c), blocks)
    var = dist.logit_variance()
    assert var.shape == (b, c, *spatial)
    torch.testing.assert_close(
        var.reshape(b, c, n), torch.diagonal(dense, dim1=1, dim2=2).view(b, c, n)
    )
    # Off the voxel blocks the covariance vanishes exactly when the flag says so.
    off = dense.reshape(b, c, n, c, n) * (1 - torch.eye(n, dtype=dense.dtype))[None, None, :, None]
    assert bool(off.abs().max() == 0) == dist.block_diagonal


def test_binary_case_reduces_to_one_variance_per_voxel() -> None:
    """SPEC 3: var(eta_1 - eta_0) = (b_1 - b_0)^T diag(a_n^2) (b_1 - b_0) + d_n0 + d_n1."""
    params = random_params("single-basis", 2, 2, (4, 3, 2), seed=3)
    dist = build("single-basis", params)
    cov = dist.voxel_covariance()  # (B, *sp, 2, 2)
    var_diff = cov[..., 1, 1] + cov[..., 0, 0] - 2 * cov[..., 0, 1]
    db = params["basis"][1] - params["basis"][0]
    want = torch.einsum("r,br...->b...", db**2, params["coeffs"] ** 2) + params["variance"].sum(1)
    torch.testing.assert_close(var_diff, want)


def test_deterministic_has_zero_covariance_and_returns_mu() -> None:
    mu = torch.randn(3, 2, 4, 5, requires_grad=True)
    dist = DeterministicLogits(mu)
    s = dist.rsample(4)
    assert s.shape == (4, 3, 2, 4, 5)
    assert torch.equal(s, mu.detach().expand(4, *mu.shape))
    assert dist.logit_variance().abs().max() == 0
    assert dist.voxel_covariance().shape == (3, 4, 5, 2, 2)
    assert dist.dense_covariance().abs().max() == 0
    s.sum().backward()
    assert torch.equal(mu.grad, torch.full_like(mu, 4.0))


# ------------------------------------------------------------------------ log_prob
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial", [(3, 4, 2), (5, 3)])
def test_lowrank_log_prob_equals_torch_lowrank_mvn(dtype, spatial) -> None:
    params = random_params("lowrank", 2, 3, spatial, rank=4, dtype=dtype, seed=7)
    dist = build("lowrank", params)
    b, c, r = 2, 3, 4
    n = int(np.prod(spatial))
    factor = params["factor"].reshape(b, c, r, n).permute(0, 1, 3, 2).reshape(b, c * n, r)
    ref = torch.distributions.LowRankMultivariateNormal(
        params["mu"].reshape(b, -1), factor, params["variance"].reshape(b, -1)
    )
    x = dist.rsample(5, generator=torch.Generator().manual_seed(0))
    got = dist.log_prob(x)
    want = ref.log_prob(x.reshape(5, b, -1))
    assert got.shape == (5, b)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    # Also for a single (B, C, *sp) value far from the mean.
    far = params["mu"] + 3.0
    torch.testing.assert_close(
        dist.log_prob(far), ref.log_prob(far.reshape(b, -1)), rtol=1e-4, atol=0
    )


def test_diagonal_log_prob_equals_torch_normal() -> None:
    params = random_params("diagonal", 2, 3, (4, 3, 2), seed=8)
    dist = build("diagonal", params)
    x = dist.rsample(6)
    ref = torch.distributions.Normal(params["mu"], params["variance"].sqrt())
    want = ref.log_prob(x).flatten(2).sum(-1)
    torch.testing.assert_close(dist.log_prob(x), want)


def test_log_prob_only_where_defined() -> None:
    dist = build("mob", random_params("mob", 1, 2, (4, 4), seed=0))
    with pytest.raises(NotImplementedError, match="MixtureOfBasesLogits"):
        dist.log_prob(dist.mean)
    with pytest.raises(ValueError, match=r"\(\.\.\., B, C, \*sp\)"):
        build("lowrank", random_params("lowrank", 1, 2, (4, 4))).log_prob(torch.zeros(1, 2, 4, 5))


# ----------------------------------------------------------------------- gradients
@pytest.mark.parametrize(("method", "opts"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("spatial", [(3, 2, 2), (3, 2)], ids=["3d", "2d"])
def test_rsample_gradcheck_with_fixed_noise(method, opts, spatial) -> None:
    params = random_params(method, 2, 2, spatial, rank=2, bases=2, seed=11, requires_grad=True)
    noise = build(method, params, **opts).sample_noise(
        3, generator=torch.Generator().manual_seed(0)
    )
    names = list(params)
    if opts.get("mixing") == "hard":
        names.remove("weights")  # straight-through: checked against soft mixing below

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        p = dict(params)
        p.update(zip(names, tensors, strict=True))
        return build(method, p, **opts).rsample_with_noise(noise)

    assert gradcheck(f, tuple(params[k] for k in names))


@pytest.mark.parametrize("noise", ["voxel", "block"])
def test_hard_mixing_is_argmax_basis_with_straight_through_gradient(noise) -> None:
    params = random_params("mob", 2, 3, (4, 3, 2), seed=12, requires_grad=True)
    hard = build("mob", params, mixing="hard", noise=noise)
    argmax = params["weights"].argmax(-1)
    assert torch.equal(hard.block_bases.detach(), params["bases"].detach()[argmax])
    # The straight-through gradient w.r.t. W is the soft-mixing gradient taken at
    # one-hot weights (the point whose soft mixture is the hard basis).
    onehot = torch.nn.functional.one_hot(argmax, 3).double().requires_grad_()
    soft = build("mob", {**params, "weights": onehot}, mixing="soft", noise=noise)
    z = hard.sample_noise(2, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(2, *params["mu"].shape, dtype=torch.float64)
    (gw_hard,) = torch.autograd.grad((hard.rsample_with_noise(z) * probe).sum(), params["weights"])
    (gw_soft,) = torch.autograd.grad((soft.rsample_with_noise(z) * probe).sum(), onehot)
    torch.testing.assert_close(gw_hard, gw_soft)
    assert gw_hard.abs().max() > 0


def test_diagonal_samples_give_gradient_to_mu_and_variance() -> None:
    """The authors' diagonal baseline used sample() (no gradient); ours is reparameterised."""
    params = random_params("diagonal", 1, 2, (3, 3), requires_grad=True)
    build("diagonal", params).rsample(4).square().sum().backward()
    assert params["mu"].grad.abs().min() > 0
    assert params["variance"].grad.abs().min() > 0


# ----------------------------------------------------------------- sampling options
@pytest.mark.parametrize(("method", "opts"), VARIANTS, ids=IDS)
def test_antithetic_pairs_and_shapes(method, opts) -> None:
    for batch, spatial in [(1, (4, 3, 5)), (3, (6, 5))]:
        params = random_params(method, batch, 3, spatial, seed=batch)
        dist = build(method, params, **opts)
        s = dist.rsample(6, antithetic=True)
        assert s.shape == (6, batch, 3, *spatial)
        torch.testing.assert_close(s[:3] + s[3:], 2 * params["mu"].expand(3, *params["mu"].shape))
        with pytest.raises(ValueError, match="even k"):
            dist.rsample(5, antithetic=True)


def test_generator_makes_draws_reproducible() -> None:
    dist = build("mob", random_params("mob", 2, 2, (4, 4, 4)))
    a = dist.rsample(3, generator=torch.Generator().manual_seed(5))
    b = dist.rsample(3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="k >= 1"):
        dist.rsample(0)


def test_noise_validation() -> None:
    dist = build("lowrank", random_params("lowrank", 2, 2, (3, 3)))
    with pytest.raises(ValueError, match="needs noise"):
        dist.rsample_with_noise({"z1": torch.zeros(1, 2, 2, 3, 3)})
    with pytest.raises(ValueError, match=r"noise 'z2' must have shape \(1, 2, 3\)"):
        dist.rsample_with_noise({"z1": torch.zeros(1, 2, 2, 3, 3), "z2": torch.zeros(1, 2, 4)})


# ---------------------------------------------------------------------- validation
def test_constructor_errors_name_the_shapes() -> None:
    mu = torch.zeros(2, 2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"got \(2, 2, 4, 4\)"):
        DiagonalLogits(mu, torch.ones(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"factor must be \(B, C, R, \*sp\)"):
        LowRankLogits(mu, torch.ones_like(mu), torch.zeros(2, 8, 4, 4, 4))
    with pytest.raises(ValueError, match=r"basis must be \(C, R\) = \(2, 3\)"):
        SingleBasisLogits(mu, torch.ones_like(mu), torch.zeros(2, 3, 4, 4, 4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"weights must be \(B, P\^d, M\) = \(2, 8, 3\)"):
        MixtureOfBasesLogits(
            mu, torch.ones_like(mu), torch.zeros(2, 3, 4, 4, 4), torch.zeros(3, 2, 3),
            torch.ones(2, 64, 3) / 3, partitions=2,
        )  # fmt: skip
    with pytest.raises(ValueError, match="mob noise must be voxel or block"):
        MixtureOfBasesLogits(
            mu, torch.ones_like(mu), torch.zeros(2, 3, 4, 4, 4), torch.zeros(3, 2, 3),
            torch.ones(2, 8, 3) / 3, partitions=2, noise="global",
        )  # fmt: skip
    with pytest.raises(ValueError, match="C >= 2"):
        DeterministicLogits(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="tiny inputs"):
        DiagonalLogits(torch.zeros(2, 2, 40, 40, 4), torch.ones(2, 2, 40, 40, 4)).dense_covariance()


# ------------------------------------------------------------------------ numerics
@pytest.mark.parametrize(("method", "opts"), VARIANTS, ids=IDS)
def test_extreme_values_stay_finite(method, opts) -> None:
    params = random_params(method, 2, 2, (4, 4, 4), dtype=torch.float32, requires_grad=False)
    params["mu"] = (torch.sign(params["mu"]) * 1e4).requires_grad_()
    var = params["variance"].detach().clone()
    var.view(-1)[::2] = 1e-5
    var.view(-1)[1::2] = 1e4
    params["variance"] = var.requires_grad_()
    for name in ("coeffs", "factor"):
        if name in params:
            params[name] = (params[name] * 100).requires_grad_()
    dist = build(method, params, **opts)
    s = dist.rsample(3)
    assert torch.isfinite(s).all()
    assert torch.isfinite(dist.logit_variance()).all()
    assert torch.isfinite(dist.voxel_covariance()).all()
    torch.log_softmax(s, 2).sum().backward()
    assert torch.isfinite(params["mu"].grad).all() and torch.isfinite(params["variance"].grad).all()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(half) -> None:
    params = random_params("mob", 2, 2, (4, 4, 4), dtype=torch.float32)
    params = {k: v.to(half) for k, v in params.items()}
    params["mu"] = params["mu"] * 5000  # near the float16 limit
    dist = build("mob", params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = dist.rsample(4)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert dist.dtype == torch.float32


@pytest.mark.parametrize("noise", ["voxel", "block"])
def test_more_pieces_than_voxels_leaves_empty_blocks(noise) -> None:
    """P = 4 on a 3 x 2 x 5 patch: empty blocks, padded axes, covariance still exact."""
    params = random_params("mob", 2, 2, (3, 2, 5), partitions=4, seed=4)
    dist = build("mob", params, partitions=4, noise=noise)
    assert int(dist.block_mask.sum()) == 3 * 2 * 4
    want = oracle_covariance("mob", params, {"noise": noise}, parts=4)
    np.testing.assert_allclose(dist.dense_covariance().numpy(), want, rtol=1e-10, atol=1e-10)
    x = dist.rsample(50_000, generator=torch.Generator().manual_seed(0)).reshape(50_000, 2, -1)
    emp = torch.stack([torch.cov(x[:, b].T) for b in range(2)])
    assert float((emp - torch.from_numpy(want)).norm() / np.linalg.norm(want)) < 0.05
