"""Stochastic heads: shapes, parameterisation, locality, initialisation near the backbone."""

from __future__ import annotations

import math

import pytest
import torch

from mobseg.core.config import HeadConfig
from mobseg.core.distributions import (
    DeterministicLogits,
    DiagonalLogits,
    LowRankLogits,
    MixtureOfBasesLogits,
    SingleBasisLogits,
)
from mobseg.core.heads import INIT_VARIANCE, MixtureOfBasesHead, inverse_softplus
from mobseg.core.registry import build_head

F_IN = 8
KINDS = {
    "deterministic": DeterministicLogits,
    "diagonal": DiagonalLogits,
    "lowrank": LowRankLogits,
    "single-basis": SingleBasisLogits,
    "mob": MixtureOfBasesLogits,
}


def _inputs(spatial, batch=2, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, F_IN, *spatial, generator=g)
    mu = torch.randn(batch, classes, *spatial, generator=g) * 3
    return feats, mu


@pytest.mark.parametrize("method", list(KINDS))
@pytest.mark.parametrize("spatial", [(6, 5, 7), (9, 10)], ids=["3d", "2d"])
@pytest.mark.parametrize("classes", [2, 3])
def test_head_returns_its_distribution(method, spatial, classes) -> None:
    torch.manual_seed(0)
    head = build_head(HeadConfig(method, num_classes=classes, rank=4, bases=3), F_IN)
    feats, mu = _inputs(spatial, classes=classes)
    dist = head(feats, mu)
    assert isinstance(dist, KINDS[method])
    assert torch.equal(dist.mean, mu)
    s = dist.rsample(3)
    assert s.shape == (3, 2, classes, *spatial)
    if method == "deterministic":
        assert list(head.parameters()) == []
        assert dist.logit_variance().abs().max() == 0
    else:
        assert dist.variance.shape == mu.shape
        # Every head parameter receives a gradient from the samples.
        (s * torch.randn_like(s)).sum().backward()
        for name, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if method == "mob":
        assert dist.weights.shape == (2, 4 ** len(spatial), 3)
        torch.testing.assert_close(dist.weights.sum(-1), torch.ones(2, 4 ** len(spatial)))
        assert dist.bases.shape == (3, classes, 4)


def test_one_head_serves_2d_and_3d() -> None:
    head = build_head(HeadConfig("mob", rank=4), F_IN)
    for spatial in [(5, 6), (5, 6, 7)]:
        feats, mu = _inputs(spatial)
        assert head(feats, mu).rsample(1).shape == (1, 2, 2, *spatial)


def test_variance_is_softplus_plus_floor() -> None:
    cfg = HeadConfig("diagonal", eps=1e-5)
    head = build_head(cfg, F_IN)
    feats, mu = _inputs((4, 4, 4))
    raw = torch.nn.functional.conv3d(feats, head.variance.weight[..., None, None, None])
    raw = raw + head.variance.bias.view(1, -1, 1, 1, 1)
    want = torch.nn.functional.softplus(raw) + 1e-5
    torch.testing.assert_close(head(feats, mu).variance, want)
    with torch.no_grad():
        head.variance.bias.fill_(-1e4)
    assert torch.equal(head(feats, mu).variance, torch.full_like(mu, 1e-5))


def test_inverse_softplus() -> None:
    for y in (1e-4, 1e-3, 0.5, 3.0):
        assert math.isclose(
            float(torch.nn.functional.softplus(torch.tensor(inverse_softplus(y)))), y, rel_tol=1e-6
        )


