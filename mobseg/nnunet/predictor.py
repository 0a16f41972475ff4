"""Sliding-window inference of per-voxel logit distributions on nnU-Net's predictor.

SPEC section 5. This module imports nnunetv2: import it after
:func:`mobseg.nnunet.env.setup_nnunet`.

:class:`HeadPredictor` subclasses nnU-Net's ``nnUNetPredictor`` and keeps its
padding, tiling and Gaussian weighting, but changes what a tile produces:

1. per tile, ONE forward pass of the backbone gives the decoder features, mu
   and the head's distribution; from it the per-voxel parameters of each
   voxel's marginal logit distribution
   (:func:`mobseg.core.inference.marginal_parameters`: for C = 2 the mean and
   variance of d = eta_1 - eta_0, two channels, as many as nnU-Net's logits);
2. mirrored passes (test-time augmentation, on by default as in nnU-Net)
   average these parameters with equal weight, as nnU-Net averages logits;
3. tiles are stitched with nnU-Net's Gaussian importance weights g:
   theta(v) = sum_t g_t(v) theta_t(v) / sum_t g_t(v), in float32.

Averaging parameters treats the passes that see one voxel as nnU-Net treats
them: one prediction, refined (the mean logit difference is nnU-Net's own
averaged logit difference, the variance the average of the heads'
variances). No moment is computed here: E[p], Var[p], entropy and MI are
computed from the parameters after they are resampled to the CT's grid
(:mod:`mobseg.nnunet.export`), so no map is ever interpolated between
voxels. Memory: P float32 values per voxel plus one weight map, P = 2 for
two classes.

Sample masks (``save_samples`` = S > 0, for GED and sample diversity): per
tile, S joint samples of the logits from the same forward pass (the first,
unmirrored pass), each turned into a label map by argmax. Labels cannot be
averaged, so overlapping tiles are not blended: each voxel takes its labels
from the tile whose Gaussian weight is largest there (the tile whose centre
is nearest). Every voxel's label is then an exact draw from that tile's
predictive distribution, and the spatial correlation of the covariance model
holds inside each tile; across the seams between tiles the S samples are
independent. This costs S bytes per voxel plus one float32 map.

Mixtures of passes (``passes`` = T > 1 for MC dropout, with the decoder's
dropout hooks in training mode; ``tta_mixture`` for the mirrored passes):
the passes are kept as an equally weighted mixture and carried as its
moment-matched Gaussian (:mod:`mobseg.core.mixture`): three channels, m, s^2
(within + between) and the between-pass variance Var_t(m_t), stitched like
the others. With MC dropout and plain TTA, the T dropout passes of each
mirrored pass form a mixture and the mirrored passes' moment-matched
parameters are averaged; with ``tta_mixture`` all (mirror, dropout) passes
form one mixture. Two classes only.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from mobseg.core.inference import marginal_parameters, num_parameter_channels
from mobseg.core.mixture import PassMoments
from mobseg.nnunet.env import quiet

log = logging.getLogger(__name__)


class HeadPredictor(nnUNetPredictor):
    """nnU-Net predictor that stitches per-voxel distribution parameters (module docstring).

    Args:
        tile_step_size: Sliding-window step as a fraction of the patch.
        use_mirroring: Mirroring test-time augmentation.
        device: Torch device.
        save_samples: S, joint samples kept as label maps (see the module
            docstring); 0 = none. A point-mass model keeps none.
        passes: T forward passes per mirrored pass (MC dropout: T > 1).
        mc_dropout: Put the decoder's dropout hooks (modules with a
            ``mobseg_dropout`` attribute) in training mode during prediction.
        tta_mixture: Keep the mirrored passes as a mixture (module docstring).
    """

    def __init__(
        self,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        device: torch.device | str = "cpu",
        save_samples: int = 0,
        passes: int = 1,
        mc_dropout: bool = False,
        tta_mixture: bool = False,
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
        if save_samples < 0:
            raise ValueError(f"save_samples must be >= 0, got {save_samples}")
        self.save_samples = save_samples
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        self.passes = passes
        self.mc_dropout = mc_dropout
        self.tta_mixture = tta_mixture
        self.point_mass = False
        #: (S, *shape) uint8 label maps of the last :meth:`predict_parameters` call, or None.
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

    @property
    def mixture(self) -> bool:
        """Whether the passes are kept as a mixture (three channels, see the module docstring)."""
        return self.passes > 1 or self.tta_mixture

    @property
    def num_parameter_channels(self) -> int:
        c = self.label_manager.num_segmentation_heads
        if self.mixture and c != 2:
            raise ValueError(f"mixtures of passes need two classes, got {c}")
        return num_parameter_channels(c) + (1 if self.mixture else 0)

    @property
    def num_saved_samples(self) -> int:
        """S actually kept: 0 for a point-mass model."""
        return 0 if self.point_mass else self.save_samples

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        axes_sets: list[tuple[int, ...]] = [()]
        if self.use_mirroring and self.allowed_mirroring_axes is not None:
            mirror = [a + 2 for a in self.allowed_mirroring_axes]
            axes_sets += [
                c for n in range(1, len(mirror) + 1) for c in itertools.combinations(mirror, n)
            ]
        if self.mc_dropout:  # nnU-Net put the network in eval mode; dropout stays active
            for module in self.network.modules():
                if hasattr(module, "mobseg_dropout"):
                    module.train()
        if self.mixture:
            return self._mixture_passes(x, axes_sets)
        total: torch.Tensor | None = None
        for axes in axes_sets:
            xin = torch.flip(x, axes) if axes else x
            par = self._pass_parameters(xin, keep_samples=not axes)
            if axes:
                par = torch.flip(par, axes)
            total = par if total is None else total + par
        assert total is not None
        return total / len(axes_sets)

    def _pass_parameters(self, x: torch.Tensor, keep_samples: bool) -> torch.Tensor:
        """(B, P, *sp) marginal parameters of one forward pass on ``x``.

        With ``keep_samples`` and S > 0 saved samples, the pass builds the
        distribution and draws the tile's S label maps from it; otherwise the
        network computes the parameters directly
        (:meth:`mobseg.nnunet.network.StochasticUNet.marginal_parameters`).
        """
        if keep_samples and self.num_saved_samples:
            _, dist = self.network(x, stochastic=True)
            self._tile_labels = sample_labels(dist, self.num_saved_samples)
            return marginal_parameters(dist)
        return self.network.marginal_parameters(x)

    def _mixture_passes(self, x: torch.Tensor, axes_sets: list[tuple[int, ...]]) -> torch.Tensor:
        """(B, 3, *sp) moment-matched parameters of the passes (module docstring)."""
        pooled = PassMoments()
        total: torch.Tensor | None = None
        for axes in axes_sets:
            acc = pooled if self.tta_mixture else PassMoments()
            xin = torch.flip(x, axes) if axes else x
            for t in range(self.passes):
                par = self._pass_parameters(xin, keep_samples=not axes and t == 0)
                acc.add(torch.flip(par, axes) if axes else par)
            if not self.tta_mixture:
                res = acc.result()
                total = res if total is None else total + res
        if self.tta_mixture:
            return pooled.result()
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
            (self.num_parameter_channels, *shape), dtype=torch.float32, device=results_device
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
            par = self._internal_maybe_mirror_and_predict(tile.to(self.device))[0]
            acc[sl] += par.to(results_device) * gaussian
            weight[sl[1:]] += gaussian
            if labels is not None and best is not None and self._tile_labels is not None:
                # nearest tile centre wins: the largest Gaussian weight so far
                nearer = gaussian > best[sl[1:]]
                labels[sl] = torch.where(nearer, self._tile_labels.to(results_device), labels[sl])
                best[sl[1:]] = torch.maximum(best[sl[1:]], gaussian)
        acc /= weight
        if not torch.isfinite(acc).all():
            raise RuntimeError("non-finite values in the stitched parameters")
        self.last_samples = labels
        return acc

    def predict_parameters(self, data: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stitched per-voxel distribution parameters of a preprocessed case.

        Args:
            data: Preprocessed image (channels, *spatial) as nnU-Net's
                preprocessor returns it.

        Returns:
            (P, *spatial) float32 on the CPU (see
            :func:`mobseg.core.inference.marginal_parameters`). With
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
