"""Per-voxel uncertainty maps from the parameters of each voxel's logit distribution.

SPEC section 5. Every map that ``predict`` writes (E[p], Var[p], the
predictive entropy H(E[p]), the expected entropy E[H(p)] and the mutual
information H(E[p]) - E[H(p)]) depends only on each voxel's marginal logit
distribution N(mu_n, Sigma_n), never on how voxels are correlated. So
prediction carries, per voxel, the *parameters* of that marginal:

* C = 2: two channels, the mean m and the variance s^2 of the logit
  difference d = eta_1 - eta_0 (softmax depends on d only), exact for every
  method and noise mode: m = mu_1 - mu_0, s^2 = Sigma_11 + Sigma_00 - 2 Sigma_01;
* C > 2: C + C (C + 1) / 2 channels, the mean logits and the upper triangle
  (row-major, diagonal included) of the C x C covariance.

These parameters are what tiles, mirrored passes and resampling average
(convex combinations: a variance stays >= 0 and a covariance stays PSD), the
way nnU-Net averages logits. The maps are computed from them at the very end,
on the CT's own grid: exactly by quadrature for C = 2
(:func:`mobseg.core.quadrature.binary_maps`), by Monte Carlo from each
voxel's N(mu_n, Sigma_n) for C > 2 (:func:`multiclass_maps`). Moments are never
interpolated between voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mobseg.core.distributions import LogitDistribution
from mobseg.core.quadrature import binary_maps

#: Voxels per Monte-Carlo chunk of :func:`multiclass_maps`.
MC_CHUNK = 2**15


def num_parameter_channels(num_classes: int) -> int:
    """Channels of :func:`marginal_parameters` for C classes."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    c = num_classes
    return 2 if c == 2 else c + c * (c + 1) // 2


def _triu(c: int) -> tuple[Tensor, Tensor]:
    return torch.triu_indices(c, c)


@torch.no_grad()
def marginal_parameters(dist: LogitDistribution) -> Tensor:
    """The per-voxel parameters of ``dist``'s marginals, (B, P, *spatial) float32.

    C = 2: (m, s^2) of the logit difference; C > 2: the mean logits then the
    covariance's upper triangle (see the module docstring). A point mass has
    s^2 = 0 (a zero covariance).
    """
    mu = dist.mean.float()
    c = mu.shape[1]
    if c == 2:
        diff = mu[:, 1:2] - mu[:, 0:1]
        var = dist.difference_variance().float().clamp_min(0)
        return torch.cat([diff, var.unsqueeze(1)], dim=1)
    cov = dist.voxel_covariance().float()  # (B, *sp, C, C)
    rows, cols = _triu(c)
    entries = cov[..., rows, cols]  # (B, *sp, T)
    return torch.cat([mu, entries.movedim(-1, 1)], dim=1)