@pytest.mark.parametrize("method", ["diagonal", "lowrank", "single-basis", "mob"])
def test_fresh_head_starts_at_the_backbone(method, capsys) -> None:
    """Initial mean |E[softmax(eta)] - softmax(mu)| is tiny (figure printed for the report)."""
    torch.manual_seed(0)
    head = build_head(HeadConfig(method), 32)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 32, 8, 8, 8, generator=g)  # unit-variance decoder features
    mu = torch.randn(2, 2, 8, 8, 8, generator=g) * 3
    with torch.no_grad():
        dist = head(feats, mu)
        # Antithetic pairs cancel the first-order Monte-Carlo error.
        e_p = torch.softmax(dist.rsample(4000, antithetic=True, generator=g), 2).mean(0)
        sd = float(dist.logit_variance().sqrt().mean())
    gap = float((e_p - torch.softmax(mu, 1)).abs().mean())
    with capsys.disabled():
        print(
            f"\n  init {method}: mean |E[softmax(eta)] - softmax(mu)| = {gap:.2e}, "
            f"logit std {sd:.3f}"
        )
    assert gap < 1e-3
    # The diagonal variance starts at INIT_VARIANCE, the structured part at the same order.
    var = dist.variance.detach()
    torch.testing.assert_close(var.mean(), torch.tensor(INIT_VARIANCE), rtol=0.05, atol=0)
    assert sd**2 < 5 * INIT_VARIANCE


def test_bases_start_at_the_same_scale() -> None:
    torch.manual_seed(0)
    head = build_head(HeadConfig("mob", bases=5, num_classes=3), F_IN)
    norms = head.bases.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((5,), math.sqrt(3)))
    single = build_head(HeadConfig("single-basis", num_classes=3), F_IN)
    torch.testing.assert_close(single.basis.detach().norm(), torch.tensor(math.sqrt(3)))
    # Fresh mixing weights are close to uniform.
    w = head(*_inputs((8, 8, 8), classes=3)).weights.detach()
    assert float((w - 0.2).abs().max()) < 0.05


def test_lowrank_factor_is_spatially_aligned() -> None:
    """Changing the features of one voxel changes the factor of that voxel only."""
    torch.manual_seed(0)
    head = build_head(HeadConfig("lowrank", rank=4, num_classes=3), F_IN)
    feats, mu = _inputs((4, 5, 6), classes=3)
    f0 = head(feats, mu).factor
    feats2 = feats.clone()
    feats2[1, :, 2, 3, 4] += 1.0
    diff = (head(feats2, mu).factor - f0).abs().sum(2)  # (B, C, *sp)
    changed = diff > 0
    assert changed[1, :, 2, 3, 4].all()
    changed[1, :, 2, 3, 4] = False
    assert not changed.any()
    # Channel c*R + r of the conv output is column r of class c.
    raw = torch.einsum("of,bf...->bo...", head.factor.weight, feats) + head.factor.bias.view(
        1, -1, 1, 1, 1
    )
    torch.testing.assert_close(f0, raw.view(2, 3, 4, 4, 5, 6))


def test_mob_weights_depend_only_on_their_block() -> None:
    """Exact tensor_split blocks: a change inside block p moves W_p only."""
    torch.manual_seed(0)
    head = build_head(HeadConfig("mob", partitions=4), F_IN)
    feats, mu = _inputs((7, 5, 9))
    w0 = head(feats, mu).weights
    feats2 = feats.clone()
    feats2[0, :, 6, 4, 8] += 3.0  # last voxel -> last block (p = 63)
    moved = (head(feats2, mu).weights - w0).abs().sum(-1) > 0
    assert moved[0, 63] and moved.sum() == 1


def test_temperature_scales_the_weight_logits() -> None:
    torch.manual_seed(0)
    h1 = build_head(HeadConfig("mob", temperature=1.0), F_IN)
    h2 = build_head(HeadConfig("mob", temperature=0.25), F_IN)
    h2.load_state_dict(h1.state_dict())
    feats, mu = _inputs((8, 8, 8))
    w1, w2 = h1(feats, mu).weights, h2(feats, mu).weights
    # log W = logits / tau - logsumexp: log-ratios between bases scale by 1/tau.
    r1 = w1.log()[..., 1] - w1.log()[..., 0]
    r2 = w2.log()[..., 1] - w2.log()[..., 0]
    torch.testing.assert_close(r2, 4 * r1, rtol=1e-4, atol=1e-6)


def test_mixing_can_be_switched_for_inference() -> None:
    head = build_head(HeadConfig("mob"), F_IN)
    assert isinstance(head, MixtureOfBasesHead) and head.mixing == "soft"
    head.mixing = "hard"
    assert head(*_inputs((8, 8, 8))).mixing == "hard"
    with pytest.raises(ValueError, match="soft' or 'hard"):
        head.mixing = "argmax"


