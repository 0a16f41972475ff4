"""Stochastic heads: decoder features -> parameters of a logit distribution (SPEC 3).

Every head is an ``nn.Module`` called as ``head(features, mu)`` with

* ``features``: (B, F, *sp), the last decoder stage of nnU-Net at full
  resolution (F = ``in_channels``), 2D or 3D;
* ``mu``: (B, C, *sp), nnU-Net's own segmentation-layer logits;

and returns a :class:`~mobseg.core.distributions.LogitDistribution` with mean
``mu``. All maps from features are 1x1(x1) convolutions, so one head works for
2D and 3D inputs. Variances are ``softplus(raw) + eps`` (eps = ``cfg.eps``,
1e-5).

Initialisation (fine-tuning must start at the backbone's behaviour): the
variance head starts at d = :data:`INIT_VARIANCE` (1e-3) everywhere, and the
factor / coefficient heads start with small weights so that their per-voxel
variance is also about 1e-3 for unit-variance features, i.e. logit standard
deviations of about 0.03 per noise source. Every basis starts with Frobenius
norm sqrt(C) (all bases at the same scale, random directions). The mixing
network of mob starts close to uniform weights.

The heads run with autocast disabled. Their 1x1 convolutions read
half-precision features (fp16/bf16 from an autocast backbone) in that dtype and
cast only their few output channels to float32 (or to the dtype of their
parameters, e.g. float64); everything after (softplus, variances, weights,
samples) is float32, where fp16 variances would overflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobseg.core.config import HeadConfig
from mobseg.core.distributions import (
    DeterministicLogits,
    DiagonalLogits,
    LogitDistribution,
    LowRankLogits,
    MixtureOfBasesLogits,
    SingleBasisLogits,
    mixing_weights,
)
from mobseg.core.inference import marginal_parameters
from mobseg.core.partitions import block_matvec, block_mean, get_partition

#: Initial diagonal variance d, and target initial variance of the factor terms.
INIT_VARIANCE = 1e-3
#: Hidden width of the mixing MLP of mob.
MIX_HIDDEN = 32


def inverse_softplus(y: float) -> float:
    """x such that softplus(x) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


class Pointwise(nn.Module):
    """A 1x1(x1) convolution usable on 2D and 3D inputs.

    ``out[b, o, n] = sum_f weight[o, f] x[b, f, n] + bias[o]``.

    Args:
        in_channels: F.
        out_channels: O.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """(B, F, *sp) -> (B, O, *sp), in the dtype of the parameters (at least float32).

        Half-precision features (fp16/bf16, e.g. from an autocast backbone) are
        convolved in their own dtype and only the O output channels are cast up,
        so the F-channel features are never copied to float32.
        """
        return pointwise(x, self.weight, self.bias)


def pointwise(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The 1x1(x1) convolution of :class:`Pointwise` with a given (O, F) weight and (O,) bias."""
    out_dtype = torch.promote_types(weight.dtype, torch.float32)
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else out_dtype
    w = weight.to(dtype).reshape(*weight.shape, *([1] * (x.dim() - 2)))
    b = bias.to(dtype)
    if x.dim() == 5:
        out = F.conv3d(x.to(dtype), w, b)
    elif x.dim() == 4:
        out = F.conv2d(x.to(dtype), w, b)
    else:
        raise ValueError(
            f"Pointwise needs (B, F, *sp) with 2 or 3 spatial axes, got {tuple(x.shape)}."
        )
    return out.to(out_dtype)


def init_bases(num_bases: int, num_classes: int, rank: int) -> Tensor:
    """M random bases (M, C, R), each with Frobenius norm exactly sqrt(C)."""
    b = torch.randn(num_bases, num_classes, rank)
    return b * (math.sqrt(num_classes) / b.flatten(1).norm(dim=1))[:, None, None]


