"""MC dropout and --tta-mixture in the predictor: stitched moments of a mixture of passes."""

from __future__ import annotations

import pytest
import torch
from nnunet_testlib import DATASET_JSON, RampNet, StubDist, StubNet, managers, micro_plans
from torch import distributions as D

from mobseg.core.mixture import PassMoments, mixture_parameters
from mobseg.nnunet.predictor import HeadPredictor

SHIFTS = (0.5, -1.0, 2.0, 0.25)


def _predictor(net: StubNet, **kw) -> HeadPredictor:
    pm, cm = managers(micro_plans(patch=(16, 16, 16)))
    pred = HeadPredictor(tile_step_size=0.5, device="cpu", **kw)
    pred.setup(net, pm, cm, DATASET_JSON, (0, 1, 2), point_mass=net.point_mass)
    return pred


class DropoutStub(StubNet):
    """Pass t (per tile): mu_1 = x + a_t cos(x), logit variance (1 + x^2) / 8 * b_t.

    ``drop`` carries the ``mobseg_dropout`` attribute of a hooked convolution; its
    training flag is recorded at every call.
    """

    def __init__(self, shifts=SHIFTS, scales=(1.0, 2.0, 0.5, 1.5), active=True) -> None:
        super().__init__(2)
        self.shifts, self.scales = shifts, scales
        self.drop = torch.nn.Conv3d(1, 1, 1)
        if active:
            self.drop.mobseg_dropout = 0.1
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor, stochastic: bool = False):
        t = self.calls % len(self.shifts)
        self.calls += 1
        self.modes.append(self.drop.training)
        a = self.shifts[t] if self.drop.training else 0.0
        b = self.scales[t] if self.drop.training else 1.0
        mu = torch.cat([torch.zeros_like(x), x + a * torch.cos(x)], dim=1)
        sd = ((1 + x**2) / 8 * b).sqrt()  # eta_1 = mu_1 +- sd: Var[d] = sd^2
        samples = torch.stack([mu.clone(), mu.clone()])
        samples[0, :, 1:] += sd
        samples[1, :, 1:] -= sd
        return mu, StubDist(mu, samples, self.chunks)


def _oracle(means: list[torch.Tensor], variances: list[torch.Tensor]) -> torch.Tensor:
    """(m, s^2, between) of the equal-weight Gaussian mixture, from torch.distributions."""
    loc = torch.stack(means, -1).double()
    scale = torch.stack(variances, -1).double().sqrt()
    mix = D.MixtureSameFamily(
        D.Categorical(torch.ones(loc.shape[-1], dtype=torch.float64)), D.Normal(loc, scale)
    )
    between = loc.var(-1, unbiased=False)
    return torch.stack([mix.mean, mix.variance, between]).float()


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 20, 33)])
def test_mc_dropout_stitches_the_mixture_moments_of_the_passes(shape) -> None:
    torch.manual_seed(0)
    image = torch.randn(1, *shape)
    net = DropoutStub()
    pred = _predictor(net, use_mirroring=False, passes=4, mc_dropout=True)
    got = pred.predict_parameters(image.numpy())
    x = image[0]
    means = [x + a * torch.cos(x) for a in SHIFTS]
    variances = [(1 + x**2) / 8 * b for b in (1.0, 2.0, 0.5, 1.5)]
    assert got.shape == (3, *shape)
    torch.testing.assert_close(got, _oracle(means, variances), atol=2e-5, rtol=1e-4)
    assert net.calls % 4 == 0 and all(net.modes)  # nnU-Net's eval() did not switch dropout off


def test_mc_dropout_with_plain_tta_averages_the_per_mirror_mixtures() -> None:
    """A per-voxel model is mirror-equivariant: TTA + T passes equals T passes, 8x the calls."""
    torch.manual_seed(1)
    image = torch.randn(1, 16, 16, 16)
    plain_net, tta_net = DropoutStub(), DropoutStub()
    plain = _predictor(plain_net, use_mirroring=False, passes=4, mc_dropout=True)
    tta = _predictor(tta_net, use_mirroring=True, passes=4, mc_dropout=True)
    a = plain.predict_parameters(image.numpy())
    b = tta.predict_parameters(image.numpy())
    assert tta_net.calls == 8 * plain_net.calls
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_dropout_rate_zero_gives_the_plain_prediction() -> None:
    """No hooked module: the T passes are equal, the mixture is the plain prediction."""
    torch.manual_seed(2)
    image = torch.randn(1, 24, 20, 33)
    plain = _predictor(DropoutStub(active=False), use_mirroring=False).predict_parameters(
        image.numpy()
    )
    net = DropoutStub(active=False)
    got = _predictor(net, use_mirroring=False, passes=3, mc_dropout=True).predict_parameters(
        image.numpy()
    )
    assert plain.shape == (2, 24, 20, 33) and not any(net.modes)
    torch.testing.assert_close(got[:2], plain, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_tta_mixture_adds_the_spread_of_the_mirrored_passes() -> None:
    """A model that sees the flip: its 8 passes as a Gaussian mixture, by torch.distributions."""

    torch.manual_seed(6)
    image = torch.randn(1, 16, 16, 16)
    net = RampNet(0.1)
    got = _predictor(net, use_mirroring=True, tta_mixture=True).predict_parameters(image.numpy())
    assert net.calls == 8
    ramp = torch.arange(16.0).view(-1, 1, 1).expand(16, 16, 16)
    x = image[0]
    ramps = [ramp] * 4 + [ramp.flip(0)] * 4  # 4 of the 8 flips reverse axis 0
    means = [x + r / 10 for r in ramps]
    variances = [(r / 20 + 0.1) ** 2 for r in ramps]
    torch.testing.assert_close(got, _oracle(means, variances), atol=2e-5, rtol=1e-4)
    # the default TTA averages the same passes: same mean, no between-pass variance
    plain = _predictor(RampNet(0.1), use_mirroring=True).predict_parameters(image.numpy())
    torch.testing.assert_close(plain[0], got[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(plain[1] + got[2], got[1], atol=1e-5, rtol=1e-5)


def test_pass_moments_match_the_stacked_formula() -> None:
    torch.manual_seed(3)
    m = torch.randn(7, 1, 1, 5) * 3
    s2 = torch.rand(7, 1, 1, 5)
    got = mixture_parameters(torch.cat([m, s2], dim=2))
    torch.testing.assert_close(got[:, 0:1], m.mean(0))
    torch.testing.assert_close(got[:, 2:3], m.var(0, unbiased=False))
    torch.testing.assert_close(got[:, 1:2], s2.mean(0) + m.var(0, unbiased=False))
    with pytest.raises(ValueError, match="no pass"):
        PassMoments().result()
    with pytest.raises(ValueError, match="two classes"):
        PassMoments().add(torch.zeros(1, 3, 4))