@pytest.mark.parametrize("noise", ["block", "global"])
def test_single_basis_noise_reaches_the_distribution(noise) -> None:
    head = build_head(HeadConfig("single-basis", noise=noise), F_IN)
    dist = head(*_inputs((8, 8, 8)))
    assert dist.noise == noise and not dist.block_diagonal


def test_shape_errors_name_the_shapes() -> None:
    head = build_head(HeadConfig("diagonal"), F_IN)
    with pytest.raises(ValueError, match=r"\(B, 8, \*sp\).*\(2, 7, 4, 4, 4\)"):
        head(torch.zeros(2, 7, 4, 4, 4), torch.zeros(2, 2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 4, 5\)"):
        head(torch.zeros(2, 8, 4, 4, 4), torch.zeros(2, 2, 4, 4, 5))
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        head(torch.zeros(2, 8, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="in_channels"):
        build_head(HeadConfig("mob"), 0)


@pytest.mark.parametrize("method", ["diagonal", "lowrank", "single-basis", "mob"])
def test_heads_under_autocast_produce_float32(method) -> None:
    head = build_head(HeadConfig(method), F_IN)
    feats, mu = _inputs((8, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = head(feats.to(torch.bfloat16), (mu * 1000).to(torch.bfloat16))
        s = dist.rsample(2)
    assert dist.variance.dtype == torch.float32 and s.dtype == torch.float32
    assert torch.isfinite(s).all()


def _perturbed(head: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The head with every parameter moved away from its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return head


@pytest.mark.parametrize(
    "method,mixing,rank",
    [(m, "soft", 5) for m in KINDS] + [("mob", "hard", 5), ("mob", "soft", 8), ("mob", "hard", 8)],
)
@pytest.mark.parametrize("spatial", [(8, 8, 12), (6, 5, 7), (9, 10)], ids=["3d", "3d-odd", "2d"])
def test_marginal_parameters_equal_the_covariance_of_the_distribution(
    method, mixing, rank, spatial
) -> None:
    # mob with M = 3: rank 5 weights the R squared coefficients per block, rank 8 the
    # K = 6 < R reduced channels (both routes of MixtureOfBasesHead._difference_variance).
    torch.manual_seed(0)
    cfg = HeadConfig(method, rank=rank, bases=3, partitions=2, mixing=mixing)
    head = _perturbed(build_head(cfg, F_IN).double())
    feats, mu = _inputs(spatial)
    feats, mu = feats.double(), mu.double()
    with torch.no_grad():
        got = head.marginal_parameters(feats, mu)
        cov = head(feats, mu).voxel_covariance()  # (B, *sp, C, C): the independent route
    assert got.shape == (2, 2, *spatial) and got.dtype == torch.float32
    torch.testing.assert_close(got[:, 0], (mu[:, 1] - mu[:, 0]).float())
    oracle = cov[..., 0, 0] + cov[..., 1, 1] - 2 * cov[..., 0, 1]
    torch.testing.assert_close(got[:, 1].double(), oracle, rtol=1e-6, atol=1e-9)
    if method != "deterministic":
        assert oracle.min() > 0


def test_marginal_parameters_of_three_classes_are_the_generic_ones() -> None:
    from mobseg.core.inference import marginal_parameters

    torch.manual_seed(0)
    head = _perturbed(build_head(HeadConfig("lowrank", num_classes=3, rank=4), F_IN))
    feats, mu = _inputs((6, 6, 6), classes=3)
    with torch.no_grad():
        torch.testing.assert_close(
            head.marginal_parameters(feats, mu), marginal_parameters(head(feats, mu))
        )


@pytest.mark.parametrize("method", ["lowrank", "single-basis", "mob"])
def test_marginal_parameters_read_half_precision_features(method) -> None:
    torch.manual_seed(0)
    head = _perturbed(build_head(HeadConfig(method, rank=4), F_IN))
    feats, mu = _inputs((8, 8, 8))
    with torch.no_grad():
        full = head.marginal_parameters(feats, mu)
        half = head.marginal_parameters(feats.to(torch.bfloat16), mu)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=1e-3)
