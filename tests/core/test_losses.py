"""The fine-tuning loss: hand-computed terms, nnU-Net's own CE + Dice, Monte-Carlo objectives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_factories import VARIANTS, build, random_params, variant_id

from mobseg.core.config import LossConfig
from mobseg.core.distributions import DeterministicLogits
from mobseg.core.losses import (
    LossTerms,
    StochasticSegLoss,
    ce_and_dice,
    kl_unit_prior,
    orthogonality,
    weight_negative_entropy,
)

# ------------------------------------------------------------------ regularisers


def test_kl_hand_values_and_minimum_at_one() -> None:
    assert float(kl_unit_prior(torch.ones(3, 4))) == 0.0
    d = torch.tensor([2.0, 0.5])
    want = 0.5 * ((0.5 - 1 + math.log(2)) + (2 - 1 + math.log(0.5))) / 2
    assert math.isclose(float(kl_unit_prior(d)), want, rel_tol=1e-6)
    grid = torch.linspace(0.2, 3.0, 281)
    per = torch.stack([kl_unit_prior(x.view(1)) for x in grid])
    assert math.isclose(float(grid[per.argmin()]), 1.0, abs_tol=0.011)
    assert (per >= 0).all()


def test_kl_direction_is_on_the_variance() -> None:
    """KL(N(mu, I) || N(mu, d)) per element, i.e. torch's KL with the prior first."""
    d = torch.tensor([0.1, 0.7, 4.0])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.zeros(3), torch.ones(3)),
        torch.distributions.Normal(torch.zeros(3), d.sqrt()),
    ).mean()
    torch.testing.assert_close(kl_unit_prior(d), ref)


def test_orthogonality_hand_values() -> None:
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    ortho = q[:3].reshape(3, 2, 6) * torch.tensor([1.0, 5.0, 0.1], dtype=torch.float64).view(
        3, 1, 1
    )
    assert float(orthogonality(ortho)) == pytest.approx(0.0, abs=1e-12)
    same = torch.randn(1, 2, 6).expand(4, 2, 6) * torch.tensor([1.0, 2.0, 3.0, -1.0]).view(4, 1, 1)
    assert float(orthogonality(same)) == pytest.approx(1.0)
    # Two bases at angle theta: sum_{i != j} G_ij^2 / (M (M - 1)) = cos^2(theta).
    theta = 0.3
    u, v = q[0], q[1]
    pair = torch.stack([u, math.cos(theta) * u + math.sin(theta) * v]).reshape(2, 3, 4)
    assert float(orthogonality(pair)) == pytest.approx(math.cos(theta) ** 2)
    assert float(orthogonality(torch.randn(1, 2, 16))) == 0.0  # one basis: no division by zero


def test_weight_entropy_hand_values() -> None:
    for m in (1, 2, 3, 5):
        uniform = torch.full((2, 8, m), 1.0 / m)
        assert float(weight_negative_entropy(uniform)) == pytest.approx(-math.log(m), abs=1e-6)
    onehot = F.one_hot(torch.randint(0, 3, (2, 8)), 3).float()
    assert float(weight_negative_entropy(onehot)) == 0.0
    w = torch.cat([torch.full((1, 1, 2), 0.5), torch.tensor([[[1.0, 0.0]]])], 1)  # (1, 2, 2)
    assert float(weight_negative_entropy(w)) == pytest.approx(-math.log(2) / 2)
    mask = torch.tensor([True, False])
    assert float(weight_negative_entropy(w, mask)) == pytest.approx(-math.log(2))


# ------------------------------------------------------------------- CE and Dice


def test_ce_and_dice_hand_computed() -> None:
    # One patch of 2 voxels, C = 2: logits (0, ln 3) -> p1 = 3/4; (0, 0) -> p1 = 1/2.
    eta = torch.tensor([[[[0.0, 0.0]], [[math.log(3), 0.0]]]])[None]  # (k=1, B=1, C=2, 1, 2)
    labels = torch.tensor([[[1, 0]]])
    ce, dice = ce_and_dice(eta, labels, smooth=0.0)
    torch.testing.assert_close(ce, torch.tensor([[[[-math.log(0.75), -math.log(0.5)]]]]))
    # I = 0.75, |P| = 1.25, |G| = 1 -> dc = 1.5 / 2.25.
    assert float(dice) == pytest.approx(1 - 1.5 / 2.25)


