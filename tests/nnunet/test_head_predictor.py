"""The head predictor: stitched distribution parameters against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunet_testlib import DATASET_JSON, RampNet, StubNet, managers, micro_plans, stub_logits

from mobseg.nnunet.predictor import HeadPredictor


def _predictor(net: StubNet, tta: bool = False, patch=(16, 16, 16), save_samples: int = 0):
    pm, cm = managers(micro_plans(patch=patch))
    pred = HeadPredictor(
        tile_step_size=0.5, use_mirroring=tta, device="cpu", save_samples=save_samples
    )
    pred.setup(net, pm, cm, DATASET_JSON, (0, 1, 2), point_mass=net.point_mass)
    return pred


def _parameters_of_samples(samples: torch.Tensor) -> torch.Tensor:
    """(m, s^2) of eta_1 - eta_0 over the sample axis: (2, *sp), population variance."""
    d = (samples[:, 0, 1] - samples[:, 0, 0]).double()
    return torch.stack([d.mean(0), d.var(0, unbiased=False)]).float()


def _tile_starts(size: int, tile: int, step: float = 0.5) -> list[int]:
    """Evenly spread tile starts covering [0, size) with steps of at most step * tile."""
    n = int(np.ceil((size - tile) / (tile * step))) + 1
    if n == 1:
        return [0]
    return [int(np.round(i * (size - tile) / (n - 1))) for i in range(n)]


def _gaussian(tile: tuple[int, int, int]) -> torch.Tensor:
    """nnU-Net's importance map: a Gaussian, sigma = tile / 8, max 10, no zeros."""
    from scipy.ndimage import gaussian_filter

    g = np.zeros(tile)
    g[tuple(t // 2 for t in tile)] = 1
    g = gaussian_filter(g, [t / 8 for t in tile], 0, mode="constant", cval=0)
    g = g / g.max() * 10
    t = torch.from_numpy(g).half().float()  # nnU-Net builds it in float16
    t[t == 0] = t[t > 0].min()
    return t


def _brute_force(image: torch.Tensor, k: int, tile=(16, 16, 16)) -> torch.Tensor:
    """Gaussian-weighted average of each tile's exact (m, s^2), voxel by voxel."""
    shape = image.shape[1:]
    num = torch.zeros((2, *shape))
    den = torch.zeros(shape)
    g = _gaussian(tile)
    starts = [_tile_starts(s, t) for s, t in zip(shape, tile, strict=True)]
    for sx in starts[0]:
        for sy in starts[1]:
            for sz in starts[2]:
                sl = (slice(sx, sx + tile[0]), slice(sy, sy + tile[1]), slice(sz, sz + tile[2]))
                x = image[(slice(None), *sl)][None]
                _, samples = stub_logits(x, k)
                num[(slice(None), *sl)] += _parameters_of_samples(samples) * g
                den[sl] += g
    return num / den


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 20, 33)])
def test_stitched_parameters_equal_brute_force(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    image = torch.randn(1, *shape) * 3
    net = StubNet(5)
    got = _predictor(net).predict_parameters(image.numpy())
    ref = _brute_force(image, 5)
    assert got.shape == (2, *shape) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert net.chunks == []  # parameters, not samples: nothing is drawn


def test_image_smaller_than_the_patch_is_padded_and_cropped_back() -> None:
    torch.manual_seed(2)
    image = torch.randn(1, 10, 16, 7)
    net = StubNet(3)
    got = _predictor(net).predict_parameters(image.numpy())
    assert got.shape == (2, 10, 16, 7) and net.calls == 1
    padded = torch.zeros(1, 16, 16, 16)
    padded[:, 3:13, :, 4:11] = image  # nnU-Net pads evenly on both sides
    _, samples = stub_logits(padded[None], 3)
    ref = _parameters_of_samples(samples)[:, 3:13, :, 4:11]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_point_mass_has_zero_variance_and_the_backbone_logit_difference() -> None:
    torch.manual_seed(3)
    image = torch.randn(1, 16, 16, 16)
    got = _predictor(StubNet(30, point_mass=True)).predict_parameters(image.numpy())
    torch.testing.assert_close(got[0], torch.sin(image[0]))
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_mirroring_averages_the_parameters_of_eight_passes() -> None:
    """A per-voxel model is mirror-equivariant: TTA gives the plain result from 8x the passes."""
    torch.manual_seed(4)
    image = torch.randn(1, 16, 16, 16)
    plain_net, tta_net = StubNet(2, point_mass=True), StubNet(2, point_mass=True)
    plain = _predictor(plain_net).predict_parameters(image.numpy())
    tta = _predictor(tta_net, tta=True).predict_parameters(image.numpy())
    assert tta_net.calls == 8 * plain_net.calls
    torch.testing.assert_close(tta, plain)


def test_mirrored_passes_are_averaged_not_the_first_one_kept() -> None:
    """A model that sees the flip: the mean over the 8 flipped-back passes, by brute force."""

    torch.manual_seed(6)
    image = torch.randn(1, 16, 16, 16)
    got = _predictor(RampNet(), tta=True).predict_parameters(image.numpy())
    ramp = torch.arange(16.0).view(-1, 1, 1).expand(16, 16, 16)
    # flips along axis 0 reverse the ramp in half of the 8 passes: mean ramp = 7.5
    torch.testing.assert_close(got[0], image[0] + 0.75, atol=1e-5, rtol=0)
    expected_var = ((ramp / 20) ** 2 + (ramp.flip(0) / 20) ** 2) / 2
    torch.testing.assert_close(got[1], expected_var, atol=1e-5, rtol=0)


# -- sample masks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "patch"), [((10, 16, 7), (16, 16, 16)), ((5, 9, 16), (8, 12, 16))]
)
def test_unpad_inverts_nnunet_padding(shape: tuple, patch: tuple) -> None:
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    from mobseg.nnunet.predictor import unpad

    image = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape) + 1
    padded, slicer = pad_nd_image(image, patch, "constant", {"value": 0}, True, None)
    got = unpad(padded, shape)
    torch.testing.assert_close(got, padded[(slice(None), *slicer[1:])])
    torch.testing.assert_close(got, image)
    with pytest.raises(ValueError, match="cannot unpad"):
        unpad(image, tuple(s + 1 for s in shape))