def unpack_parameters(params: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(mean (C, *sp), covariance (C, C, *sp)) of C > 2 parameters (P, *sp)."""
    c = num_classes
    if params.shape[0] != num_parameter_channels(c) or c == 2:
        raise ValueError(
            f"expected {num_parameter_channels(c)} parameter channels for C = {c} > 2, got "
            f"shape {tuple(params.shape)}"
        )
    mean = params[:c]
    cov = params.new_zeros((c, c, *params.shape[1:]))
    rows, cols = _triu(c)
    for t, (i, j) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        cov[i, j] = params[c + t]
        cov[j, i] = params[c + t]
    return mean, cov


@dataclass
class VoxelMaps:
    """The maps of one prediction, on one grid.

    Attributes:
        seg: (*sp) uint8 argmax of E[p].
        prob: E[p] of the foreground: (*sp) for C = 2, (C - 1, *sp) for C > 2.
        var: Var[p] of the foreground, shaped like ``prob``.
        entropy: (*sp) predictive entropy H(E[p]) in nats.
        expected_entropy: (*sp) E[H(p)] in nats.
        mi: (*sp) mutual information H(E[p]) - E[H(p)] in nats.
    """

    seg: Tensor
    prob: Tensor
    var: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mi: Tensor


@torch.no_grad()
def voxel_maps(
    params: Tensor,
    num_classes: int,
    samples: int = 30,
    generator: torch.Generator | None = None,
) -> VoxelMaps:
    """Maps from per-voxel parameters (P, *sp), see the module docstring.

    Args:
        params: (P, *sp) parameters of :func:`marginal_parameters` (without the batch axis).
        num_classes: C.
        samples: k, Monte-Carlo samples per voxel for C > 2 (unused for C = 2).
        generator: Random generator for C > 2.

    Returns:
        :class:`VoxelMaps`. For C = 2 the segmentation is E[p] > 1/2, the
        argmax of the computed E[p] (mathematically m > 0, since
        E[sigmoid(d)] > 1/2 if and only if m > 0), so that the written
        segmentation and probability never disagree by rounding.
    """
    if params.shape[0] != num_parameter_channels(num_classes):
        raise ValueError(
            f"expected {num_parameter_channels(num_classes)} parameter channels for "
            f"C = {num_classes}, got shape {tuple(params.shape)}"
        )
    if num_classes == 2:
        m, v = params[0], params[1]
        b = binary_maps(m, v.clamp_min(0))
        return VoxelMaps(
            seg=(b.mean_p > 0.5).to(torch.uint8),
            prob=b.mean_p,
            var=b.var_p,
            entropy=b.predictive_entropy,
            expected_entropy=b.expected_entropy,
            mi=b.mutual_information,
        )
    mean, cov = unpack_parameters(params, num_classes)
    return multiclass_maps(mean, cov, samples, generator)


def _softmax_and_entropy(eta: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    logp = torch.log_softmax(eta, dim=dim)
    p = logp.exp()
    return p, -(p * logp).sum(dim)


@torch.no_grad()
def multiclass_maps(
    mean: Tensor,
    cov: Tensor,
    samples: int = 30,
    generator: torch.Generator | None = None,
    chunk: int = MC_CHUNK,
) -> VoxelMaps:
    """Monte-Carlo maps for C > 2 classes from each voxel's N(mu_n, Sigma_n).

    Each voxel's covariance is factorised by its eigen-decomposition (PSD, a
    zero covariance included); k samples eta = mu + L z per voxel give E[p],
    Var[p], E[H] and H(E[p]). Var[p] and E[H] are accumulated as deviations
    from their value at eta = mu, so a point mass gives Var = MI = 0 exactly.

    Args:
        mean: (C, *sp) mean logits.
        cov: (C, C, *sp) covariances.
        samples: k per voxel.
        generator: Random generator.
        chunk: Voxels sampled at once.
    """
    c = mean.shape[0]
    if cov.shape != (c, c, *mean.shape[1:]):
        raise ValueError(
            f"cov must have shape {(c, c, *mean.shape[1:])} for mean {tuple(mean.shape)}, "
            f"got {tuple(cov.shape)}"
        )
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    shape = mean.shape[1:]
    mu = mean.reshape(c, -1).T.float()  # (N, C)
    sig = cov.reshape(c, c, -1).permute(2, 0, 1).float()  # (N, C, C)
    n = mu.shape[0]
    out_p = torch.empty((n, c))
    out_v = torch.empty((n, c))
    out_eh = torch.empty(n)
    out_ph = torch.empty(n)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        evals, evecs = torch.linalg.eigh(sig[sl])
        low = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # (n, C, C): L L^T = Sigma
        p0, h0 = _softmax_and_entropy(mu[sl], -1)
        z = torch.randn((samples, *mu[sl].shape), generator=generator)
        eta = mu[sl] + torch.einsum("nij,knj->kni", low, z)
        p, h = _softmax_and_entropy(eta, -1)
        dp = p - p0
        mean_dp = dp.mean(0)
        prob = (p0 + mean_dp).clamp(0, 1)
        out_p[sl] = prob
        out_v[sl] = ((dp * dp).mean(0) - mean_dp**2).clamp_min(0)
        out_eh[sl] = (h0 + (h - h0).mean(0)).clamp_min(0)
        # H(E[p]) as H(p0) plus its change, so that it equals E[H] for a point mass
        xlogx = torch.special.xlogy
        change = xlogx(p0, p0).sum(-1) - xlogx(prob, prob).sum(-1)
        out_ph[sl] = (h0 + change).clamp_min(0)
    prob = out_p.T.reshape(c, *shape)
    pred_h = out_ph.reshape(shape)
    exp_h = out_eh.reshape(shape)
    return VoxelMaps(
        seg=prob.argmax(0).to(torch.uint8),
        prob=prob[1:],
        var=out_v.T.reshape(c, *shape)[1:],
        entropy=pred_h,
        expected_entropy=exp_h,
        mi=(pred_h - exp_h).clamp_min(0),
    )