class StochasticHead(nn.Module):
    """Base class of the five heads.

    Args:
        cfg: The method and its hyper-parameters.
        in_channels: F, channels of the decoder features.
    """

    def __init__(self, cfg: HeadConfig, in_channels: int) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        self.cfg = cfg
        self.in_channels = in_channels
        self.num_classes = cfg.num_classes

    def forward(self, features: Tensor, mu: Tensor) -> LogitDistribution:
        """Map decoder features to the distribution of the logits.

        Args:
            features: (B, F, *sp) decoder features, F = ``in_channels``.
            mu: (B, C, *sp) the backbone's logits, C = ``cfg.num_classes``.

        Returns:
            The logit distribution, mean ``mu``.
        """
        self._check_inputs(features, mu)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._distribution(features, mu)

    def marginal_parameters(self, features: Tensor, mu: Tensor) -> Tensor:
        """The per-voxel parameters that prediction stitches, (B, P, *sp) float32.

        Equal to :func:`mobseg.core.inference.marginal_parameters` of
        ``self(features, mu)``. For two classes, (m, s^2) of d = eta_1 - eta_0:
        heads with a :meth:`_difference_variance` compute s^2 straight from the
        features (one stacked 1x1 convolution, no factor of C x R channels and no
        distribution object), several times faster than building the
        distribution; tests check both routes agree.

        Args:
            features: (B, F, *sp) decoder features.
            mu: (B, C, *sp) the backbone's logits.
        """
        self._check_inputs(features, mu)
        if self.num_classes == 2:
            with torch.autocast(device_type=features.device.type, enabled=False):
                var = self._difference_variance(features, mu)
            if var is not None:
                diff = mu[:, 1:2].float() - mu[:, 0:1].float()
                return torch.cat([diff, var.float().clamp_min(0).unsqueeze(1)], dim=1)
        return marginal_parameters(self(features, mu))

    def _difference_variance(self, h: Tensor, mu: Tensor) -> Tensor | None:
        """(B, *sp) var(eta_1 - eta_0) for C = 2 without the distribution, or None."""
        return None

    def _check_inputs(self, features: Tensor, mu: Tensor) -> None:
        if features.dim() not in (4, 5) or mu.dim() != features.dim():
            raise ValueError(
                f"{type(self).__name__} needs features (B, F, *sp) and mu (B, C, *sp) with 2 or "
                f"3 spatial axes, got {tuple(features.shape)} and {tuple(mu.shape)}."
            )
        if (
            features.shape[0] != mu.shape[0]
            or features.shape[2:] != mu.shape[2:]
            or features.shape[1] != self.in_channels
            or mu.shape[1] != self.num_classes
        ):
            raise ValueError(
                f"{type(self).__name__} expects features (B, {self.in_channels}, *sp) and mu "
                f"(B, {self.num_classes}, *sp), got {tuple(features.shape)} and "
                f"{tuple(mu.shape)}."
            )

    def _distribution(self, h: Tensor, mu: Tensor) -> LogitDistribution:
        raise NotImplementedError

    def _variance(self, raw: Tensor) -> Tensor:
        return F.softplus(raw) + self.cfg.eps


def _init_variance_head(conv: Pointwise, eps: float) -> None:
    nn.init.normal_(conv.weight, std=0.01 / math.sqrt(conv.weight.shape[1]))
    nn.init.constant_(conv.bias, inverse_softplus(INIT_VARIANCE - eps))


class DeterministicHead(StochasticHead):
    """No parameters: eta = mu."""

    def _distribution(self, h: Tensor, mu: Tensor) -> LogitDistribution:
        return DeterministicLogits(mu)

    def _difference_variance(self, h: Tensor, mu: Tensor) -> Tensor:
        return torch.zeros_like(mu[:, 0], dtype=torch.float32)


class DiagonalHead(StochasticHead):
    """D = softplus(conv(h)) + eps, shape (B, C, *sp)."""

    def __init__(self, cfg: HeadConfig, in_channels: int) -> None:
        super().__init__(cfg, in_channels)
        self.variance = Pointwise(in_channels, cfg.num_classes)
        _init_variance_head(self.variance, cfg.eps)

    def _distribution(self, h: Tensor, mu: Tensor) -> LogitDistribution:
        return DiagonalLogits(mu, self._variance(self.variance(h)))

    def _difference_variance(self, h: Tensor, mu: Tensor) -> Tensor:
        return self._variance(self.variance(h)).sum(1)


