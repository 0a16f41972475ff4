"""Monte-Carlo sliding-window inference on nnU-Net's predictor (SPEC section 5).

This module imports nnunetv2: import it after
:func:`mobseg.nnunet.env.setup_nnunet`.

:class:`MCPredictor` subclasses nnU-Net's ``nnUNetPredictor`` and keeps its
padding, tiling and Gaussian weighting, but changes what a tile produces and
what is stitched:

1. per tile, ONE forward pass of the backbone gives the decoder features and
   mu; the head's distribution is sampled k times (in chunks, never k
   full-volume tensors) and reduced to three moments per voxel,
   E[p] (C channels), E[p^2] (C channels) and E[H(p)] (1 channel), with
   H(p) = -sum_c p_c ln p_c (see :func:`mobseg.core.inference.mc_moments`;
   with two classes the samples are drawn through the per-voxel distribution
   of eta_1 - eta_0, :func:`binary_marginal_moments`, which gives the same
   distribution of p at a fraction of the cost);
2. mirrored passes (``--tta``) are more samples: their moments are averaged
   with equal weight;
3. the 2C+1 moment channels of all tiles are stitched with nnU-Net's Gaussian
   importance weights g: M(v) = sum_t g_t(v) m_t(v) / sum_t g_t(v), in float32;
4. from the stitched moments: Var[p] = E[p^2] - E[p]^2, the predictive entropy
   H(E[p]) and the mutual information H(E[p]) - E[H(p)] (done at export,
   :mod:`mobseg.nnunet.export`).

Memory: the accumulators hold (2C+1) float32 values per voxel plus one weight
map, whatever k is.

Sample masks (``save_samples`` = S > 0, for GED and sample diversity): per
tile, S joint samples of the logits from the same forward pass (the first,
unmirrored pass), each turned into a label map by argmax. Labels cannot be
averaged, so overlapping tiles are not blended: each voxel takes its labels
from the tile whose Gaussian weight is largest there (the tile whose centre
is nearest). Every voxel's label is then an exact draw from that tile's
predictive distribution, and the spatial correlation of the covariance model
holds inside each tile; across the seams between tiles the S samples are
independent. This costs S bytes per voxel plus one float32 map.

A point-mass distribution (the ``deterministic`` method and the pretrained
backbone) is sampled once (k = 1): its samples are all equal.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from mobseg.nnunet.env import quiet

log = logging.getLogger(__name__)


def tile_moments(dist: Any, k: int, chunk: int) -> torch.Tensor:
    """The 2C+1 moment channels of one tile.

    Args:
        dist: A logit distribution of :mod:`mobseg.core` over (B, C, *spatial).
        k: Monte-Carlo samples.
        chunk: Samples drawn at once.

    Returns:
        (B, 2C+1, *spatial): E[p] (channels 0..C-1), E[p^2] (C..2C-1),
        E[H(p)] (last channel), float32.

    Two-class distributions of :mod:`mobseg.core` are sampled through the
    logit difference (:func:`binary_marginal_moments`); anything else through
    :func:`mobseg.core.inference.mc_moments`.
    """
    from mobseg.core.distributions import LogitDistribution
    from mobseg.core.inference import mc_moments

    if isinstance(dist, LogitDistribution) and dist.num_classes == 2 and not dist.is_deterministic:
        return binary_marginal_moments(dist, k, chunk)
    mom = mc_moments(dist, k, chunk)
    mean_p = mom.mean_p
    ent = mom.mean_entropy
    if ent.dim() == mean_p.dim() - 1:
        ent = ent.unsqueeze(1)
    if ent.shape[1] != 1 or mean_p.shape != mom.mean_p2.shape:
        raise ValueError(
            f"unexpected moment shapes: mean_p {tuple(mean_p.shape)}, mean_p2 "
            f"{tuple(mom.mean_p2.shape)}, mean_entropy {tuple(mom.mean_entropy.shape)}"
        )
    return torch.cat([mean_p.float(), mom.mean_p2.float(), ent.float()], dim=1)


#: Default memory budget of one chunk of samples: values per class (2^22 = 16 MB float32).
CHUNK_ELEMENTS = 2**22


@torch.no_grad()
def binary_marginal_moments(
    dist: Any, k: int, chunk: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The 2C+1 = 5 moment channels of a two-class tile, sampled through the logit difference.

    The moments are per-voxel expectations, so they depend only on each voxel's
    marginal logit distribution N(mu_n, Sigma_n) (``dist.voxel_covariance()``,
    exact for every method, the low-rank one included), never on how voxels are
    correlated. With C = 2, softmax(eta) depends only on d = eta_1 - eta_0,
    and d_n ~ N(mu_1 - mu_0, Sigma_11 + Sigma_00 - 2 Sigma_01). Drawing k
    samples of d_n (one normal per voxel instead of C + R or C) gives samples
    of p with exactly the distribution of sampling eta and applying softmax:

        p_1 = sigmoid(d),  p_0 = 1 - p_1,
        H(p) = -(p_1 ln p_1 + p_0 ln p_0) = softplus(-d) + p_0 d
        (from ln p_1 = -softplus(-d) and ln p_0 = ln p_1 - d).

    Args:
        dist: A two-class logit distribution of :mod:`mobseg.core`.
        k: Samples per voxel.
        chunk: Samples drawn at once.
        generator: Optional random generator.

    Returns:
        (B, 5, *sp) float32: E[p_0], E[p_1], E[p_0^2], E[p_1^2], E[H(p)].
    """
    mu = dist.mean
    if mu.shape[1] != 2:
        raise ValueError(f"binary_marginal_moments needs C = 2, got mean {tuple(mu.shape)}")
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    with torch.autocast(device_type=mu.device.type, enabled=False) if mu.is_cuda else _null():
        cov = dist.voxel_covariance().float()  # (B, *sp, 2, 2)
        var = (cov[..., 0, 0] + cov[..., 1, 1] - 2 * cov[..., 0, 1]).clamp_min(0)
        std = var.sqrt().unsqueeze(1)  # (B, 1, *sp)
        mu = mu.float()
        loc = mu[:, 1:2] - mu[:, 0:1]
        s1 = torch.zeros_like(loc)
        s2 = torch.zeros_like(loc)
        sh = torch.zeros_like(loc)
        done = 0
        while done < k:
            c = min(chunk, k - done)
            z = torch.randn((c, *loc.shape), generator=generator, device=loc.device)
            d = torch.addcmul(loc, std, z)  # (c, B, 1, *sp)
            p1 = torch.sigmoid(d)
            # H = -p1 ln p1 - p0 ln p0 = softplus(-d) + p0 * d   (ln p1 = -softplus(-d))
            h = torch.nn.functional.softplus(-d).add_(d.mul_(1 - p1))
            s1 += p1.sum(0)
            s2 += p1.square_().sum(0)
            sh += h.sum(0)
            done += c
    m1, m2, h = s1 / k, s2 / k, sh / k
    m0 = 1 - m1
    m0sq = 1 - 2 * m1 + m2
    return torch.cat([m0, m1, m0sq, m2, h], dim=1)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class MCPredictor(nnUNetPredictor):
    """nnU-Net predictor that stitches Monte-Carlo moments (see the module docstring).

    Args:
        samples: k, samples of the logits per tile (and per mirrored pass).
        chunk: Samples drawn at once (bounds the memory of one tile); None = as many
            as fit in :data:`CHUNK_ELEMENTS` values per class.
        tile_step_size: Sliding-window step as a fraction of the patch.
        use_mirroring: Mirroring test-time augmentation.
        device: Torch device.
        save_samples: S, joint samples kept as label maps (see the module
            docstring); 0 = none. A point-mass model keeps none.
    """

    def __init__(
        self,
        samples: int = 30,
        chunk: int | None = None,
        tile_step_size: float = 0.5,
        use_mirroring: bool = False,
        device: torch.device | str = "cpu",
        save_samples: int = 0,
    ) -> None:
        device = torch.device(device)
        with quiet():
            super().__init__(
                tile_step_size=tile_step_size,
                use_gaussian=True,
                use_mirroring=use_mirroring,
                perform_everything_on_device=device.type == "cuda",
                device=device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.samples = samples
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = chunk
        if save_samples < 0:
            raise ValueError(f"save_samples must be >= 0, got {save_samples}")
        self.save_samples = save_samples
        self.point_mass = False
        #: (S, *shape) uint8 label maps of the last :meth:`predict_moments` call, or None.
        self.last_samples: torch.Tensor | None = None
        self._tile_labels: torch.Tensor | None = None

    def setup(
        self,
        network: torch.nn.Module,
        plans_manager: Any,
        configuration_manager: Any,
        dataset_json: dict[str, Any],
        mirror_axes: tuple[int, ...] | None,
        point_mass: bool,
        trainer_name: str = "mobseg",
    ) -> None:
        """Give the predictor its network (a :class:`StochasticUNet`) and plans."""
        with quiet():
            self.manual_initialization(
                network,
                plans_manager,
                configuration_manager,
                None,
                dataset_json,
                trainer_name,
                tuple(mirror_axes) if mirror_axes is not None else (0, 1, 2),
            )
        self.point_mass = point_mass

    def chunk_for(self, x: torch.Tensor, k: int) -> int:
        """Samples drawn at once for tile ``x``: the fixed ``chunk``, or as many as fit in
        :data:`CHUNK_ELEMENTS` values per class (at least 1, at most k)."""
        if self.chunk is not None:
            return self.chunk
        voxels = x.shape[0] * int(np.prod(x.shape[2:]))
        return int(max(1, min(k, CHUNK_ELEMENTS // max(1, voxels))))

    @property
    def num_moment_channels(self) -> int:
        return 2 * self.label_manager.num_segmentation_heads + 1

    @property
    def num_saved_samples(self) -> int:
        """S actually kept: 0 for a point-mass model."""
        return 0 if self.point_mass else self.save_samples

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        k = 1 if self.point_mass else self.samples
        axes_sets: list[tuple[int, ...]] = [()]
        if self.use_mirroring and self.allowed_mirroring_axes is not None:
            mirror = [a + 2 for a in self.allowed_mirroring_axes]
            axes_sets += [
                c for n in range(1, len(mirror) + 1) for c in itertools.combinations(mirror, n)
            ]
        total: torch.Tensor | None = None
        for axes in axes_sets:
            xin = torch.flip(x, axes) if axes else x
            _, dist = self.network(xin, stochastic=True)
            mom = tile_moments(dist, k, self.chunk_for(xin, k))
            if not axes and self.num_saved_samples:
                self._tile_labels = sample_labels(dist, self.num_saved_samples)
            if axes:
                mom = torch.flip(mom, axes)
            total = mom if total is None else total + mom
        assert total is not None
        return total / len(axes_sets)

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(
        self, data: torch.Tensor, slicers: Any, do_on_device: bool = True
    ) -> torch.Tensor:
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        shape = tuple(data.shape[1:])
        acc = torch.zeros(
            (self.num_moment_channels, *shape), dtype=torch.float32, device=results_device
        )
        weight = torch.zeros(shape, dtype=torch.float32, device=results_device)
        n_keep = self.num_saved_samples
        labels = (
            torch.zeros((n_keep, *shape), dtype=torch.uint8, device=results_device)
            if n_keep
            else None
        )
        best = torch.zeros(shape, dtype=torch.float32, device=results_device) if n_keep else None
        gaussian = compute_gaussian(
            tuple(self.configuration_manager.patch_size),
            sigma_scale=1.0 / 8,
            value_scaling_factor=10,
            device=results_device,
        ).float()
        for sl in slicers:
            tile = torch.clone(data[sl][None], memory_format=torch.contiguous_format)
            mom = self._internal_maybe_mirror_and_predict(tile.to(self.device))[0]
            acc[sl] += mom.to(results_device) * gaussian
            weight[sl[1:]] += gaussian
            if labels is not None and best is not None and self._tile_labels is not None:
                # nearest tile centre wins: the largest Gaussian weight so far
                nearer = gaussian > best[sl[1:]]
                labels[sl] = torch.where(nearer, self._tile_labels.to(results_device), labels[sl])
                best[sl[1:]] = torch.maximum(best[sl[1:]], gaussian)
        acc /= weight
        if not torch.isfinite(acc).all():
            raise RuntimeError("non-finite values in the stitched moments")
        self.last_samples = labels
        return acc

    def predict_moments(self, data: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stitched moments of a preprocessed case.

        Args:
            data: Preprocessed image (channels, *spatial) as nnU-Net's
                preprocessor returns it.

        Returns:
            (2C+1, *spatial) float32 on the CPU: E[p], E[p^2], E[H(p)]. With
            ``save_samples`` the S label maps are in :attr:`last_samples`,
            (S, *spatial) uint8 on the CPU.
        """
        tensor = (
            torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
        )
        self.network.eval()
        self.last_samples = None
        with quiet():
            out = self.predict_sliding_window_return_logits(tensor.float())
        if self.last_samples is not None:
            self.last_samples = unpad(self.last_samples, tuple(out.shape[1:])).cpu()
        return out.float().cpu()


@torch.no_grad()
def sample_labels(dist: Any, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` joint samples of a tile's logits as label maps (argmax over classes).

    Args:
        dist: A logit distribution of :mod:`mobseg.core` over (1, C, *spatial).
        n: Samples.
        generator: Optional random generator.

    Returns:
        (n, *spatial) uint8 labels.
    """
    out: torch.Tensor | None = None
    for i in range(n):  # one sample at a time: the memory of one tile of logits
        eta = dist.rsample(1, generator=generator)[0]  # (B, C, *spatial)
        if eta.shape[0] != 1:
            raise ValueError(f"sample_labels needs a batch of one tile, got {tuple(eta.shape)}")
        if out is None:
            out = torch.empty((n, *eta.shape[2:]), dtype=torch.uint8, device=eta.device)
        out[i] = eta[0].argmax(0).to(torch.uint8)
    if out is None:
        raise ValueError(f"sample_labels needs n >= 1, got {n}")
    return out


def unpad(labels: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Undo nnU-Net's padding of an image smaller than the patch.

    ``acvl_utils.pad_nd_image`` pads each axis by ``d // 2`` below and
    ``d - d // 2`` above, where d is the missing length.

    Args:
        labels: (S, *padded_shape).
        shape: The unpadded spatial shape.
    """
    padded = tuple(labels.shape[1:])
    if len(padded) != len(shape) or any(p < s for p, s in zip(padded, shape, strict=False)):
        raise ValueError(f"cannot unpad shape {padded} to {shape}")
    starts = [(p - s) // 2 for p, s in zip(padded, shape, strict=True)]
    return labels[(slice(None), *[slice(a, a + s) for a, s in zip(starts, shape, strict=True)])]
