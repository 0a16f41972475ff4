"""Reparameterised Gaussian distributions over segmentation logits (SPEC section 3).

Notation (SPEC section 2): B patches in a batch, C classes, N voxels of a patch
with spatial shape ``sp`` (2D ``(H, W)`` or 3D ``(D, H, W)``), mean logits
``mu`` of shape (B, C, *sp), R columns of a factor or basis, M bases, P blocks
per axis. Every distribution draws ``eta = mu + noise`` with zero-mean Gaussian
noise that is a differentiable function of its parameters, so gradients of any
function of the samples reach ``mu``, the variance D, the factors and the
bases (and the mixing weights W).

The five distributions:

========================  ===================================================
deterministic             eta = mu (zero covariance)
diagonal                  eta = mu + sqrt(D) * z1
lowrank (SSN)             eta = mu + sqrt(D) * z1 + P z2,   z2 ~ N(0, I_R) per patch
single-basis              eta_n = mu_n + sqrt(d_n) * z1_n + B (a_n * z2)
mob (mixture of bases)    eta_n = mu_n + sqrt(d_n) * z1_n + B_p(n) (a_n * z2)
========================  ===================================================

with ``z1 ~ N(0, I)`` independent per voxel and class, and ``z2`` shared as the
``noise`` option says: ``voxel`` (one z2 per voxel), ``block`` (one per
partition block) or ``global`` (one per patch, single-basis only).

Sampling ``voxel`` noise: the per-voxel noise ``sqrt(d_n) z1_n + B_p (a_n * z2_n)``
is N(0, Sigma_n) with ``Sigma_n = B_p diag(a_n^2) B_p^T + diag(d_n)`` and is
independent across voxels. The default sampler (``sampler="cholesky"``) draws it
as ``L_n z_n`` with ``L_n L_n^T = Sigma_n`` (a closed-form per-voxel Cholesky
factorisation, C normals per voxel); ``sampler="factor"`` draws the literal
``z1`` (C normals) and ``z2`` (R normals) per voxel. Both give exactly the same
distribution of eta and unbiased pathwise gradients; the Cholesky sampler needs
C instead of R + C normal draws per voxel and never holds a (k, B, R, *sp)
tensor, which is what keeps mob within 1.5x of the deterministic loss.

All arithmetic runs in float32 (float64 if the parameters are float64) with
autocast disabled, whatever the dtype of the inputs, so that fp16/bf16 autocast
regions upstream cannot overflow the samples or the moments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mobseg.core.config import SAMPLERS
from mobseg.core.partitions import BlockPartition, block_matvec, get_partition

Noise = dict[str, Tensor]

#: Largest C*N for which :meth:`LogitDistribution.dense_covariance` builds a matrix.
DENSE_MAX_DIM = 4096


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _shape(t: Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


class LogitDistribution:
    """Base class: a Gaussian over the logits eta of a batch of patches.

    Args:
        mu: (B, C, *sp) mean logits, sp 2D or 3D.

    Attributes:
        mu: (B, C, *sp) the mean, in the compute dtype (float32 or float64).
        variance: (B, C, *sp) the diagonal variance D (``None`` when absent),
            the quantity regularised by the KL term.
        bases: (M, C, R) the learned bases (single-basis: M = 1), else ``None``.
        weights: (B, P^d, M) the soft mixing weights W (mob), else ``None``.
        block_mask: (P^d,) bool, the non-empty blocks W is defined on (mob).
        is_deterministic: True when every sample equals ``mu``.
        block_diagonal: True when voxels are independent, i.e. the covariance is
            block-diagonal with the C x C blocks of :meth:`voxel_covariance`.
    """

    is_deterministic: bool = False
    block_diagonal: bool = True

    def __init__(self, mu: Tensor) -> None:
        if mu.dim() not in (4, 5) or mu.shape[1] < 2:
            raise ValueError(
                f"mu must be (B, C, *spatial) with C >= 2 and 2 or 3 spatial axes, "
                f"got {tuple(mu.shape)}."
            )
        self.dtype = _compute_dtype(mu)
        self.mu = mu.to(self.dtype)
        self.variance: Tensor | None = None
        self.bases: Tensor | None = None
        self.weights: Tensor | None = None
        self.block_mask: Tensor | None = None

    # ------------------------------------------------------------------ shapes
    @property
    def mean(self) -> Tensor:
        """(B, C, *sp) E[eta] = mu."""
        return self.mu

    @property
    def batch_size(self) -> int:
        return self.mu.shape[0]

    @property
    def num_classes(self) -> int:
        return self.mu.shape[1]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.mu.shape[2:])

    @property
    def num_voxels(self) -> int:
        return math.prod(self.spatial_shape)

    @property
    def device(self) -> torch.device:
        return self.mu.device

    def _check_param(self, name: str, t: Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{type(self).__name__}: {name} must have shape {shape} to match mu "
                f"{tuple(self.mu.shape)}, got {tuple(t.shape)}."
            )

    # ---------------------------------------------------------------- sampling
    def noise_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the standard normal tensors that :meth:`rsample_with_noise` takes."""
        raise NotImplementedError

    def sample_noise(
        self, k: int, antithetic: bool = False, generator: torch.Generator | None = None
    ) -> Noise:
        """Draw the standard normal noise of ``k`` samples.

        Args:
            k: Number of samples (>= 1; even when ``antithetic``).
            antithetic: Draw k/2 noises and append their negatives, so samples
                come in pairs mu +- e (variance reduction of SSN).
            generator: Optional torch.Generator for reproducible draws.

        Returns:
            Name -> tensor with leading dimension k (see :meth:`noise_shapes`).
        """
        if k < 1:
            raise ValueError(f"rsample needs k >= 1, got {k}.")
        if antithetic:
            if k % 2:
                raise ValueError(f"Antithetic sampling needs an even k, got {k}.")
            half = self.sample_noise(k // 2, False, generator)
            return {name: torch.cat([z, -z]) for name, z in half.items()}
        return {
            name: torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
            for name, shape in self.noise_shapes(k).items()
        }

    def rsample(
        self, k: int, antithetic: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``k`` reparameterised samples of the logits.

        Returns:
            (k, B, C, *sp) samples with gradients to every parameter.
        """
        return self.rsample_with_noise(self.sample_noise(k, antithetic, generator))

    def rsample_with_noise(self, noise: Mapping[str, Tensor]) -> Tensor:
        """The samples for given standard normal noise (a deterministic function).

        Args:
            noise: As returned by :meth:`sample_noise`.

        Returns:
            (k, B, C, *sp).
        """
        shapes = self.noise_shapes(1)
        if set(noise) != set(shapes):
            raise ValueError(
                f"{type(self).__name__} needs noise {sorted(shapes)}, got {sorted(noise)}."
            )
        k = next(iter(noise.values())).shape[0]
        for name, shape in self.noise_shapes(k).items():
            if tuple(noise[name].shape) != shape:
                raise ValueError(
                    f"noise {name!r} must have shape {shape}, got {tuple(noise[name].shape)}."
                )
        with _no_autocast(self.device):
            return self._rsample({n: z.to(self.dtype) for n, z in noise.items()}, k)

    def _rsample(self, noise: Noise, k: int) -> Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------- moments
    def logit_variance(self) -> Tensor:
        """(B, C, *sp) analytic per-voxel variance Var[eta_{c,n}]."""
        return torch.diagonal(self.voxel_covariance(), dim1=-2, dim2=-1).movedim(-1, 1)

    def voxel_covariance(self) -> Tensor:
        """(B, *sp, C, C) exact covariance of the C logits of each voxel.

        For ``block_diagonal`` distributions this is the whole covariance;
        otherwise it is the marginal per-voxel block of :meth:`dense_covariance`.
        """
        raise NotImplementedError

    def difference_variance(self) -> Tensor:
        """(B, *sp) var(eta_1 - eta_0) of a two-class distribution, per voxel.

        The exact variance of the logit difference, the only second moment that
        softmax over two classes depends on: Sigma_00 + Sigma_11 - 2 Sigma_01
        (subclasses compute it without building the C x C covariance).
        """
        if self.num_classes != 2:
            raise ValueError(f"difference_variance needs C = 2, got C = {self.num_classes}")
        cov = self.voxel_covariance()
        return (cov[..., 0, 0] + cov[..., 1, 1] - 2 * cov[..., 0, 1]).clamp_min(0)

    def dense_covariance(self, max_dim: int = DENSE_MAX_DIM) -> Tensor:
        """(B, C*N, C*N) the full covariance of the flattened logits (tiny inputs only).

        Rows and columns are ordered as ``eta.reshape(B, C*N)``, i.e. index
        ``c * N + n`` with n the C-order flat voxel index.

        Raises:
            ValueError: C*N exceeds ``max_dim``.
        """
        cn = self.num_classes * self.num_voxels
        if cn > max_dim:
            raise ValueError(
                f"dense_covariance is for tiny inputs: C*N = {cn} > {max_dim} for mu "
                f"{tuple(self.mu.shape)}."
            )
        with _no_autocast(self.device):
            return self._dense_covariance()

    def _dense_covariance(self) -> Tensor:
        raise NotImplementedError

    def log_prob(self, value: Tensor) -> Tensor:
        """Log density of whole patches (diagonal and lowrank only)."""
        raise NotImplementedError(f"{type(self).__name__} has no log_prob.")

    def _dense(self, factor: Tensor | None, mask: Tensor | None, diag: Tensor | None) -> Tensor:
        """cov[(c,n),(c',m)] = mask[n,m] sum_r F[c,n,r] F[c',m,r] + [(c,n)=(c',m)] diag[c,n]."""
        b, c, n = self.batch_size, self.num_classes, self.num_voxels
        cov = self.mu.new_zeros((b, c, n, c, n))
        if factor is not None:
            prod = torch.einsum("bcnr,bdmr->bcndm", factor, factor)
            if mask is not None:
                prod = prod * mask.to(prod.dtype)[None, None, :, None, :]
            cov = cov + prod
        cov = cov.reshape(b, c * n, c * n)
        if diag is not None:
            cov = cov + torch.diag_embed(diag.reshape(b, c * n))
        return cov


def _diag_embed_last(v: Tensor) -> Tensor:
    """(B, C, *sp) -> (B, *sp, C, C) diagonal matrices."""
    return torch.diag_embed(v.movedim(1, -1))


class DeterministicLogits(LogitDistribution):
    """eta = mu: a point mass (covariance 0).

    Args:
        mu: (B, C, *sp) mean logits.
    """

    is_deterministic = True

    def noise_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        return {"none": (k, 0)}

    def _rsample(self, noise: Noise, k: int) -> Tensor:
        return self.mu.expand(k, *self.mu.shape)

    def voxel_covariance(self) -> Tensor:
        return _diag_embed_last(torch.zeros_like(self.mu))

    def difference_variance(self) -> Tensor:
        if self.num_classes != 2:
            return super().difference_variance()
        return torch.zeros_like(self.mu[:, 0])

    def logit_variance(self) -> Tensor:
        return torch.zeros_like(self.mu)

    def _dense_covariance(self) -> Tensor:
        return self._dense(None, None, None)


class DiagonalLogits(LogitDistribution):
    """eta = mu + sqrt(D) * z1, z1 ~ N(0, I); Cov = diag(D).

    Args:
        mu: (B, C, *sp) mean logits.
        variance: (B, C, *sp) D > 0.
    """

    def __init__(self, mu: Tensor, variance: Tensor) -> None:
        super().__init__(mu)
        self._check_param("variance", variance, tuple(mu.shape))
        self.dtype = _compute_dtype(mu, variance)
        self.mu = mu.to(self.dtype)
        self.variance = variance.to(self.dtype)

    def noise_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        return {"z1": (k, *self.mu.shape)}

    def _rsample(self, noise: Noise, k: int) -> Tensor:
        return _scaled_noise(self.mu, self.variance.sqrt(), noise["z1"])

    def logit_variance(self) -> Tensor:
        return self.variance

    def voxel_covariance(self) -> Tensor:
        return _diag_embed_last(self.variance)

    def difference_variance(self) -> Tensor:
        if self.num_classes != 2:
            return super().difference_variance()
        return self.variance.sum(1)

    def _dense_covariance(self) -> Tensor:
        return self._dense(None, None, self.variance)

    def log_prob(self, value: Tensor) -> Tensor:
        """Joint log density of whole patches.

        ``log p(eta) = sum_{c,n} log N(eta_{c,n}; mu_{c,n}, D_{c,n})``.

        Args:
            value: (..., B, C, *sp).

        Returns:
            (..., B).
        """
        if tuple(value.shape[-self.mu.dim() :]) != tuple(self.mu.shape):
            raise ValueError(
                f"log_prob needs (..., B, C, *sp) = (..., {tuple(self.mu.shape)}), "
                f"got {tuple(value.shape)}."
            )
        with _no_autocast(self.device):
            r = value.to(self.dtype) - self.mu
            lp = -0.5 * (r * r / self.variance + self.variance.log() + math.log(2 * math.pi))
            return lp.flatten(-self.mu.dim() + 1).sum(-1)


class LowRankLogits(LogitDistribution):
    """The SSN baseline: eta = mu + sqrt(D) * z1 + P z2, z2 ~ N(0, I_R) per patch.

    The factor is spatially aligned: the R-vector of class c at voxel n is
    ``factor[b, c, :, n]`` (the head's channels ``c*R .. c*R + R - 1`` at voxel
    n). As a matrix P in R^{(C*N) x R}, row ``c*N + n`` is that vector, and
    ``Cov = diag(D) + P P^T`` couples every voxel and class of the patch.

    Args:
        mu: (B, C, *sp) mean logits.
        variance: (B, C, *sp) D > 0.
        factor: (B, C, R, *sp).
    """

    block_diagonal = False

    def __init__(self, mu: Tensor, variance: Tensor, factor: Tensor) -> None:
        super().__init__(mu)
        self._check_param("variance", variance, tuple(mu.shape))
        if factor.dim() != mu.dim() + 1:
            raise ValueError(
                f"LowRankLogits: factor must be (B, C, R, *sp) for mu {tuple(mu.shape)}, "
                f"got {tuple(factor.shape)}."
            )
        self._check_param("factor", factor, (*mu.shape[:2], factor.shape[2], *mu.shape[2:]))
        self.dtype = _compute_dtype(mu, variance, factor)
        self.mu = mu.to(self.dtype)
        self.variance = variance.to(self.dtype)
        self.factor = factor.to(self.dtype)

    @property
    def rank(self) -> int:
        return self.factor.shape[2]

    def noise_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        return {"z1": (k, *self.mu.shape), "z2": (k, self.batch_size, self.rank)}

    def _rsample(self, noise: Noise, k: int) -> Tensor:
        b, c = self.batch_size, self.num_classes
        # (B, 1, k, R) @ (B, C, R, N) -> (B, C, k, N): no copy of the factor.
        z2 = noise["z2"].permute(1, 0, 2)[:, None]
        low = torch.matmul(z2, self.factor.reshape(b, c, self.rank, -1))
        low = low.unflatten(-1, self.spatial_shape).movedim(2, 0)
        return _scaled_noise(self.mu, self.variance.sqrt(), noise["z1"]) + low

    def logit_variance(self) -> Tensor:
        return self.variance + self.factor.square().sum(2)

    def voxel_covariance(self) -> Tensor:
        with _no_autocast(self.device):
            low = torch.einsum("bcr...,bdr...->b...cd", self.factor, self.factor)
            return low + _diag_embed_last(self.variance)

    def difference_variance(self) -> Tensor:
        """D_0 + D_1 + sum_r (P_1r - P_0r)^2 per voxel (the rows' difference)."""
        if self.num_classes != 2:
            return super().difference_variance()
        with _no_autocast(self.device):
            diff = self.factor[:, 1] - self.factor[:, 0]  # (B, R, *sp)
            return self.variance.sum(1) + diff.square().sum(1)

    def factor_matrix(self) -> Tensor:
        """(B, C*N, R) P with row ``c*N + n`` = factor[b, c, :, n]."""
        return self.factor.flatten(3).transpose(2, 3).reshape(self.batch_size, -1, self.rank)

    def _dense_covariance(self) -> Tensor:
        fac = self.factor.flatten(3).transpose(2, 3)  # (B, C, N, R)
        return self._dense(fac, None, self.variance)

    def log_prob(self, value: Tensor) -> Tensor:
        """Exact log density of whole patches by the Woodbury identity.

        With Sigma = D + P P^T (D diagonal, P (CN x R)), the capacitance
        K = I_R + P^T D^-1 P gives ``log|Sigma| = log|K| + sum log D`` and
        ``r^T Sigma^-1 r = r^T D^-1 r - |L^-1 P^T D^-1 r|^2`` (L L^T = K), so
        ``log p = -0.5 (CN log 2 pi + log|Sigma| + r^T Sigma^-1 r)``, equal to
        ``torch.distributions.LowRankMultivariateNormal(mu, P, D)``.

        Args:
            value: (..., B, C, *sp).

        Returns:
            (..., B).
        """
        nd = self.mu.dim()
        if tuple(value.shape[-nd:]) != tuple(self.mu.shape):
            raise ValueError(
                f"log_prob needs (..., B, C, *sp) = (..., {tuple(self.mu.shape)}), "
                f"got {tuple(value.shape)}."
            )
        with _no_autocast(self.device):
            b = self.batch_size
            r = (value.to(self.dtype) - self.mu).flatten(-nd + 1)  # (..., B, CN)
            dinv = self.variance.reciprocal().reshape(b, -1)  # (B, CN)
            pm = self.factor_matrix()  # (B, CN, R)
            cap = torch.eye(self.rank, dtype=self.dtype, device=self.device) + torch.einsum(
                "bnr,bn,bns->brs", pm, dinv, pm
            )
            chol = torch.linalg.cholesky(cap)
            logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1) + self.variance.reshape(
                b, -1
            ).log().sum(-1)
            y = torch.einsum("bnr,...bn->...br", pm, dinv * r)
            w = torch.linalg.solve_triangular(
                chol.expand(*y.shape[:-1], self.rank, self.rank), y.unsqueeze(-1), upper=False
            ).squeeze(-1)
            mahal = (r * r * dinv).sum(-1) - w.square().sum(-1)
            return -0.5 * (r.shape[-1] * math.log(2 * math.pi) + logdet + mahal)


class _ScaledNoise(torch.autograd.Function):
    """eta[k] = mu + std * z[k]; z is noise (no gradient). Reduces over k in place in backward."""

    @staticmethod
    def forward(ctx, mu: Tensor, std: Tensor, z: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(std, z)
        return torch.addcmul(mu, std, z)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        std, z = ctx.saved_tensors
        grad_mu = grad.sum(0) if ctx.needs_input_grad[0] else None
        grad_std = None
        if ctx.needs_input_grad[1]:
            grad_std = torch.mul(grad[0], z[0])
            for s in range(1, z.shape[0]):
                grad_std.addcmul_(grad[s], z[s])
        return grad_mu, grad_std, None


def _scaled_noise(mu: Tensor, std: Tensor, z: Tensor) -> Tensor:
    """(B, C, *sp) mu and std, (k, B, C, *sp) z -> mu + std * z."""
    if mu.shape != std.shape:
        return torch.addcmul(mu, std, z)
    return _ScaledNoise.apply(mu, std, z)


class _LowerTriangularNoise(torch.autograd.Function):
    """eta[k, b, c] = mu[b, c] + sum_{j <= c} L[b, (c, j)] * z[k, b, j], per voxel.

    ``low`` holds the lower-triangular entries (c, j), j <= c, in row-major
    order: (B, C(C+1)/2, *sp). ``z`` is noise and gets no gradient. Writes the
    samples in place into one (k, B, C, *sp) tensor and reduces over k in place
    in backward, so no per-class temporaries of the sample size are created.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, low: Tensor, z: Tensor) -> Tensor:  # noqa: D102
        c = mu.shape[1]
        out = torch.empty_like(z, memory_format=torch.contiguous_format)
        t = 0
        for i in range(c):
            torch.addcmul(mu[:, i], low[:, t], z[:, :, 0], out=out[:, :, i])
            t += 1
            for j in range(1, i + 1):
                out[:, :, i].addcmul_(low[:, t], z[:, :, j])
                t += 1
        ctx.save_for_backward(low, z)
        ctx.c = c
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        low, z = ctx.saved_tensors
        c, k = ctx.c, z.shape[0]
        grad_mu = grad.sum(0) if ctx.needs_input_grad[0] else None
        grad_low = None
        if ctx.needs_input_grad[1]:
            grad_low = torch.empty_like(low)
            t = 0
            for i in range(c):
                for j in range(i + 1):
                    acc = grad_low[:, t]
                    torch.mul(grad[0, :, i], z[0, :, j], out=acc)
                    for s in range(1, k):
                        acc.addcmul_(grad[s, :, i], z[s, :, j])
                    t += 1
        return grad_mu, grad_low, None


class _BasisLogits(LogitDistribution):
    """Shared machinery of single-basis and mob: a basis per partition block.

    eta_n = mu_n + sqrt(d_n) * z1_n + Bk_p(n) (a_n * z2), with ``block_bases``
    Bk of shape (B, P^d, C, R) and coefficients a of shape (B, R, *sp).
    """

    def __init__(
        self,
        mu: Tensor,
        variance: Tensor,
        coeffs: Tensor,
        block_bases: Tensor,
        partition: BlockPartition,
        noise: str,
        sampler: str,
    ) -> None:
        super().__init__(mu)
        self._check_param("variance", variance, tuple(mu.shape))
        if coeffs.dim() != mu.dim() or tuple(coeffs.shape[2:]) != tuple(mu.shape[2:]):
            raise ValueError(
                f"{type(self).__name__}: coeffs must be (B, R, *sp) for mu {tuple(mu.shape)}, "
                f"got {tuple(coeffs.shape)}."
            )
        self._check_param("coeffs", coeffs, (mu.shape[0], coeffs.shape[1], *mu.shape[2:]))
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
        self.dtype = _compute_dtype(mu, variance, coeffs, block_bases)
        self.mu = mu.to(self.dtype)
        self.variance = variance.to(self.dtype)
        self.coeffs = coeffs.to(self.dtype)
        self.block_bases = block_bases.to(self.dtype)
        self.partition = partition
        self.noise = noise
        self.sampler = sampler
        self.block_diagonal = noise == "voxel"
        self._cache: dict[str, object] = {}

    @property
    def rank(self) -> int:
        return self.coeffs.shape[1]

    def _pairs(self) -> list[tuple[int, int]]:
        c = self.num_classes
        return [(i, j) for i in range(c) for j in range(i, c)]

    def noise_shapes(self, k: int) -> dict[str, tuple[int, ...]]:
        b, c, r = self.batch_size, self.num_classes, self.rank
        sp = self.spatial_shape
        if self.noise == "voxel":
            if self.sampler == "cholesky":
                return {"z": (k, b, c, *sp)}
            return {"z1": (k, b, c, *sp), "z2": (k, b, r, *sp)}
        return {"z1": (k, b, c, *sp), "z2": (k, b, self.partition.num_blocks, r)}

    # Sigma_n - diag(d_n) = Bk_p diag(a_n^2) Bk_p^T, entries (i <= j) stacked: (B, C(C+1)/2, *sp)
    def _cached(self, name: str, build):
        # Reuse across calls only without autograd (e.g. the chunks of mc_moments):
        # a cached graph would otherwise be shared by two backward passes.
        if torch.is_grad_enabled():
            return build()
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def _basis_pair_cov(self) -> Tensor:
        def build() -> Tensor:
            pairs = self._pairs()
            ii = [i for i, _ in pairs]
            jj = [j for _, j in pairs]
            g = self.block_bases[:, :, ii, :] * self.block_bases[:, :, jj, :]
            return block_matvec(g, self.coeffs, self.partition, square=True)

        return self._cached("pair_cov", build)

    def _voxel_cholesky(self) -> dict[tuple[int, int], Tensor]:
        """Per-voxel lower Cholesky factor L_n of Sigma_n, entries (B, *sp).

        Pivots are floored at d_j: the j-th pivot of S = K + diag(d) (K PSD) is
        1 / [(S_{:j+1,:j+1})^-1]_jj >= d_j exactly, so the floor only removes
        rounding error and keeps every square root and division finite.
        """
        return self._cached("cholesky", self._build_cholesky)

    def _build_cholesky(self) -> dict[tuple[int, int], Tensor]:
        pairs = self._pairs()
        s = self._basis_pair_cov()
        d = self.variance.unbind(1)
        full = dict(zip(pairs, s.unbind(1), strict=True))
        low: dict[tuple[int, int], Tensor] = {}
        for j in range(self.num_classes):
            piv = full[(j, j)] + d[j]
            for m in range(j):
                piv = piv - low[(j, m)].square()
            ljj = torch.maximum(piv, d[j]).sqrt()
            low[(j, j)] = ljj
            for i in range(j + 1, self.num_classes):
                v = full[(j, i)]
                for m in range(j):
                    v = v - low[(i, m)] * low[(j, m)]
                low[(i, j)] = v / ljj
        return low

    def _rsample(self, noise: Noise, k: int) -> Tensor:
        if self.noise == "voxel" and self.sampler == "cholesky":
            low = self._voxel_cholesky()
            c = self.num_classes
            stacked = torch.stack([low[(i, j)] for i in range(c) for j in range(i + 1)], 1)
            return _LowerTriangularNoise.apply(self.mu, stacked, noise["z"])
        base = _scaled_noise(self.mu, self.variance.sqrt(), noise["z1"])
        b, c, r = self.batch_size, self.num_classes, self.rank
        if self.noise == "voxel":  # literal z2 per voxel
            x = (self.coeffs[None] * noise["z2"]).reshape(k * b, r, *self.spatial_shape)
            g = self.block_bases.repeat(k, 1, 1, 1)
            low = block_matvec(g, x, self.partition).reshape(k, b, c, *self.spatial_shape)
            return base + low
        # block / global: z2 per block; V_p = Bk_p diag(z2_p) acts on a_n.
        z2 = noise["z2"]  # (k, B, P^d, R)
        g = self.block_bases[None] * z2[:, :, :, None, :]  # (k, B, P^d, C, R)
        g = g.permute(1, 2, 0, 3, 4).reshape(b, self.partition.num_blocks, k * c, r)
        low = block_matvec(g, self.coeffs, self.partition)  # (B, k*C, *sp)
        low = low.unflatten(1, (k, c)).transpose(0, 1)
        return base + low

    def logit_variance(self) -> Tensor:
        with _no_autocast(self.device):
            s = self._basis_pair_cov()
            pairs = self._pairs()
            diag = [pairs.index((c, c)) for c in range(self.num_classes)]
            return s[:, diag] + self.variance

    def difference_variance(self) -> Tensor:
        """(b_1 - b_0)^T diag(a_n^2) (b_1 - b_0) + d_0 + d_1 with the voxel's block basis."""
        if self.num_classes != 2:
            return super().difference_variance()
        with _no_autocast(self.device):
            diff = self.block_bases[:, :, 1:2, :] - self.block_bases[:, :, 0:1, :]  # (B, P, 1, R)
            low = block_matvec(diff.square(), self.coeffs, self.partition, square=True)
            return low[:, 0] + self.variance.sum(1)

    def voxel_covariance(self) -> Tensor:
        with _no_autocast(self.device):
            s = self._basis_pair_cov()
            c = self.num_classes
            rows = []
            for i in range(c):
                rows.append(
                    torch.stack(
                        [s[:, self._pairs().index((min(i, j), max(i, j)))] for j in range(c)], -1
                    )
                )
            cov = torch.stack(rows, -2)  # (B, *sp, C, C)
            return cov + _diag_embed_last(self.variance)

    def _dense_covariance(self) -> Tensor:
        idx = self.partition.index(self.device)
        a = self.coeffs.flatten(2)  # (B, R, N)
        per_voxel = self.block_bases[:, idx]  # (B, N, C, R)
        fac = torch.einsum("bncr,brn->bcnr", per_voxel, a)
        if self.noise == "voxel":
            mask = torch.eye(self.num_voxels, device=self.device)
        else:
            mask = idx[:, None] == idx[None, :]
        return self._dense(fac, mask, self.variance)


class SingleBasisLogits(_BasisLogits):
    """Single learned basis: eta_n = mu_n + sqrt(d_n) * z1_n + B (a_n * z2).

    Per voxel Sigma_n = B diag(a_n^2) B^T + diag(d_n). With ``noise="block"``
    one z2 is shared by the voxels of each of the P^d blocks, so
    Cov(eta_n, eta_m) = B diag(a_n * a_m) B^T for n, m in the same block; with
    ``noise="global"`` one z2 is shared by the whole patch.

    Args:
        mu: (B, C, *sp) mean logits.
        variance: (B, C, *sp) d > 0.
        coeffs: (B, R, *sp) a.
        basis: (C, R) the learned basis B.
        noise: ``voxel``, ``block`` or ``global``.
        partitions: P, blocks per axis for ``block`` noise.
        sampler: ``cholesky`` or ``factor`` (voxel noise; see the module docstring).
    """

    def __init__(
        self,
        mu: Tensor,
        variance: Tensor,
        coeffs: Tensor,
        basis: Tensor,
        noise: str = "voxel",
        partitions: int = 4,
        sampler: str = "cholesky",
    ) -> None:
        if noise not in ("voxel", "block", "global"):
            raise ValueError(f"noise must be voxel, block or global, got {noise!r}.")
        if basis.dim() != 2 or basis.shape != (mu.shape[1], coeffs.shape[1]):
            raise ValueError(
                f"SingleBasisLogits: basis must be (C, R) = ({mu.shape[1]}, {coeffs.shape[1]}), "
                f"got {_shape(basis)}."
            )
        part = get_partition(tuple(mu.shape[2:]), partitions if noise == "block" else 1)
        block_bases = basis[None, None].expand(mu.shape[0], part.num_blocks, *basis.shape)
        super().__init__(mu, variance, coeffs, block_bases, part, noise, sampler)
        self.bases = basis.to(self.dtype)[None]


def mixing_weights(weights: Tensor, mixing: str) -> Tensor:
    """The weights mob mixes its bases with, (B, P^d, M).

    ``soft``: the weights themselves. ``hard``: one-hot at the argmax in the
    forward value, with the gradients of the soft weights (straight-through).
    """
    if mixing == "soft":
        return weights
    if mixing != "hard":
        raise ValueError(f"mixing must be soft or hard, got {mixing!r}.")
    onehot = F.one_hot(weights.argmax(-1), weights.shape[-1]).to(weights.dtype)
    return onehot + (weights - weights.detach())


def mix_bases(weights: Tensor, bases: Tensor, mixing: str) -> Tensor:
    """The basis of every block of mob: (B, P^d, M) weights, (M, C, R) bases -> (B, P^d, C, R).

    B_p = sum_m W_pm B_m with the weights of :func:`mixing_weights`.
    """
    return torch.einsum("bpm,mcr->bpcr", mixing_weights(weights, mixing), bases)


class MixtureOfBasesLogits(_BasisLogits):
    """Mixture of bases: eta_n = mu_n + sqrt(d_n) * z1_n + B_p (a_n * z2), n in block p.

    The patch is cut into P^d blocks (:mod:`mobseg.core.partitions`). Block p
    uses ``B_p = sum_m W_pm B_m`` (``soft``) or ``B_p = B_argmax_m W_pm``
    (``hard``, forward value exactly the argmax basis, gradients of the soft
    mixture: straight-through). Per voxel Sigma_n = B_p diag(a_n^2) B_p^T +
    diag(d_n); with ``block`` noise z2 is shared within each block, so
    Cov(eta_n, eta_m) = B_p diag(a_n * a_m) B_p^T for n, m in block p.

    Args:
        mu: (B, C, *sp) mean logits.
        variance: (B, C, *sp) d > 0.
        coeffs: (B, R, *sp) a.
        bases: (M, C, R) the learned bases B_1..B_M.
        weights: (B, P^d, M) mixing weights W (rows on the simplex).
        partitions: P.
        mixing: ``soft`` or ``hard``.
        noise: ``voxel`` or ``block``.
        sampler: ``cholesky`` or ``factor`` (voxel noise).
    """

    def __init__(
        self,
        mu: Tensor,
        variance: Tensor,
        coeffs: Tensor,
        bases: Tensor,
        weights: Tensor,
        partitions: int = 4,
        mixing: str = "soft",
        noise: str = "voxel",
        sampler: str = "cholesky",
    ) -> None:
        if noise not in ("voxel", "block"):
            raise ValueError(f"mob noise must be voxel or block, got {noise!r}.")
        if mixing not in ("soft", "hard"):
            raise ValueError(f"mixing must be soft or hard, got {mixing!r}.")
        part = get_partition(tuple(mu.shape[2:]), partitions)
        if bases.dim() != 3 or tuple(bases.shape[1:]) != (mu.shape[1], coeffs.shape[1]):
            raise ValueError(
                f"MixtureOfBasesLogits: bases must be (M, C, R) = (M, {mu.shape[1]}, "
                f"{coeffs.shape[1]}), got {_shape(bases)}."
            )
        expected = (mu.shape[0], part.num_blocks, bases.shape[0])
        if tuple(weights.shape) != expected:
            raise ValueError(
                f"MixtureOfBasesLogits: weights must be (B, P^d, M) = {expected}, "
                f"got {tuple(weights.shape)}."
            )
        dtype = _compute_dtype(mu, bases, weights)
        w = weights.to(dtype)
        block_bases = mix_bases(w, bases.to(dtype), mixing)
        super().__init__(mu, variance, coeffs, block_bases, part, noise, sampler)
        self.bases = bases.to(self.dtype)
        self.weights = w.to(self.dtype)
        self.mixing = mixing
        self.block_mask = part.nonempty_mask(self.device)