class LowRankHead(StochasticHead):
    """D (C channels) and the spatially aligned factor P (C*R channels).

    Channel ``c*R + r`` of the factor conv is column r of class c's row at the
    same voxel: factor (B, C*R, *sp) -> (B, C, R, *sp), never mixing voxels.
    """

    def __init__(self, cfg: HeadConfig, in_channels: int) -> None:
        super().__init__(cfg, in_channels)
        c, r = cfg.num_classes, cfg.rank
        self.variance = Pointwise(in_channels, c)
        self.factor = Pointwise(in_channels, c * r)
        _init_variance_head(self.variance, cfg.eps)
        nn.init.normal_(self.factor.weight, std=math.sqrt(INIT_VARIANCE / (r * in_channels)))

    def _distribution(self, h: Tensor, mu: Tensor) -> LogitDistribution:
        c, r = self.cfg.num_classes, self.cfg.rank
        fac = self.factor(h).unflatten(1, (c, r))
        return LowRankLogits(mu, self._variance(self.variance(h)), fac)

    def _difference_variance(self, h: Tensor, mu: Tensor) -> Tensor:
        # d_0 + d_1 + |P_1 - P_0|^2: the rows' difference is one convolution with the
        # difference of the factor weights (R channels, not C * R).
        r = self.cfg.rank
        w = self.factor.weight.unflatten(0, (2, r))
        b = self.factor.bias.unflatten(0, (2, r))
        return _variance_plus_squares(self, h, w[1] - w[0], b[1] - b[0])


class SingleBasisHead(StochasticHead):
    """d (C channels), coefficients A (R channels) and one learned basis (C, R)."""

    def __init__(self, cfg: HeadConfig, in_channels: int) -> None:
        super().__init__(cfg, in_channels)
        self.variance = Pointwise(in_channels, cfg.num_classes)
        self.coeffs = Pointwise(in_channels, cfg.rank)
        self.basis = nn.Parameter(init_bases(1, cfg.num_classes, cfg.rank)[0])
        _init_variance_head(self.variance, cfg.eps)
        # Per-voxel variance sum_r B_cr^2 a_r^2 ~ |B_c|^2 E[a^2] ~ INIT_VARIANCE.
        nn.init.normal_(self.coeffs.weight, std=math.sqrt(INIT_VARIANCE / in_channels))

    def _distribution(self, h: Tensor, mu: Tensor) -> LogitDistribution:
        return SingleBasisLogits(
            mu,
            self._variance(self.variance(h)),
            self.coeffs(h),
            self.basis,
            noise=self.cfg.noise,
            partitions=self.cfg.partitions,
            sampler=self.cfg.sampler,
        )

    def _difference_variance(self, h: Tensor, mu: Tensor) -> Tensor:
        # d_0 + d_1 + sum_r (b_1r - b_0r)^2 a_r^2 with a_r = w_r . h + c_r: the basis
        # difference scales the rows of the coefficient convolution.
        delta = (self.basis[1] - self.basis[0]).to(self.coeffs.weight.dtype)
        return _variance_plus_squares(
            self, h, delta[:, None] * self.coeffs.weight, delta * self.coeffs.bias
        )