@pytest.mark.parametrize("classes", [2, 3, 4])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_ce_and_dice_equal_nnunet_loss(classes, batch_dice) -> None:
    """nnU-Net's DC_and_CE_loss (its own code) is the oracle; it reports -dc, we 1 - dc."""
    compound = pytest.importorskip("nnunetv2.training.loss.compound_losses")
    dice_mod = pytest.importorskip("nnunetv2.training.loss.dice")
    ref = compound.DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        dice_class=dice_mod.MemoryEfficientSoftDiceLoss,
    )
    torch.manual_seed(classes)
    mu = torch.randn(2, classes, 6, 5, 4) * 3
    target = torch.randint(0, classes, (2, 1, 6, 5, 4)).float()
    target[1] = 0  # one patch without foreground
    loss = StochasticSegLoss(LossConfig(batch_dice=batch_dice))
    terms = loss(DeterministicLogits(mu), target)
    assert float(terms.data) == pytest.approx(float(ref(mu, target)) + 1.0, rel=1e-5)
    assert float(terms.ce) == pytest.approx(
        float(F.cross_entropy(mu, target[:, 0].long())), rel=1e-5
    )


def _oracle_terms(samples: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5):
    """Per-sample CE (F.cross_entropy) and batch Dice over the foreground, float64."""
    ce, dice = [], []
    t = target[:, 0].long()
    for eta in samples.double():
        ce.append(F.cross_entropy(eta, t, reduction="none"))
        p = torch.softmax(eta, 1)
        oh = F.one_hot(t, eta.shape[1]).movedim(-1, 1).double()
        dims = (0, *range(2, eta.dim()))
        inter = (p * oh)[:, 1:].sum(dims)
        dc = (2 * inter + smooth) / (p[:, 1:].sum(dims) + oh[:, 1:].sum(dims) + smooth)
        dice.append(1 - dc.mean())
    return torch.stack(ce), torch.stack(dice)


