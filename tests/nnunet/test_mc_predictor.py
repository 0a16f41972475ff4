"""Monte-Carlo predictor: stitched moments against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunet_testlib import DATASET_JSON, StubNet, managers, micro_plans, stub_logits

from mobseg.nnunet.predictor import MCPredictor


def _predictor(net: StubNet, k: int, chunk: int, tta: bool = False, patch=(16, 16, 16)):
    pm, cm = managers(micro_plans(patch=patch))
    pred = MCPredictor(samples=k, chunk=chunk, tile_step_size=0.5, use_mirroring=tta, device="cpu")
    pred.setup(net, pm, cm, DATASET_JSON, (0, 1, 2), point_mass=net.point_mass)
    return pred


def _moments_of_samples(samples: torch.Tensor) -> torch.Tensor:
    """E[p], E[p^2], E[H] over the sample axis, all samples in memory: (2C+1, *sp)."""
    p = torch.softmax(samples.double(), dim=2)[:, 0]  # (k, C, *sp)
    h = -(p * torch.log(p)).sum(1, keepdim=True)
    return torch.cat([p.mean(0), (p**2).mean(0), h.mean(0)]).float()


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
    """Gaussian-weighted average of each tile's exact sample moments, voxel by voxel."""
    shape = image.shape[1:]
    num = torch.zeros((5, *shape))
    den = torch.zeros(shape)
    g = _gaussian(tile)
    starts = [_tile_starts(s, t) for s, t in zip(shape, tile, strict=True)]
    for sx in starts[0]:
        for sy in starts[1]:
            for sz in starts[2]:
                sl = (slice(sx, sx + tile[0]), slice(sy, sy + tile[1]), slice(sz, sz + tile[2]))
                x = image[(slice(None), *sl)][None]
                _, samples = stub_logits(x, k)
                num[(slice(None), *sl)] += _moments_of_samples(samples) * g
                den[sl] += g
    return num / den


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 20, 33)])
def test_stitched_moments_equal_brute_force(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    image = torch.randn(1, *shape) * 3
    k = 5
    net = StubNet(k)
    got = _predictor(net, k, chunk=2).predict_moments(image.numpy())
    ref = _brute_force(image, k)
    assert got.shape == (5, *shape) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # samples were drawn at most `chunk` at a time, k per tile
    n_tiles = net.calls
    assert max(net.chunks) <= 2 and sum(net.chunks) == k * n_tiles


def test_stitched_variance_and_information_are_non_negative() -> None:
    torch.manual_seed(1)
    image = torch.randn(1, 24, 20, 33) * 3
    m = _predictor(StubNet(4), 4, chunk=4).predict_moments(image.numpy())
    var = m[2:4] - m[0:2] ** 2
    assert (var > -1e-6).all()
    p = m[0:2]
    h = -(p * torch.log(p)).sum(0)
    assert (h - m[4] > -1e-6).all()
    torch.testing.assert_close(p.sum(0), torch.ones_like(p[0]))


def test_image_smaller_than_the_patch_is_padded_and_cropped_back() -> None:
    torch.manual_seed(2)
    image = torch.randn(1, 10, 16, 7)
    net = StubNet(3)
    got = _predictor(net, 3, chunk=3).predict_moments(image.numpy())
    assert got.shape == (5, 10, 16, 7) and net.calls == 1
    # one tile: the moments of the padded tile, cropped back
    padded = torch.zeros(1, 16, 16, 16)
    padded[:, 3:13, :, 4:11] = image  # nnU-Net pads evenly on both sides
    _, samples = stub_logits(padded[None], 3)
    ref = _moments_of_samples(samples)[:, 3:13, :, 4:11]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_point_mass_is_evaluated_once_per_tile() -> None:
    torch.manual_seed(3)
    image = torch.randn(1, 16, 16, 16)
    net = StubNet(30, point_mass=True)
    got = _predictor(net, 30, chunk=10).predict_moments(image.numpy())
    assert net.chunks == []  # no sampling
    p = torch.softmax(torch.cat([torch.zeros_like(image), torch.sin(image)]).double(), 0).float()
    torch.testing.assert_close(got[:2], p)
    torch.testing.assert_close(got[2:4], p**2)


def test_mirroring_counts_as_more_samples() -> None:
    """Mirrored passes (8 per tile) average moments; a per-voxel model is mirror-equivariant."""
    torch.manual_seed(4)
    image = torch.randn(1, 16, 16, 16)
    plain_net, tta_net = StubNet(2, point_mass=True), StubNet(2, point_mass=True)
    plain = _predictor(plain_net, 2, 2).predict_moments(image.numpy())
    tta = _predictor(tta_net, 2, 2, tta=True).predict_moments(image.numpy())
    assert tta_net.calls == 8 * plain_net.calls
    torch.testing.assert_close(tta, plain)


def _head_dist(method: str, seed: int = 0, sp: tuple[int, int, int] = (4, 4, 4)):
    from mobseg.core.config import HeadConfig
    from mobseg.core.registry import build_head

    torch.manual_seed(seed)
    head = build_head(HeadConfig(method, rank=4, bases=2, partitions=2), 6)
    for p in head.parameters():  # larger variances than at initialisation
        p.data.normal_(0, 0.3)
    feats = torch.randn(1, 6, *sp)
    mu = torch.randn(1, 2, *sp) * 2
    with torch.no_grad():
        return head(feats, mu)


def _gauss_hermite_moments(loc: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Exact E[p_1], E[p_1^2], E[H] for d ~ N(loc, var), p_1 = sigmoid(d) (80-node quadrature)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    d = loc[..., None] + np.sqrt(var)[..., None] * x
    p1 = 1 / (1 + np.exp(-d))
    h = p1 * np.logaddexp(0, -d) + (1 - p1) * np.logaddexp(0, d)  # -ln p1 = softplus(-d)
    return np.stack([(p1 * w).sum(-1), (p1**2 * w).sum(-1), (h * w).sum(-1)])


@pytest.mark.parametrize("method", ["diagonal", "lowrank", "single-basis", "mob"])
def test_binary_sampling_matches_quadrature_of_the_marginal(method: str) -> None:
    from mobseg.nnunet.predictor import binary_marginal_moments

    dist = _head_dist(method)
    gen = torch.Generator().manual_seed(0)
    k = 20000
    got = binary_marginal_moments(dist, k, chunk=5000, generator=gen)[0].double().numpy()
    mu = dist.mean[0].double().numpy()
    # the marginal variance of eta_1 - eta_0 from the distribution's own samples (independent
    # of voxel_covariance): 4000 joint draws
    eta = dist.rsample(4000)[:, 0].detach().double()
    var = (eta[:, 1] - eta[:, 0]).var(0).numpy()
    exact = _gauss_hermite_moments(mu[1] - mu[0], var)
    # MC error of a mean of k values in [0, 1] (<= 0.5 / sqrt(k)) plus the error of var
    np.testing.assert_allclose(got[1], exact[0], atol=0.02)
    np.testing.assert_allclose(got[3], exact[1], atol=0.02)
    np.testing.assert_allclose(got[4], exact[2], atol=0.03)
    np.testing.assert_allclose(got[0] + got[1], 1.0, atol=1e-6)
    assert (got[3] - got[1] ** 2 >= -1e-6).all()


@pytest.mark.parametrize("method", ["lowrank", "mob"])
def test_binary_sampling_agrees_with_joint_sampling(method: str) -> None:
    """Same moments as core's mc_moments (softmax of full joint samples), within MC error."""
    from mobseg.core.inference import mc_moments
    from mobseg.nnunet.predictor import binary_marginal_moments

    dist = _head_dist(method, seed=3)
    torch.manual_seed(1)
    ours = binary_marginal_moments(dist, 6000, chunk=2000)[0]
    ref = mc_moments(dist, 6000, chunk=2000)
    theirs = torch.cat([ref.mean_p, ref.mean_p2, ref.mean_entropy], 1)[0]
    torch.testing.assert_close(ours, theirs.float(), atol=0.03, rtol=0)


def test_automatic_chunk_fits_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from mobseg.nnunet import predictor as mod

    pred = _predictor(StubNet(30), 30, chunk=None)
    tile = torch.zeros(1, 1, 16, 16, 16)
    assert pred.chunk_for(tile, 30) == 30  # 30 x 4096 values fit in 2^22
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 3 * 4096)
    assert pred.chunk_for(tile, 30) == 3
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 10)
    assert pred.chunk_for(tile, 30) == 1
    fixed = _predictor(StubNet(30), 30, chunk=7)
    assert fixed.chunk_for(tile, 30) == 7


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
    pm, cm = managers(micro_plans(patch=(16, 16, 16)))
    probe = MCPredictor(samples=2, tile_step_size=0.5, device="cpu", save_samples=3)
    probe.setup(StubNet(2), pm, cm, DATASET_JSON, (0, 1, 2), point_mass=False)
    slicers = probe._internal_get_sliding_window_slicers(shape)
    tiles = {float(image[sl][0, 0, 0, 0]): j for j, sl in enumerate(slicers)}
    assert len(tiles) == len(slicers) > 8
    # oracle: per voxel, the first tile (in nnU-Net's order) of largest Gaussian weight
    g = _gaussian((16, 16, 16)).numpy()
    weights = np.zeros((len(slicers), *shape), np.float32)
    for j, sl in enumerate(slicers):
        weights[(j, *sl[1:])] = g
    expected = (np.argmax(weights, axis=0) % 2).astype(np.uint8)

    pred = MCPredictor(samples=2, tile_step_size=0.5, device="cpu", save_samples=3)
    pred.setup(_TileIdNet(tiles), pm, cm, DATASET_JSON, (0, 1, 2), point_mass=False)
    pred.predict_moments(image.numpy())
    got = pred.last_samples
    assert got is not None and got.shape == (3, *shape) and got.dtype == torch.uint8
    for i in range(3):
        np.testing.assert_array_equal(got[i].numpy(), expected)


