"""The fine-tuning loss of the stochastic heads (SPEC section 4).

For k samples eta_i of the logits (drawn from the distribution by the loss
itself, ``k = LossConfig.samples``)::

    L_i   = lambda_CE * CE(softmax(eta_i), t) + lambda_Dice * SoftDice(softmax(eta_i), t)
    data  = (1/k) sum_i L_i                                   (mc_loss = "mean", default)
    total = data + lambda_KL * KL + lambda_orth * L_orth + lambda_w * L_w

with nnU-Net's conventions: CE averaged over every voxel of the batch; soft
Dice on the foreground classes only, batch Dice by default (intersection and
sums over the whole batch before the ratio), smooth 1e-5,
``dc = (2 I + s) / max(|P| + |G| + s, 1e-8)`` averaged over the foreground
classes. The Dice term reported here is the loss ``1 - dc``; nnU-Net itself
reports ``-dc`` (a constant offset of 1, same gradients).

``mc_loss = "logsumexp"`` replaces the CE part by the SSN objective, per patch
b: ``-(1/N) log (1/k) sum_i exp(-sum_n CE_{i,b,n})`` averaged over the batch
(divided by the N voxels of a patch so that it is on the scale of the mean CE,
and equal to it for k = 1); the Dice part stays the mean over the samples.
``antithetic`` draws the samples in pairs mu +- e.

Regularisers, applied once per step:

* KL(N(mu, I) || N(mu, diag(D))) = 0.5 (1/d - 1 + ln d) per element of the
  diagonal variance D, averaged over the elements; minimum 0 at d = 1.
* Orthogonality of the bases (M >= 2): with v_m the normalised flattened
  B_m (C*R values) and G_ij = v_i . v_j, ``L_orth = sum_{i != j} G_ij^2 / (M (M - 1))``.
  Zero for one basis (no division by zero).
* Weight negative entropy (mob): ``L_w = mean_p sum_m W_pm ln W_pm`` over the
  non-empty blocks and the batch; -ln M at uniform weights, its minimum.

A deterministic distribution gives KL = orth = entropy = 0, and its k samples
are identical, so its data term is computed once (the mean over k identical
terms, exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from mobseg.core.config import LossConfig
from mobseg.core.distributions import LogitDistribution


@dataclass
class LossTerms:
    """Every term of the loss, as scalar tensors (``total`` carries the gradient).

    Attributes:
        total: data + lambda_KL kl + lambda_orth orth + lambda_w entropy.
        data: lambda_CE ce + lambda_Dice dice.
        ce: Cross-entropy part (mean over samples, or the logsumexp objective).
        dice: Soft Dice loss 1 - dc, mean over samples.
        kl: KL term (unweighted).
        orth: Orthogonality term (unweighted).
        entropy: Weight negative entropy (unweighted).
    """

    total: Tensor
    data: Tensor
    ce: Tensor
    dice: Tensor
    kl: Tensor
    orth: Tensor
    entropy: Tensor

    def as_dict(self) -> dict[str, float]:
        """Every term as a Python float, for logging."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def kl_unit_prior(variance: Tensor) -> Tensor:
    """KL(N(mu, I) || N(mu, diag(D))) per element, averaged.

    Args:
        variance: D > 0, any shape.

    Returns:
        Scalar ``mean(0.5 * (1/d - 1 + ln d))``.
    """
    d = variance.float() if variance.dtype in (torch.float16, torch.bfloat16) else variance
    return (0.5 * (d.reciprocal() - 1.0 + d.log())).mean()


def orthogonality(bases: Tensor) -> Tensor:
    """Mean squared cosine between distinct bases.

    Args:
        bases: (M, C, R).

    Returns:
        Scalar ``sum_{i != j} G_ij^2 / (M (M - 1))``, 0 for M = 1.
    """
    m = bases.shape[0]
    if m < 2:
        return bases.new_zeros(())
    v = torch.nn.functional.normalize(bases.reshape(m, -1), dim=1, eps=1e-12)
    gram = v @ v.T
    off = gram - torch.diag_embed(torch.diagonal(gram))
    return off.square().sum() / (m * (m - 1))