def test_sample_labels_follow_the_probit_of_the_logit_difference() -> None:
    """P(label 1) = Phi((mu1 - mu0) / sqrt(v0 + v1)) for independent Gaussian logits."""
    from scipy.stats import norm

    from mobseg.core.distributions import DiagonalLogits
    from mobseg.nnunet.predictor import sample_labels

    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, -1.0, 0.0, 0.5, 2.0, 0.3]).reshape(1, 2, 1, 1, 3)
    var = torch.tensor([1.0, 0.5, 2.0, 0.25, 1.0, 3.0]).reshape(1, 2, 1, 1, 3)
    n = 4000
    labels = sample_labels(DiagonalLogits(mu, var), n, generator=g)
    assert labels.shape == (n, 1, 1, 3) and labels.dtype == torch.uint8
    freq = labels.double().mean(0).flatten().numpy()
    d = (mu[0, 1] - mu[0, 0]).flatten().numpy()
    s = (var[0, 0] + var[0, 1]).sqrt().flatten().numpy()
    expected = norm.cdf(d / s)
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < 4 * se + 1e-9), (freq, expected)


class _TileIdNet(StubNet):
    """Every sample of tile j says label j % 2 (tiles are recognised by their first voxel)."""

    def __init__(self, first_voxel_to_tile: dict[float, int]) -> None:
        super().__init__(2)
        self.tiles = first_voxel_to_tile

    def forward(self, x: torch.Tensor, stochastic: bool = False):
        from nnunet_testlib import StubDist

        self.calls += 1
        j = self.tiles[float(x[0, 0, 0, 0, 0])]
        sign = 1.0 if j % 2 else -1.0
        mu = torch.cat([torch.zeros_like(x), torch.full_like(x, 5.0 * sign)], dim=1)
        return mu, StubDist(mu, torch.stack([mu, mu]), self.chunks)


def test_saved_samples_come_from_the_tile_with_the_largest_weight() -> None:
    shape = (24, 20, 33)
    image = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape)
    probe = _predictor(StubNet(2), save_samples=3)
    slicers = probe._internal_get_sliding_window_slicers(shape)
    tiles = {float(image[sl][0, 0, 0, 0]): j for j, sl in enumerate(slicers)}
    assert len(tiles) == len(slicers) > 8
    # oracle: per voxel, the first tile (in nnU-Net's order) of largest Gaussian weight
    g = _gaussian((16, 16, 16)).numpy()
    weights = np.zeros((len(slicers), *shape), np.float32)
    for j, sl in enumerate(slicers):
        weights[(j, *sl[1:])] = g
    expected = (np.argmax(weights, axis=0) % 2).astype(np.uint8)

    pred = _predictor(_TileIdNet(tiles), save_samples=3)
    pred.predict_parameters(image.numpy())
    got = pred.last_samples
    assert got is not None and got.shape == (3, *shape) and got.dtype == torch.uint8
    for i in range(3):
        np.testing.assert_array_equal(got[i].numpy(), expected)


def test_point_mass_keeps_no_samples_and_small_images_are_unpadded() -> None:
    torch.manual_seed(5)
    image = torch.randn(1, 10, 16, 7) * 3
    det = _predictor(StubNet(3, point_mass=True), save_samples=4)
    det.predict_parameters(image.numpy())
    assert det.num_saved_samples == 0 and det.last_samples is None

    sto = _predictor(StubNet(3), save_samples=4)
    sto.predict_parameters(image.numpy())
    assert sto.last_samples is not None and sto.last_samples.shape == (4, 10, 16, 7)
    # the stub's samples cycle: saved sample i of the single tile is stub sample i % 3
    padded = torch.zeros(1, 16, 16, 16)
    padded[:, 3:13, :, 4:11] = image
    _, samples = stub_logits(padded[None], 3)
    for i in range(4):
        ref = samples[i % 3, 0].argmax(0)[3:13, :, 4:11].to(torch.uint8)
        torch.testing.assert_close(sto.last_samples[i], ref)
    with pytest.raises(ValueError, match="save_samples"):
        HeadPredictor(save_samples=-1)
