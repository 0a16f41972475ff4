"""Partitions into P^d blocks: geometry against torch.tensor_split / numpy, block ops vs loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mobseg.core.partitions import (
    axis_sizes,
    block_matvec,
    block_mean,
    get_partition,
)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 9, 16, 33])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5])
def test_axis_sizes_match_tensor_split_and_numpy(length: int, parts: int) -> None:
    expected = [len(c) for c in torch.tensor_split(torch.arange(length), parts)]
    assert list(axis_sizes(length, parts)) == expected
    assert expected == [len(c) for c in np.array_split(np.arange(length), parts)]


def test_7x5x9_with_p4_covers_every_voxel_exactly_once() -> None:
    part = get_partition((7, 5, 9), 4)
    cover = np.zeros((7, 5, 9), dtype=int)
    owner = np.full((7, 5, 9), -1)
    for p, sl in enumerate(part.block_slices()):
        cover[sl] += 1
        owner[sl] = p
    assert (cover == 1).all()
    assert part.num_blocks == 64
    # The voxel -> block index map agrees with the slices, block by block.
    assert np.array_equal(part.index().numpy(), owner.reshape(-1))
    assert part.counts().tolist() == [int((owner == p).sum()) for p in range(64)]
    assert int(part.counts().sum()) == 7 * 5 * 9
    # Boundaries are those of torch.tensor_split, axis by axis.
    for ax, n in enumerate((7, 5, 9)):
        chunks = torch.tensor_split(torch.arange(n), 4)
        starts = [int(c[0]) for c in chunks if len(c)]
        assert list(part.edges(ax))[:-1][: len(starts)] == starts


def test_fewer_voxels_than_parts_gives_empty_blocks() -> None:
    part = get_partition((3, 2), 4)
    sizes = part.block_sizes()
    assert sum(sizes) == 6 and sizes.count(0) == 16 - 6
    assert part.nonempty_mask().sum() == 6
    assert sorted(set(part.index().tolist())) == part.nonempty_blocks()


def test_partition_is_cached() -> None:
    a = get_partition((6, 6, 6), 4)
    assert get_partition((6, 6, 6), 4) is a
    assert a.index() is a.index()


def test_block_mean_equals_loop_and_empty_blocks_are_zero() -> None:
    torch.manual_seed(0)
    for shape, parts in [((7, 5, 9), 4), ((6, 4), 3), ((3, 2, 5), 4)]:
        x = torch.randn(2, 3, *shape, dtype=torch.float64)
        part = get_partition(shape, parts)
        got = block_mean(x, part)
        assert got.shape == (2, 3, parts ** len(shape))
        for p, sl in enumerate(part.block_slices()):
            block = x[(slice(None), slice(None), *sl)]
            want = block.flatten(2).mean(-1) if block[0, 0].numel() else torch.zeros(2, 3)
            torch.testing.assert_close(got[:, :, p], want.to(got.dtype))


def _matvec_loop(g: torch.Tensor, x: torch.Tensor, index: torch.Tensor, square: bool):
    b, r = x.shape[:2]
    xf = x.reshape(b, r, -1)
    xf = xf * xf if square else xf
    out = torch.zeros(b, g.shape[2], xf.shape[-1], dtype=x.dtype)
    for n in range(xf.shape[-1]):
        out[:, :, n] = torch.einsum("bjr,br->bj", g[:, int(index[n])], xf[:, :, n])
    return out.reshape(b, g.shape[2], *x.shape[2:])


@pytest.mark.parametrize(
    ("shape", "parts"), [((8, 4, 6), 2), ((7, 5, 9), 4), ((5, 6), 3), ((4, 8), 4), ((3, 3, 3), 1)]
)
@pytest.mark.parametrize("square", [False, True])
def test_block_matvec_equals_voxel_loop(shape, parts, square) -> None:
    torch.manual_seed(1)
    part = get_partition(shape, parts)
    g = torch.randn(2, part.num_blocks, 4, 3, dtype=torch.float64)
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    got = block_matvec(g, x, part, square=square)
    torch.testing.assert_close(got, _matvec_loop(g, x, part.index(), square))


@pytest.mark.parametrize(("shape", "parts"), [((3, 2, 3), 2), ((4, 4), 2)])
@pytest.mark.parametrize("square", [False, True])
def test_block_matvec_gradcheck(shape, parts, square) -> None:
    torch.manual_seed(2)
    part = get_partition(shape, parts)
    g = torch.randn(2, part.num_blocks, 2, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, x: block_matvec(g, x, part, square), (g, x))


def test_block_matvec_rejects_mismatched_shapes() -> None:
    part = get_partition((4, 4, 4), 2)
    with pytest.raises(ValueError, match=r"\(2, 5, 3, 3\)"):
        block_matvec(torch.zeros(2, 5, 3, 3), torch.zeros(2, 3, 4, 4, 4), part)
    with pytest.raises(ValueError, match="differ in R"):
        block_matvec(torch.zeros(2, 8, 3, 2), torch.zeros(2, 3, 4, 4, 4), part)
    with pytest.raises(ValueError, match="2D or 3D"):
        get_partition((4,), 2)


def test_pad_indices_round_trip() -> None:
    part = get_partition((7, 5, 9), 4)
    for ax, n in enumerate((7, 5, 9)):
        pad, unpad = part.pad_index(ax), part.unpad_index(ax)
        assert pad is not None and len(pad) == 4 * part.padded_size(ax)
        # Real positions come back unchanged after padding and unpadding.
        assert torch.equal(pad[unpad], torch.arange(n))
        # Every padded slot of piece i reads a voxel of piece i (or voxel 0 if empty).
        e = part.edges(ax)
        for i, j in itertools.product(range(4), range(part.padded_size(ax))):
            src = int(pad[i * part.padded_size(ax) + j])
            assert e[i] <= src < e[i + 1] or (e[i] == e[i + 1] and src == 0)
    assert get_partition((8, 8), 4).pad_index(0) is None


@pytest.mark.parametrize(("shape", "parts"), [((8, 4, 6), 2), ((7, 5, 9), 4), ((9, 6), 3)])
def test_block_matvec_in_small_chunks(shape, parts, monkeypatch) -> None:
    """Rows of blocks cut into several chunks along the first axis give the same result."""
    import mobseg.core.partitions as partitions

    monkeypatch.setattr(partitions, "CHUNK_ELEMENTS", 7)
    torch.manual_seed(3)
    part = get_partition(shape, parts)
    g = torch.randn(2, part.num_blocks, 3, 2, dtype=torch.float64)
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    for square in (False, True):
        got = block_matvec(g, x, part, square=square)
        torch.testing.assert_close(got, _matvec_loop(g, x, part.index(), square))
    if shape == (8, 4, 6):
        g.requires_grad_()
        x = x[:, :, :4].clone().requires_grad_()  # (2, 2, 4, 4, 6): 2 planes per block row
        part = get_partition((4, 4, 6), 2)
        for square in (False, True):
            assert torch.autograd.gradcheck(
                lambda g, x, s=square: block_matvec(g, x, part, s), (g, x), fast_mode=True
            )


def test_partition_first_used_in_inference_mode_still_trains() -> None:
    """Validation (inference_mode) may build the cache before training uses it."""
    from mobseg.core.config import HeadConfig, LossConfig
    from mobseg.core.losses import StochasticSegLoss
    from mobseg.core.registry import build_head

    torch.manual_seed(0)
    shape = (5, 7, 6)  # a shape no other test caches first
    head = build_head(HeadConfig("mob", bases=2, rank=2, partitions=3), in_channels=4)
    feats = torch.randn(1, 4, *shape)
    mu = torch.randn(1, 2, *shape, requires_grad=True)
    with torch.inference_mode():
        head(feats, mu.detach()).rsample(2)
    target = (torch.rand(1, 1, *shape) > 0.5).long()
    terms = StochasticSegLoss(LossConfig(samples=2))(head(feats, mu), target)
    terms.total.backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all()