def weight_negative_entropy(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over blocks (and batch) of sum_m W_pm ln W_pm.

    Args:
        weights: (B, P^d, M) rows on the simplex.
        mask: (P^d,) bool, the blocks to average over (default all).

    Returns:
        Scalar, -ln M at uniform weights.
    """
    if mask is not None:
        weights = weights[:, mask]
    return torch.special.xlogy(weights, weights).sum(-1).mean()


def _labels(target: Tensor, mu: Tensor) -> Tensor:
    """(B, 1, *sp) or (B, *sp) labels -> (B, *sp) int64, checked against mu (B, C, *sp)."""
    b, c, sp = mu.shape[0], mu.shape[1], tuple(mu.shape[2:])
    given = tuple(target.shape)
    if target.dim() == mu.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (b, *sp):
        raise ValueError(
            f"target must be (B, 1, *sp) = ({b}, 1, {', '.join(map(str, sp))}) integer labels to "
            f"match the logits {tuple(mu.shape)}, got {given}."
        )
    t = target.long()
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"target labels must lie in [0, {c - 1}] for C = {c}, got [{lo}, {hi}].")
    return t


def _ce_and_dice(
    samples: Tensor, labels: Tensor, batch_dice: bool, smooth: float
) -> tuple[Tensor, Tensor]:
    """CE per voxel (k, B, *sp) and the soft Dice loss per sample (k,).

    For C = 2 only delta = eta_1 - eta_0 matters: CE = softplus(delta) for
    background voxels and softplus(-delta) for organ voxels, p_1 = sigmoid(delta)
    (half the memory traffic of a log-softmax). For C > 2 the log-softmax is
    written without gather or class slicing, whose backward passes would fill
    full (k, B, C, *sp) tensors with zeros.
    """
    c = samples.shape[2]
    sp_dims = tuple(range(2, samples.dim() - 1))  # spatial dims of a (k, B, *sp) tensor
    masks = [labels == i for i in range(c)]
    fg_probs: list[Tensor] = []
    if c == 2:
        eta0, eta1 = samples.unbind(2)
        delta = eta1 - eta0
        sign = 1.0 - 2.0 * masks[1].to(samples.dtype)  # +1 background, -1 organ
        ce = torch.nn.functional.softplus(sign * delta)
        fg_probs.append(torch.sigmoid(delta))
    else:
        per_class = torch.log_softmax(samples, dim=2).unbind(2)  # C x (k, B, *sp)
        loglik = per_class[0]
        for i in range(1, c):
            loglik = torch.where(masks[i], per_class[i], loglik)
        ce = -loglik
        fg_probs.extend(per_class[i].exp() for i in range(1, c))
    intersect, sum_pred, sum_gt = [], [], []
    for i, p_i in enumerate(fg_probs, start=1):
        onehot = masks[i].to(samples.dtype)
        intersect.append(torch.einsum("kbn,bn->kb", p_i.flatten(2), onehot.flatten(1)))
        sum_pred.append(p_i.sum(sp_dims))
        sum_gt.append(onehot.flatten(1).sum(-1))
    inter_t = torch.stack(intersect, -1)  # (k, B, C-1)
    pred_t = torch.stack(sum_pred, -1)
    gt_t = torch.stack(sum_gt, -1)  # (B, C-1)
    if batch_dice:
        inter_t, pred_t, gt_t = inter_t.sum(1), pred_t.sum(1), gt_t.sum(0)
    dc = (2 * inter_t + smooth) / (gt_t + pred_t + smooth).clamp_min(1e-8)
    return ce, 1.0 - dc.flatten(1).mean(1)


def ce_and_dice(
    samples: Tensor, labels: Tensor, batch_dice: bool = True, smooth: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Per-voxel CE and per-sample soft Dice loss of logit samples.

    Args:
        samples: (k, B, C, *sp) logits.
        labels: (B, *sp) int64 labels in [0, C).
        batch_dice: Sum intersection and volumes over the batch before the ratio.
        smooth: Dice smoothing.

    Returns:
        ``ce`` (k, B, *sp) = -log softmax(eta)_t per voxel, and ``dice`` (k,)
        = 1 - mean over foreground classes (and patches if not batch_dice) of
        ``dc = (2 I + smooth) / max(|P| + |G| + smooth, 1e-8)``.
    """
    return _ce_and_dice(samples, labels, batch_dice, smooth)


class StochasticSegLoss(nn.Module):
    """CE + Dice over k logit samples plus the regularisers (module docstring).

    Args:
        loss_cfg: Samples per step, Monte-Carlo objective and weights.
    """

    def __init__(self, loss_cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = loss_cfg if loss_cfg is not None else LossConfig()

    def forward(
        self,
        dist: LogitDistribution,
        target: Tensor,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """Sample k logits from ``dist`` and compute every term.

        Args:
            dist: The heads' distribution, mean (B, C, *sp).
            target: (B, 1, *sp) integer labels (float dtypes holding integers
                are accepted, as nnU-Net's loaders produce).
            generator: Optional generator for the samples.

        Returns:
            The :class:`LossTerms`.
        """
        cfg = self.cfg
        labels = _labels(target, dist.mean)
        with torch.autocast(device_type=dist.device.type, enabled=False):
            if dist.is_deterministic:
                k = 1
                samples = dist.mean[None]
            else:
                k = cfg.samples
                samples = dist.rsample(k, antithetic=cfg.antithetic, generator=generator)
            ce_vox, dice_k = _ce_and_dice(samples, labels, cfg.batch_dice, cfg.smooth)
            del samples
            dice = dice_k.mean()
            if cfg.mc_loss == "logsumexp":
                s = ce_vox.flatten(2).sum(-1)  # (k, B): sum_n CE_{i,b,n}
                lse = torch.logsumexp(-s, dim=0) - math.log(k)
                ce = -lse.mean() / dist.num_voxels
            else:
                ce = ce_vox.mean()
            data = cfg.lambda_ce * ce + cfg.lambda_dice * dice

            zero = dist.mean.new_zeros(())
            kl = kl_unit_prior(dist.variance) if dist.variance is not None else zero
            orth = orthogonality(dist.bases) if dist.bases is not None else zero
            ent = (
                weight_negative_entropy(dist.weights, dist.block_mask)
                if dist.weights is not None
                else zero
            )
            total = data + cfg.lambda_kl * kl + cfg.lambda_orth * orth + cfg.lambda_w * ent
        return LossTerms(total=total, data=data, ce=ce, dice=dice, kl=kl, orth=orth, entropy=ent)
