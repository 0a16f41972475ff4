"""Partition of a patch into P x P (x P) blocks (SPEC section 3, item 5).

Each spatial axis of length L is cut into P consecutive pieces exactly as
``torch.tensor_split(torch.arange(L), P)`` does: the first ``L % P`` pieces
have ``ceil(L / P)`` voxels, the others ``floor(L / P)``. No size has to be
divisible by P; when ``L < P`` the last pieces are empty, and so are the blocks
that contain them (they hold no voxel and are ignored by every consumer).

Blocks are numbered in row-major order of their per-axis piece indices:
block ``p = (i0 * P + i1) * P + i2`` for 3D, ``p = i0 * P + i1`` for 2D.

The partition of a spatial shape is computed once and cached
(:func:`get_partition`); its index tensors are cached per device.

Two operations are provided as tensor ops without any loop over voxels:

* :func:`block_mean` -- the mean of a feature map over each block, computed as
  a separable product of per-axis averaging matrices (a few small matmuls).
* :func:`block_matvec` -- ``out[b, j, n] = sum_r G[b, p(n), j, r] x[b, r, n]``,
  a block-dependent small matrix applied to a per-voxel vector. ``x`` is
  copied into block-major order through ``view`` + ``permute`` (squared on
  the fly when asked), multiplied by its block matrices with one ``bmm`` and
  written back. Tensors above CHUNK_ELEMENTS values (64 MB) are processed in
  slabs (one batch item, one piece of the first axis: P^(d-1) blocks), so no
  temporary of the size of a large ``x`` is created; the Python loop runs over
  these B * P slabs, never over voxels. Axes
  whose length is not a multiple of P are first padded to P * ceil(L / P) by an
  ``index_select`` that repeats a voxel of each short piece; the padded outputs
  are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product

import torch
from torch import Tensor


def axis_sizes(length: int, parts: int) -> tuple[int, ...]:
    """Sizes of the ``parts`` pieces of an axis of ``length`` voxels.

    Same rule as ``torch.tensor_split``: ``length % parts`` pieces of
    ``length // parts + 1`` voxels first, then pieces of ``length // parts``.

    Args:
        length: Number of voxels along the axis (>= 1).
        parts: P, number of pieces (>= 1).

    Returns:
        A tuple of ``parts`` non-negative sizes summing to ``length``.
    """
    if length < 1 or parts < 1:
        raise ValueError(f"axis_sizes needs length >= 1 and parts >= 1, got {length}, {parts}.")
    q, r = divmod(length, parts)
    return tuple(q + 1 if i < r else q for i in range(parts))


@dataclass(frozen=True)
class BlockPartition:
    """The P^d blocks of a d-dimensional patch (d = 2 or 3).

    Attributes:
        spatial_shape: Patch size, e.g. ``(D, H, W)``.
        parts: P, pieces per axis.
        sizes: Per axis, the P piece sizes (see :func:`axis_sizes`).
    """

    spatial_shape: tuple[int, ...]
    parts: int
    sizes: tuple[tuple[int, ...], ...] = field(init=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.spatial_shape) not in (2, 3):
            raise ValueError(f"Partitions need a 2D or 3D spatial shape, got {self.spatial_shape}.")
        object.__setattr__(
            self, "sizes", tuple(axis_sizes(n, self.parts) for n in self.spatial_shape)
        )

    @property
    def ndim(self) -> int:
        """Number of spatial axes d."""
        return len(self.spatial_shape)

    @property
    def num_blocks(self) -> int:
        """P^d, including empty blocks."""
        return self.parts**self.ndim

    @property
    def num_voxels(self) -> int:
        """N, voxels in the patch."""
        return math.prod(self.spatial_shape)

    def edges(self, axis: int) -> tuple[int, ...]:
        """The P + 1 boundaries of the pieces along ``axis``."""
        out = [0]
        for s in self.sizes[axis]:
            out.append(out[-1] + s)
        return tuple(out)

    def block_slices(self) -> list[tuple[slice, ...]]:
        """Per block (row-major order), the tuple of spatial slices that selects it."""
        key = "slices"
        if key not in self._cache:
            per_axis = []
            for ax in range(self.ndim):
                e = self.edges(ax)
                per_axis.append([slice(e[i], e[i + 1]) for i in range(self.parts)])
            self._cache[key] = [tuple(s) for s in product(*per_axis)]
        return self._cache[key]

    def block_sizes(self) -> list[int]:
        """Voxels per block (row-major order); 0 for empty blocks."""
        return [math.prod(c) for c in product(*self.sizes)]

    def nonempty_blocks(self) -> list[int]:
        """Indices of the blocks that hold at least one voxel."""
        return [p for p, n in enumerate(self.block_sizes()) if n > 0]

    def _device_tensor(self, name: str, device: torch.device | str, build) -> Tensor:
        key = (name, str(torch.device(device)))
        if key not in self._cache:
            # Cached tensors outlive the call: never let them be inference
            # tensors (a first call inside inference_mode, e.g. validation,
            # would otherwise poison every later autograd use).
            with torch.inference_mode(False):
                self._cache[key] = build().to(device)
        return self._cache[key]

    def index(self, device: torch.device | str = "cpu") -> Tensor:
        """Block id of every voxel, shape (N,), int64, in C order of the spatial axes."""

        def build() -> Tensor:
            p = self.parts
            ids = [
                torch.repeat_interleave(torch.arange(p), torch.tensor(self.sizes[ax]))
                for ax in range(self.ndim)
            ]
            if self.ndim == 2:
                out = ids[0][:, None] * p + ids[1][None, :]
            else:
                out = (ids[0][:, None, None] * p + ids[1][None, :, None]) * p + ids[2][None, None]
            return out.reshape(-1)

        return self._device_tensor("index", device, build)

    def counts(self, device: torch.device | str = "cpu") -> Tensor:
        """Voxels per block, shape (P^d,), int64."""
        return self._device_tensor(
            "counts", device, lambda: torch.tensor(self.block_sizes(), dtype=torch.int64)
        )

    def nonempty_mask(self, device: torch.device | str = "cpu") -> Tensor:
        """Boolean mask of the non-empty blocks, shape (P^d,)."""
        return self._device_tensor("mask", device, lambda: torch.tensor(self.block_sizes()) > 0)

    def padded_size(self, axis: int) -> int:
        """ceil(L / P): the piece size every piece of ``axis`` is padded to."""
        return max(self.sizes[axis])

    @property
    def uniform(self) -> bool:
        """True when every piece of every axis has the same size (no padding needed)."""
        return all(len(set(s)) == 1 for s in self.sizes)

    def pad_index(self, axis: int, device: torch.device | str = "cpu") -> Tensor | None:
        """Source position of every padded position along ``axis`` (None if no padding).

        Piece i occupies padded positions ``[i * s, (i + 1) * s)`` with s =
        :meth:`padded_size`; slots past the end of a short piece repeat its
        last voxel (or voxel 0 for an empty piece).
        """
        if len(set(self.sizes[axis])) == 1:
            return None

        def build() -> Tensor:
            s, e = self.padded_size(axis), self.edges(axis)
            out = []
            for i in range(self.parts):
                n = e[i + 1] - e[i]
                last = e[i + 1] - 1 if n > 0 else 0
                out.extend(e[i] + o if o < n else last for o in range(s))
            return torch.tensor(out, dtype=torch.int64)

        return self._device_tensor(f"pad{axis}", device, build)

    def unpad_index(self, axis: int, device: torch.device | str = "cpu") -> Tensor | None:
        """Padded position of every real position along ``axis`` (None if no padding)."""
        if len(set(self.sizes[axis])) == 1:
            return None

        def build() -> Tensor:
            s, e = self.padded_size(axis), self.edges(axis)
            out = [i * s + o for i in range(self.parts) for o in range(e[i + 1] - e[i])]
            return torch.tensor(out, dtype=torch.int64)

        return self._device_tensor(f"unpad{axis}", device, build)

    def indicators(self, axis: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """One-hot piece membership along ``axis``, shape (L, P): E[l, i] = [l in piece i]."""
        key = ("indicator", axis, dtype, str(torch.device(device)))
        if key not in self._cache:
            self._cache[key] = self._build_indicators(axis, dtype, device)
        return self._cache[key]

    def _build_indicators(
        self, axis: int, dtype: torch.dtype, device: torch.device | str
    ) -> Tensor:
        with torch.inference_mode(False):
            e = self.edges(axis)
            pos = torch.arange(self.spatial_shape[axis])
            lo = torch.tensor(e[:-1])
            hi = torch.tensor(e[1:])
            ind = (pos[:, None] >= lo[None]) & (pos[:, None] < hi[None])
            return ind.to(dtype=dtype, device=device)


@lru_cache(maxsize=128)
def get_partition(spatial_shape: tuple[int, ...], parts: int) -> BlockPartition:
    """The (cached) partition of ``spatial_shape`` into ``parts`` pieces per axis."""
    return BlockPartition(tuple(int(s) for s in spatial_shape), int(parts))


def block_mean(x: Tensor, partition: BlockPartition) -> Tensor:
    """Mean of ``x`` over each block.

    ``out[b, f, p] = (1 / |p|) sum_{n in p} x[b, f, n]``; empty blocks give 0.
    The block sum is separable (a box is a product of per-axis pieces), so it is
    computed as successive contractions with the (L, P) indicator matrices.

    Args:
        x: (B, F, *spatial) features.
        partition: Partition of ``spatial``.

    Returns:
        (B, F, P^d) block means.
    """
    sp = tuple(x.shape[2:])
    if sp != partition.spatial_shape:
        raise ValueError(
            f"block_mean: x has spatial shape {sp}, the partition {partition.spatial_shape}."
        )
    out = x
    # Contract the last spatial axis first; each step turns one axis of length L into
    # P piece means (the indicators are pre-divided by the piece sizes, so values
    # stay on the scale of x: no overflow of block sums in half precision).
    for ax in reversed(range(partition.ndim)):
        e = partition.indicators(ax, x.dtype, x.device)
        e = e / e.sum(0).clamp_min(1)
        out = torch.movedim(out, 2 + ax, -1) @ e  # axis -> last, contract, P at the end
        out = torch.movedim(out, -1, 2 + ax)
    return out.reshape(*x.shape[:2], partition.num_blocks)


#: Most elements of x handled per chunk by block_matvec (64 MB of float32). Fewer,
#: larger chunks suit GPUs and contended CPUs (each op is a parallel region);
#: the bound keeps the temporaries far below the size of x for large patches.
CHUNK_ELEMENTS = 1 << 24


def _chunks(x: Tensor, parts: int):
    """Chunks of a (B, K, *sp) tensor with sp divisible by P, for block_matvec.

    Yields ``(index, whole, slab)``: the index of the chunk in x (always with a
    batch axis), whether it is the whole tensor, and for slabs ``(b, i0)``
    (batch item and piece of the first axis: blocks ``i0 * P^(d-1) ..
    (i0 + 1) * P^(d-1) - 1``). Tensors of at most CHUNK_ELEMENTS values are one
    chunk; larger ones are cut into slabs, and slabs into ranges of planes of
    the first axis when they hold more than CHUNK_ELEMENTS values.
    """
    b, k, *sp = x.shape
    if x.numel() <= CHUNK_ELEMENTS:
        yield (slice(None),), True, None
        return
    s0 = sp[0] // parts
    per_plane = k * math.prod(sp[1:])
    planes = max(1, min(s0, CHUNK_ELEMENTS // max(per_plane, 1)))
    for bi in range(b):
        for i0 in range(parts):
            for start in range(0, s0, planes):
                lo = i0 * s0 + start
                sl = slice(lo, lo + min(planes, s0 - start))
                yield (slice(bi, bi + 1), slice(None), sl), False, (bi, i0)


def _blocked_view(t: Tensor, parts: int, whole: bool) -> Tensor:
    """(Bc, K, a_0, .., a_last) -> strided view (Bc, P, .., P, K, s_0 or a_0, s_1, ..).

    Every spatial axis (all of them when ``whole``, else all but the first) is
    cut into P equal pieces whose indices move in front of K, in row-major
    block order.
    """
    axes = t.dim() - 2
    v, pos, pdims, sdims = t, 2, [], []
    for i in range(axes):
        if whole or i > 0:
            v = v.unflatten(pos, (parts, v.shape[pos] // parts))
            pdims.append(pos)
            pos += 1
        sdims.append(pos)
        pos += 1
    return v.permute([0, *pdims, 1, *sdims])


def _select(g: Tensor, parts: int, whole: bool, slab: tuple[int, int] | None) -> Tensor:
    """The (n, J, R) block matrices of a chunk, in the order of _blocked_view."""
    b, nb, j, r = g.shape
    if whole:
        return g.reshape(b * nb, j, r)
    return g.view(b, parts, nb // parts, j, r)[slab]


class _UniformBlockMatVec(torch.autograd.Function):
    """out[b, :, n] = G[b, p(n)] @ f(x[b, :, n]) for equal blocks; f = identity or square.

    Works chunk by chunk (see :func:`_chunks`): each chunk of x is copied (and
    squared) into block-major order in a buffer, multiplied by its block
    matrices with one bmm and written back. Saves only ``g`` and ``x`` (already
    alive) and recomputes the buffers in backward.
    """

    @staticmethod
    def forward(ctx, g: Tensor, x: Tensor, parts: int, square: bool) -> Tensor:  # noqa: D102
        r, j = x.shape[1], g.shape[2]
        out = x.new_empty((x.shape[0], j, *x.shape[2:]))
        with torch.autocast(device_type=x.device.type, enabled=False):
            for idx, whole, slab in _chunks(x, parts):
                xv = _blocked_view(x[idx], parts, whole)  # (Bc, P, .., R, *s)
                buf = torch.empty(xv.shape, dtype=x.dtype, device=x.device)
                if square:
                    torch.mul(xv, xv, out=buf)
                else:
                    buf.copy_(xv)
                gs = _select(g, parts, whole, slab)  # (n, J, R)
                res = torch.bmm(gs, buf.view(gs.shape[0], r, -1))  # (n, J, L)
                ov = _blocked_view(out[idx], parts, whole)
                ov.copy_(res.view(ov.shape))
        ctx.save_for_backward(g, x)
        ctx.parts, ctx.square = parts, square
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        g, x = ctx.saved_tensors
        parts, square = ctx.parts, ctx.square
        need_g, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_out = grad_out.contiguous()  # J channels only; never a stride-0 expansion
        r, j = x.shape[1], g.shape[2]
        grad_g = torch.zeros_like(g) if need_g else None
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            for idx, whole, slab in _chunks(x, parts):
                gs = _select(g, parts, whole, slab)
                n = gs.shape[0]
                gb = _blocked_view(grad_out[idx], parts, whole).reshape(n, j, -1)
                xv = _blocked_view(x[idx], parts, whole)
                if need_g:
                    buf = torch.empty(xv.shape, dtype=x.dtype, device=x.device)
                    if square:
                        torch.mul(xv, xv, out=buf)
                    else:
                        buf.copy_(xv)
                    _select(grad_g, parts, whole, slab).add_(
                        torch.bmm(gb, buf.view(n, r, -1).transpose(1, 2))
                    )
                    del buf
                if need_x:
                    gt = gs.transpose(1, 2)
                    gq = torch.bmm(2 * gt if square else gt, gb).view(xv.shape)
                    gx = _blocked_view(grad_x[idx], parts, whole)
                    if square:
                        torch.mul(gq, xv, out=gx)
                    else:
                        gx.copy_(gq)
        return grad_g, grad_x, None, None


def block_matvec(g: Tensor, x: Tensor, partition: BlockPartition, square: bool = False) -> Tensor:
    """Apply a per-block matrix to a per-voxel vector.

    ``out[b, j, n] = sum_r G[b, p(n), j, r] * x[b, r, n]`` (``x[b, r, n]^2``
    when ``square``; the square is then never stored) where p(n) is the block
    of voxel n. Differentiable in ``g`` and ``x``.

    Args:
        g: (B, P^d, J, R) block matrices (B may be 1 and is then broadcast).
        x: (B, R, *spatial) per-voxel vectors.
        partition: Partition of ``spatial``.
        square: Use x^2 instead of x.

    Returns:
        (B, J, *spatial).
    """
    if g.dim() != 4 or x.dim() != 2 + partition.ndim:
        raise ValueError(
            f"block_matvec needs g (B, P^d, J, R) and x (B, R, *spatial), got {tuple(g.shape)} "
            f"and {tuple(x.shape)}."
        )
    if tuple(x.shape[2:]) != partition.spatial_shape or g.shape[1] != partition.num_blocks:
        raise ValueError(
            f"block_matvec: g {tuple(g.shape)} / x {tuple(x.shape)} do not match a partition of "
            f"{partition.spatial_shape} into {partition.num_blocks} blocks."
        )
    if g.shape[-1] != x.shape[1]:
        raise ValueError(f"block_matvec: g {tuple(g.shape)} and x {tuple(x.shape)} differ in R.")
    g = g.expand(x.shape[0], *g.shape[1:]).contiguous()
    x = x.contiguous()
    for ax in range(partition.ndim):
        idx = partition.pad_index(ax, x.device)
        if idx is not None:
            x = x.index_select(2 + ax, idx)
    out = _UniformBlockMatVec.apply(g, x, partition.parts, square)
    for ax in range(partition.ndim):
        idx = partition.unpad_index(ax, x.device)
        if idx is not None:
            out = out.index_select(2 + ax, idx)
    return out