@pytest.mark.parametrize(("method", "opts"), VARIANTS[:1] + VARIANTS[6:7], ids=["diagonal", "mob"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_mean_objective_averages_the_k_samples(method, opts, antithetic) -> None:
    params = random_params(method, 2, 3, (4, 3, 5), dtype=torch.float32)
    dist = build(method, params, **opts)
    target = torch.randint(0, 3, (2, 1, 4, 3, 5))
    cfg = LossConfig(samples=6, antithetic=antithetic)
    terms = StochasticSegLoss(cfg)(dist, target, generator=torch.Generator().manual_seed(3))
    samples = dist.rsample(6, antithetic=antithetic, generator=torch.Generator().manual_seed(3))
    ce, dice = _oracle_terms(samples, target)
    assert float(terms.ce) == pytest.approx(float(ce.mean()), rel=1e-5)
    assert float(terms.dice) == pytest.approx(float(dice.mean()), rel=1e-5)
    assert float(terms.data) == pytest.approx(float(ce.mean() + dice.mean()), rel=1e-5)


def test_logsumexp_objective_is_the_ssn_loss() -> None:
    params = random_params("lowrank", 2, 2, (5, 4, 3), dtype=torch.float32)
    dist = build("lowrank", params)
    target = torch.randint(0, 2, (2, 1, 5, 4, 3))
    cfg = LossConfig(samples=4, mc_loss="logsumexp", antithetic=True)
    terms = StochasticSegLoss(cfg)(dist, target, generator=torch.Generator().manual_seed(9))
    samples = dist.rsample(4, antithetic=True, generator=torch.Generator().manual_seed(9))
    ce, dice = _oracle_terms(samples, target)
    s = ce.flatten(2).sum(-1)  # (k, B)
    want = -(torch.log(torch.exp(-s - (-s).max(0).values).mean(0)) + (-s).max(0).values).mean() / 60
    assert float(terms.ce) == pytest.approx(float(want), rel=1e-5)
    assert float(terms.dice) == pytest.approx(float(dice.mean()), rel=1e-5)


def test_logsumexp_equals_mean_ce_for_identical_samples() -> None:
    mu = torch.randn(2, 2, 4, 4, 4)
    target = torch.randint(0, 2, (2, 1, 4, 4, 4))
    a = StochasticSegLoss(LossConfig(mc_loss="logsumexp"))(DeterministicLogits(mu), target)
    b = StochasticSegLoss(LossConfig())(DeterministicLogits(mu), target)
    assert float(a.ce) == pytest.approx(float(b.ce), rel=1e-6)


def test_deterministic_terms_and_total() -> None:
    mu = torch.randn(2, 2, 5, 6, requires_grad=True)
    target = torch.randint(0, 2, (2, 1, 5, 6)).float()
    terms = StochasticSegLoss(LossConfig(samples=5))(DeterministicLogits(mu), target)
    assert isinstance(terms, LossTerms)
    d = terms.as_dict()
    assert set(d) == {"total", "data", "ce", "dice", "kl", "orth", "entropy"}
    assert all(isinstance(v, float) for v in d.values())
    assert d["kl"] == d["orth"] == d["entropy"] == 0.0
    assert d["total"] == pytest.approx(d["data"])
    terms.total.backward()
    assert torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0


def test_total_weights_every_term() -> None:
    params = random_params("mob", 2, 2, (4, 4, 4), dtype=torch.float32, partitions=2)
    dist = build("mob", params)
    cfg = LossConfig(lambda_ce=0.7, lambda_dice=1.3, lambda_kl=0.1, lambda_orth=2.0, lambda_w=0.5)
    t = StochasticSegLoss(cfg)(dist, torch.randint(0, 2, (2, 1, 4, 4, 4)))
    assert float(t.data) == pytest.approx(0.7 * float(t.ce) + 1.3 * float(t.dice), rel=1e-6)
    want = float(t.data) + 0.1 * float(t.kl) + 2.0 * float(t.orth) + 0.5 * float(t.entropy)
    assert float(t.total) == pytest.approx(want, rel=1e-6)
    assert float(t.kl) == pytest.approx(float(kl_unit_prior(params["variance"])), rel=1e-6)
    assert float(t.orth) == pytest.approx(float(orthogonality(params["bases"])), rel=1e-6)
    assert float(t.entropy) == pytest.approx(float(weight_negative_entropy(params["weights"])))


@pytest.mark.parametrize(("method", "opts"), VARIANTS, ids=[variant_id(m, o) for m, o in VARIANTS])
def test_gradients_reach_every_parameter(method, opts) -> None:
    params = random_params(method, 2, 2, (4, 4, 4), dtype=torch.float32, requires_grad=True)
    terms = StochasticSegLoss(LossConfig(lambda_kl=0.0))(
        build(method, params, **opts), torch.randint(0, 2, (2, 1, 4, 4, 4))
    )
    terms.total.backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # D gets gradient from the data term alone


def test_extreme_and_half_precision_inputs_stay_finite() -> None:
    params = random_params("mob", 2, 2, (4, 4, 4), dtype=torch.float32)
    params["mu"] = torch.sign(params["mu"]) * 1e4
    params["variance"] = params["variance"] * 1e4
    params = {k: v.requires_grad_() for k, v in params.items()}
    target = torch.randint(0, 2, (2, 1, 4, 4, 4))
    for mc in ("mean", "logsumexp"):
        terms = StochasticSegLoss(LossConfig(mc_loss=mc))(build("mob", params), target)
        assert all(math.isfinite(v) for v in terms.as_dict().values())
        terms.total.backward()
        assert all(torch.isfinite(p.grad).all() for p in params.values())
    tiny = {**params, "variance": torch.full_like(params["variance"], 1e-5)}
    assert math.isfinite(StochasticSegLoss()(build("mob", tiny), target).as_dict()["kl"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = {k: v.detach().to(torch.bfloat16) for k, v in params.items()}
        terms = StochasticSegLoss()(build("mob", half), target)
    assert terms.total.dtype == torch.float32 and math.isfinite(float(terms.total))


def test_target_validation() -> None:
    loss = StochasticSegLoss()
    dist = DeterministicLogits(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 1, \*sp\) = \(2, 1, 4, 4\).*\(2, 1, 4, 5\)"):
        loss(dist, torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\[0, 1\] for C = 2, got \[2, 2\]"):
        loss(dist, torch.full((2, 1, 4, 4), 2))
    # (B, *sp) labels and float labels (nnU-Net's loaders) are accepted.
    a = loss(dist, torch.ones(2, 4, 4, dtype=torch.long)).as_dict()
    b = loss(dist, torch.ones(2, 1, 4, 4)).as_dict()
    assert a == b


# --------------------------------------------- the SSN objective against numpy
def _numpy_ssn(samples: np.ndarray, labels: np.ndarray) -> float:
    """-(1/N) log (1/k) sum_i exp(sum_n log p_i(y_n)), averaged over the patches, in numpy."""
    from scipy.special import log_softmax, logsumexp

    k, b, c = samples.shape[:3]
    logp = log_softmax(samples.reshape(k, b, c, -1), axis=2)  # (k, B, C, N)
    y = labels.reshape(b, -1)
    picked = np.take_along_axis(logp, np.broadcast_to(y[None, :, None], (k, b, 1, y.shape[1])), 2)
    loglik = picked[:, :, 0].sum(-1)  # (k, B): whole-patch log-likelihood of each sample
    per_patch = -(logsumexp(loglik, axis=0) - np.log(k)) / y.shape[1]
    return float(per_patch.mean())


@pytest.mark.parametrize(
    ("method", "classes", "k", "antithetic"),
    [
        ("diagonal", 2, 1, False),
        ("lowrank", 2, 3, False),
        ("mob", 3, 4, True),
        ("lowrank", 4, 6, True),
    ],
)
def test_logsumexp_objective_against_numpy(method, classes, k, antithetic) -> None:
    """The loss on the samples it drew equals the SSN objective computed independently;
    antithetic samples are the pairs mu + e, mu - e."""
    params = random_params(method, 2, classes, (3, 4, 2), dtype=torch.float64, seed=k)
    dist = build(method, params)
    seen: list[torch.Tensor] = []
    original = dist.rsample

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().clone())
        return out

    dist.rsample = spy  # type: ignore[method-assign]
    target = torch.randint(0, classes, (2, 1, 3, 4, 2), generator=torch.Generator().manual_seed(k))
    cfg = LossConfig(samples=k, mc_loss="logsumexp", antithetic=antithetic, lambda_dice=0.0)
    terms = StochasticSegLoss(cfg)(dist, target, generator=torch.Generator().manual_seed(1))
    (samples,) = seen
    assert samples.shape == (k, 2, classes, 3, 4, 2)
    want = _numpy_ssn(samples.numpy(), target[:, 0].numpy())
    assert float(terms.ce) == pytest.approx(want, rel=1e-9)
    assert float(terms.data) == pytest.approx(want, rel=1e-9)  # lambda_dice = 0
    if antithetic:
        mu = params["mu"].expand(k // 2, *params["mu"].shape)
        torch.testing.assert_close(samples[: k // 2] - mu, -(samples[k // 2 :] - mu))
        assert not torch.allclose(samples[: k // 2], mu)
    if k == 1:  # one sample: the per-voxel mean CE of that sample
        ce = F.cross_entropy(samples[0], target[:, 0].long())
        assert float(terms.ce) == pytest.approx(float(ce), rel=1e-9)


def test_logsumexp_rewards_one_good_sample_the_mean_does_not() -> None:
    """Two samples, one right and one wrong everywhere: logsumexp ~ -(log 1/2 + N log p_good)/N,
    i.e. about the good sample's CE (+ ln2 / N), while the mean is the average of both."""
    n = 8
    good, bad = 4.0, -4.0  # logit of the true class (class 1) vs 0
    samples = torch.zeros(2, 1, 2, 2, n // 2, dtype=torch.float64)
    samples[0, 0, 1], samples[1, 0, 1] = good, bad
    target = torch.ones(1, 1, 2, n // 2, dtype=torch.long)

    class Fixed(DeterministicLogits):
        is_deterministic = False

        def rsample(self, k, antithetic=False, generator=None):
            return samples

    dist = Fixed(samples[0])
    lse = StochasticSegLoss(LossConfig(samples=2, mc_loss="logsumexp", lambda_dice=0))(dist, target)
    mean = StochasticSegLoss(LossConfig(samples=2, lambda_dice=0))(dist, target)
    ce_good, ce_bad = math.log1p(math.exp(-good)), math.log1p(math.exp(good))
    assert float(lse.ce) == pytest.approx(ce_good + math.log(2) / n, rel=1e-6)
    assert float(mean.ce) == pytest.approx((ce_good + ce_bad) / 2, rel=1e-9)
