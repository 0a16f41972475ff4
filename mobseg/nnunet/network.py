"""nnU-Net's network with a stochastic head on its last decoder stage.

:class:`StochasticUNet` wraps the network that nnU-Net builds from its plans
(``PlainConvUNet`` or ``ResidualEncoderUNet``) and adds one of the heads of
:mod:`mobseg.core` (SPEC section 3). A forward hook on
``decoder.stages[-1]`` captures the full-resolution decoder features
h in R^{B x F x *spatial} (F = ``decoder.stages[-1].output_channels``); the
mean logits mu are nnU-Net's own segmentation layer on h (the network's
full-resolution output). The head turns (h, mu) into a logit distribution.

- ``net(x)`` returns exactly what nnU-Net's network returns (a list of
  deep-supervision outputs, or the full-resolution logits), so nnU-Net's code
  paths keep working.
- ``net(x, stochastic=True)`` returns ``(outputs, dist)`` with the head's
  distribution over the full-resolution logits. On CUDA the head runs in
  float32 outside autocast.
- ``net.decoder`` is the backbone's decoder, so nnU-Net's deep-supervision
  switch (``decoder.deep_supervision``) works on the wrapper.

MC-dropout variant (:func:`add_decoder_dropout`, ``build_network(...,
decoder_dropout=p)``): channel dropout (``dropout3d``/``dropout2d``, nnU-Net's
``dropout_op`` position: after each convolution, before its normalisation) in
every convolution of the decoder's stages, the encoder untouched. It is a
forward hook, so the state dict keys are those of the plain network and the
pretrained checkpoint loads strictly; it is active while the convolution is
in training mode.

The backbone's parameters live under ``backbone.``, the head's under ``head.``;
the pretrained checkpoint is loaded strictly into ``backbone`` by
:func:`load_backbone`, and only the head keeps its fresh initialisation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobseg.core.config import HeadConfig
from mobseg.errors import ConfigurationError, InvalidInputError


class StochasticUNet(nn.Module):
    """nnU-Net network + stochastic head (see the module docstring).

    Args:
        backbone: The network built from nnU-Net's plans; it must have
            ``decoder.stages`` (nnU-Net's ``UNetDecoder``).
        head: A head of :func:`mobseg.core.registry.build_head`, called as
            ``head(features, mu)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._features: torch.Tensor | None = None
        self._hook = self.backbone.decoder.stages[-1].register_forward_hook(self._capture)

    @property
    def decoder(self) -> nn.Module:
        """The backbone's decoder (nnU-Net switches deep supervision on it)."""
        return self.backbone.decoder

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoder

    @property
    def feature_channels(self) -> int:
        """F, channels of the last decoder stage's output."""
        return feature_channels(self.backbone)

    def _capture(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self._features = output

    def forward(self, x: torch.Tensor, stochastic: bool = False) -> Any:
        """Run the backbone, and with ``stochastic=True`` the head too.

        Args:
            x: Image patch (B, channels, *spatial).
            stochastic: Also return the head's logit distribution.

        Returns:
            The backbone's output (list of deep-supervision logits, highest
            resolution first, or the (B, C, *spatial) logits); with
            ``stochastic=True`` the tuple ``(output, dist)``.
        """
        if not stochastic:
            out = self.backbone(x)
            self._features = None
            return out
        out, feats, mu = self._backbone_with_features(x)
        with _no_cuda_autocast(x):
            dist = self.head(feats.float(), mu.float())
        return out, dist

    def marginal_parameters(self, x: torch.Tensor) -> torch.Tensor:
        """The per-voxel marginal parameters of the head's logit distribution.

        The backbone, then :meth:`mobseg.core.heads.StochasticHead.marginal_parameters`
        (for two classes without building the distribution): what prediction
        stitches when it keeps no samples.

        Args:
            x: Image patch (B, channels, *spatial).

        Returns:
            (B, P, *spatial) float32, see :func:`mobseg.core.inference.marginal_parameters`.
        """
        _, feats, mu = self._backbone_with_features(x)
        with _no_cuda_autocast(x):
            return self.head.marginal_parameters(feats.float(), mu.float())

    def _backbone_with_features(self, x: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(backbone output, last decoder features, full-resolution logits mu) of ``x``."""
        self._features = None
        out = self.backbone(x)
        feats, self._features = self._features, None
        if feats is None:
            raise RuntimeError("the last decoder stage did not run; cannot read its features")
        mu = out[0] if isinstance(out, (list, tuple)) else out
        if feats.shape[2:] != mu.shape[2:]:
            raise ValueError(
                f"decoder features {tuple(feats.shape)} are not at the resolution of the "
                f"logits {tuple(mu.shape)}"
            )
        return out, feats, mu


def _no_cuda_autocast(x: torch.Tensor) -> Any:
    """Autocast off for the head on CUDA (the heads compute in float32); nothing elsewhere."""
    if x.is_cuda:
        return torch.autocast(device_type="cuda", enabled=False)
    return contextlib.nullcontext()


class CPUConv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN's (MKL-DNN) kernel on the CPU.

    PyTorch's kernel choice was tuned for 2-D: for a 3-D convolution with batch
    size 1 and few channels (N * C * D * H <= 20480, e.g. 8 channels of 32^3)
    it falls back to ``slow_conv3d``, and its backward to a slow kernel as well
    (:class:`_OneDNNConvolution` avoids both). Batch size 1 is the paper's
    fine-tuning batch and every
    sliding-window tile, so the small CPU plans hit it constantly. Same
    weights, same results (to float rounding), same gradients; other devices
    and dtypes use the stock path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
        ):
            return _OneDNNConvolution.apply(
                x,
                self.weight,
                self.bias,
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
            )
        return super().forward(x)


class _OneDNNConvolution(torch.autograd.Function):
    """oneDNN's convolution, forward and backward, also for a batch of one.

    ``aten::mkldnn_convolution`` differentiates through ``convolution_backward``,
    which chooses its kernel again and, for a batch of one and few channels, takes
    the slow one. The backward here adds a zero second sample when the batch has
    one: oneDNN's kernel then runs, the zero sample adds nothing to the weight and
    bias gradients, and its input gradient is dropped. Exact up to float rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding, stride, dilation, groups):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.conf = (padding, stride, dilation, groups, bias is not None)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight = ctx.saved_tensors
        padding, stride, dilation, groups, has_bias = ctx.conf
        single = x.shape[0] == 1
        if single:
            x = torch.cat([x, torch.zeros_like(x)])
            grad = torch.cat([grad, torch.zeros_like(grad)])
        need = [
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            has_bias and ctx.needs_input_grad[2],
        ]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.contiguous(),
            x,
            weight,
            [weight.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            groups,
            need,
        )
        if single and gx is not None:
            gx = gx[:1]
        return gx, gw, gb, None, None, None, None


def fast_cpu_convolutions(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` of ``module`` into :class:`CPUConv3d` (in place)."""
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = CPUConv3d
    return module


def feature_channels(backbone: nn.Module) -> int:
    """F, the output channels of ``backbone.decoder.stages[-1]``."""
    stage = backbone.decoder.stages[-1]
    if hasattr(stage, "output_channels"):
        return int(stage.output_channels)
    convs = [m for m in stage.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError("cannot tell the channels of the last decoder stage")
    return int(convs[-1].out_channels)


def build_backbone(
    plans_manager: Any,
    configuration_manager: Any,
    num_input_channels: int,
    num_output_channels: int,
    deep_supervision: bool,
) -> nn.Module:
    """nnU-Net's network for a configuration (as nnU-Net's trainer builds it).

    Its 3-D convolutions are :class:`CPUConv3d` (same parameters and results).
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    net = get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=True,
        deep_supervision=deep_supervision,
    )
    return fast_cpu_convolutions(net)


class ChannelDropout:
    """Forward hook of a convolution: channel dropout of its output with rate ``p``.

    Whole channels of each sample are zeroed with probability p and the rest
    scaled by 1/(1 - p) (``torch.nn.functional.dropout3d``, ``dropout2d`` for
    2-D convolutions), only while the convolution is in training mode.
    A class (not a closure) so that networks holding it pickle and deep-copy.
    """

    def __init__(self, p: float) -> None:
        if not 0.0 <= p < 1.0:
            raise ConfigurationError(f"The dropout rate must lie in [0, 1), got {p}.")
        self.p = float(p)

    def __call__(self, module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        fn = F.dropout3d if output.dim() == 5 else F.dropout2d
        return fn(output, self.p, training=module.training)


def add_decoder_dropout(backbone: nn.Module, p: float) -> list[nn.Module]:
    """Channel dropout after every convolution of ``backbone.decoder.stages``.

    Args:
        backbone: nnU-Net's network (``decoder.stages`` of conv blocks).
        p: Dropout rate in [0, 1); 0 adds nothing.

    Returns:
        The convolutions that got the dropout hook.
    """
    hook = ChannelDropout(p)
    if p == 0.0:
        return []
    convs = [m for m in backbone.decoder.stages.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    for conv in convs:
        conv.register_forward_hook(hook)
        conv.mobseg_dropout = hook.p  # type: ignore[assignment]
    return convs


def build_network(
    plans_manager: Any,
    configuration_manager: Any,
    num_input_channels: int,
    num_output_channels: int,
    head_cfg: HeadConfig,
    deep_supervision: bool,
    decoder_dropout: float = 0.0,
) -> StochasticUNet:
    """nnU-Net's network wrapped with the head of ``head_cfg``.

    Args:
        decoder_dropout: Rate of the MC-dropout variant's channel dropout in
            the decoder (:func:`add_decoder_dropout`); 0 = the plain network.

    Raises:
        ConfigurationError: ``head_cfg.num_classes`` differs from the dataset's
            number of classes, or the rate is outside [0, 1).
    """
    from mobseg.core.registry import build_head

    if head_cfg.num_classes != num_output_channels:
        raise ConfigurationError(
            f"The head is configured for {head_cfg.num_classes} classes but the dataset "
            f"has {num_output_channels}."
        )
    backbone = build_backbone(
        plans_manager,
        configuration_manager,
        num_input_channels,
        num_output_channels,
        deep_supervision,
    )
    add_decoder_dropout(backbone, decoder_dropout)
    head = build_head(head_cfg, feature_channels(backbone))
    return StochasticUNet(backbone, head)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read an nnU-Net / mobseg checkpoint on the CPU.

    Raises:
        InvalidInputError: missing or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError("The checkpoint does not exist.", path=str(p))
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a broken file
        raise InvalidInputError(
            f"The checkpoint cannot be read ({type(exc).__name__}: {exc}).",
            path=str(p),
            hint="Retrain the stage with --force.",
        ) from exc


def load_backbone(network: StochasticUNet, checkpoint: str | Path | dict[str, Any]) -> None:
    """Load pretrained nnU-Net weights strictly into ``network.backbone``.

    Every backbone key, segmentation layers included, must be present and of
    the same shape; the head is left as it was initialised.

    Raises:
        InvalidInputError: the checkpoint does not fit the backbone (the
            message lists missing and unexpected keys).
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(checkpoint)
    state = _strip_prefixes(ckpt.get("network_weights", ckpt))
    try:
        network.backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise InvalidInputError(
            "The pretrained checkpoint does not fit the planned network: "
            + " ".join(line.strip() for line in first[:3]),
            path=None if isinstance(checkpoint, dict) else str(checkpoint),
            hint="Rerun `mobseg pretrain --force` with the same preset.",
        ) from exc


def load_full(network: StochasticUNet, checkpoint: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Load a fine-tuned checkpoint (backbone and head) strictly; returns the checkpoint."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(checkpoint)
    state = _strip_prefixes(ckpt["network_weights"])
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidInputError(
            "The fine-tuned checkpoint does not fit its method's network: "
            + str(exc).strip().splitlines()[0],
            path=None if isinstance(checkpoint, dict) else str(checkpoint),
            hint="Use the same --method options as for finetune, or rerun finetune --force.",
        ) from exc
    return ckpt