def _variance_plus_squares(head: StochasticHead, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """d_0 + d_1 + sum_j (weight_j . h + bias_j)^2 per voxel, from one stacked convolution."""
    var: Pointwise = head.variance  # type: ignore[assignment]
    out = pointwise(h, torch.cat([var.weight, weight]), torch.cat([var.bias, bias]))
    d = head._variance(out[:, :2]).sum(1)
    return d + out[:, 2:].square().sum(1)


class MixtureOfBasesHead(StochasticHead):
    """d, coefficients A, M learned bases and the block weighting network.

    Weights: the features are averaged over each of the P^d blocks (exact
    ``tensor_split`` blocks, not adaptive pooling), mapped by a linear layer to
    M channels (the same as a 1x1x1 conv to M channels followed by the block
    average), then by a small MLP (M -> 32 -> M, GELU), and
    ``W_p = softmax(logits_p / tau)`` over the M bases, shape (B, P^d, M).

    ``mixing`` (``soft``/``hard``) can be switched after training, e.g. for
    inference: ``head.mixing = "hard"``.
    """

    def __init__(self, cfg: HeadConfig, in_channels: int) -> None:
        super().__init__(cfg, in_channels)
        m = cfg.bases
        self.variance = Pointwise(in_channels, cfg.num_classes)
        self.coeffs = Pointwise(in_channels, cfg.rank)
        self.bases = nn.Parameter(init_bases(m, cfg.num_classes, cfg.rank))
        self.mix_in = nn.Linear(in_channels, m)
        self.mix_mlp = nn.Sequential(nn.Linear(m, MIX_HIDDEN), nn.GELU(), nn.Linear(MIX_HIDDEN, m))
        _init_variance_head(self.variance, cfg.eps)
        nn.init.normal_(self.coeffs.weight, std=math.sqrt(INIT_VARIANCE / in_channels))
        # Nearly uniform weights at the start.
        nn.init.normal_(self.mix_mlp[2].weight, std=1e-3)
        nn.init.zeros_(self.mix_mlp[2].bias)
        self._mixing = cfg.mixing

    @property
    def mixing(self) -> str:
        """``soft`` or ``hard`` mixing of the bases."""
        return self._mixing

    @mixing.setter
    def mixing(self, value: str) -> None:
        if value not in ("soft", "hard"):
            raise ValueError(f"mixing must be 'soft' or 'hard', got {value!r}.")
        self._mixing = value

    def block_weights(self, h: Tensor) -> Tensor:
        """(B, F, *sp) features -> (B, P^d, M) weights on the simplex."""
        part = get_partition(tuple(h.shape[2:]), self.cfg.partitions)
        dtype = torch.promote_types(self.bases.dtype, torch.float32)
        pooled = block_mean(h, part).transpose(1, 2).to(dtype)  # (B, P^d, F)
        return self._weights_of(self.mix_in(pooled))

    def _weights_of(self, mixed_in: Tensor) -> Tensor:
        """(B, P^d, M) output of ``mix_in`` -> the weights: MLP, then softmax at temperature tau."""
        return torch.softmax(self.mix_mlp(mixed_in) / self.cfg.temperature, dim=-1)

    def _distribution(self, h: Tensor, mu: Tensor) -> LogitDistribution:
        return MixtureOfBasesLogits(
            mu,
            self._variance(self.variance(h)),
            self.coeffs(h),
            self.bases,
            self.block_weights(h),
            partitions=self.cfg.partitions,
            mixing=self._mixing,
            noise=self.cfg.noise,
            sampler=self.cfg.sampler,
        )

    def _difference_variance(self, h: Tensor, mu: Tensor) -> Tensor:
        # s^2 = d_0 + d_1 + sum_r q_pr a_nr^2, q_pr = (B_p1r - B_p0r)^2 with the basis B_p
        # of the voxel's block. B_p = sum_m w_pm B_m (one-hot w for hard mixing), so with
        # delta_m = B_m1 - B_m0: q_pr = sum_{m <= m'} c_pmm' delta_mr delta_m'r, where
        # c_pmm' = w_pm w_pm' (doubled for m < m'). The R squared coefficients then reduce
        # to K = M (M + 1) / 2 channels u_mm' = sum_r delta_mr delta_m'r a_r^2 by one
        # matrix product, and only those K are weighted per block (when K < R).
        # mix_in is linear, so the block means of its output are the mixing network's
        # input: it joins the stacked convolution (M channels instead of F averaged).
        r, m = self.cfg.rank, self.cfg.bases
        part = get_partition(tuple(h.shape[2:]), self.cfg.partitions)
        out = pointwise(
            h,
            torch.cat([self.variance.weight, self.coeffs.weight, self.mix_in.weight]),
            torch.cat([self.variance.bias, self.coeffs.bias, torch.zeros_like(self.mix_in.bias)]),
        )
        pooled = block_mean(out[:, 2 + r :], part).transpose(1, 2) + self.mix_in.bias
        w = mixing_weights(self._weights_of(pooled), self._mixing)  # (B, P^d, M)
        delta = (self.bases[:, 1] - self.bases[:, 0]).to(out.dtype)  # (M, R)
        a2 = out[:, 2 : 2 + r].square()
        rows, cols = torch.triu_indices(m, m, device=h.device)
        if rows.numel() < r:
            twice = torch.where(rows == cols, 1.0, 2.0).to(out.dtype)
            c = w[..., rows] * w[..., cols] * twice  # (B, P^d, K)
            u = torch.matmul(delta[rows] * delta[cols], a2.flatten(2)).unflatten(2, a2.shape[2:])
            low = block_matvec(c[:, :, None, :], u, part)[:, 0]
        else:
            q = torch.einsum("bpm,mr->bpr", w, delta).square()  # (B, P^d, R)
            low = block_matvec(q[:, :, None, :], a2, part)[:, 0]
        return self._variance(out[:, :2]).sum(1) + low