def test_point_mass_keeps_no_samples_and_small_images_are_unpadded() -> None:
    torch.manual_seed(5)
    image = torch.randn(1, 10, 16, 7) * 3
    pm, cm = managers(micro_plans(patch=(16, 16, 16)))
    det = MCPredictor(samples=3, device="cpu", save_samples=4)
    det.setup(StubNet(3, point_mass=True), pm, cm, DATASET_JSON, (0, 1, 2), point_mass=True)
    det.predict_moments(image.numpy())
    assert det.num_saved_samples == 0 and det.last_samples is None

    sto = MCPredictor(samples=3, device="cpu", save_samples=4)
    sto.setup(StubNet(3), pm, cm, DATASET_JSON, (0, 1, 2), point_mass=False)
    sto.predict_moments(image.numpy())
    assert sto.last_samples is not None and sto.last_samples.shape == (4, 10, 16, 7)
    # the stub's samples cycle: saved sample i of the single tile is stub sample i % 3
    padded = torch.zeros(1, 16, 16, 16)
    padded[:, 3:13, :, 4:11] = image
    _, samples = stub_logits(padded[None], 3)
    for i in range(4):
        ref = samples[i % 3, 0].argmax(0)[3:13, :, 4:11].to(torch.uint8)
        torch.testing.assert_close(sto.last_samples[i], ref)
    with pytest.raises(ValueError, match="save_samples"):
        MCPredictor(save_samples=-1)
