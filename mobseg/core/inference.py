"""Monte-Carlo moments of the class probabilities (SPEC section 5).

Per sliding-window tile the predictor runs the backbone once, builds the
heads' distribution and calls :func:`mc_moments`, which draws the k samples of
the logits in chunks (memory holds ``chunk`` samples, never k) and returns

* ``mean_p``       E[p]      (B, C, *sp), p = softmax(eta) over the classes;
* ``mean_p2``      E[p^2]    (B, C, *sp);
* ``mean_entropy`` E[H(p)]   (B, 1, *sp), H(p) = -sum_c p_c ln p_c in nats
  (a channel axis of size 1, so every moment stitches like a (B, C', *sp) map).

Tiles are stitched by weighting these moments (never variances) with nnU-Net's
Gaussian importance map; then :func:`probability_variance`,
:func:`predictive_entropy` and :func:`mutual_information` derive Var[p],
H(E[p]) and H(E[p]) - E[H(p)] from the stitched moments.

Everything is computed in float32 (float64 for float64 inputs) from
log-softmax, so logits of magnitude 1e4 and fp16/bf16 inputs stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mobseg.core.distributions import LogitDistribution


@dataclass
class MCMoments:
    """First and second moments and expected entropy of p = softmax(eta).

    Attributes:
        mean_p: (B, C, *sp) E[p].
        mean_p2: (B, C, *sp) E[p^2].
        mean_entropy: (B, 1, *sp) E[H(p)] in nats.
        samples: k, the number of samples averaged.
    """

    mean_p: Tensor
    mean_p2: Tensor
    mean_entropy: Tensor
    samples: int

    def variance(self) -> Tensor:
        """(B, C, *sp) Var[p] = E[p^2] - E[p]^2 (clamped at 0)."""
        return probability_variance(self.mean_p, self.mean_p2)

    def predictive_entropy(self) -> Tensor:
        """(B, 1, *sp) H(E[p])."""
        return predictive_entropy(self.mean_p)

    def mutual_information(self) -> Tensor:
        """(B, 1, *sp) H(E[p]) - E[H(p)] (clamped at 0)."""
        return mutual_information(self.mean_p, self.mean_entropy)


def probability_variance(mean_p: Tensor, mean_p2: Tensor) -> Tensor:
    """Var[p] = E[p^2] - E[p]^2, clamped at 0 against rounding; any matching shapes."""
    return (mean_p2 - mean_p.square()).clamp_min(0)


def predictive_entropy(mean_p: Tensor, dim: int = 1) -> Tensor:
    """H(E[p]) = -sum_c E[p_c] ln E[p_c] in nats, keeping ``dim`` with size 1.

    Args:
        mean_p: (B, C, *sp) (or (C, *sp) with ``dim=0``) stitched mean probabilities.
        dim: The class axis.
    """
    p = mean_p.clamp_min(0)
    return -torch.special.xlogy(p, p).sum(dim, keepdim=True)


def mutual_information(mean_p: Tensor, mean_entropy: Tensor, dim: int = 1) -> Tensor:
    """H(E[p]) - E[H(p)] (>= 0 up to Monte-Carlo and rounding error, clamped at 0)."""
    return (predictive_entropy(mean_p, dim) - mean_entropy).clamp_min(0)


def _accumulate(eta: Tensor, sum_p: Tensor, sum_p2: Tensor, sum_h: Tensor) -> None:
    """Add the moments of (c, B, C, *sp) logit samples into the accumulators."""
    logp = torch.log_softmax(eta, dim=2)
    p = logp.exp()
    sum_h.sub_((p * logp).sum(2, keepdim=True).sum(0))
    sum_p.add_(p.sum(0))
    sum_p2.add_(p.square_().sum(0))


@torch.no_grad()
def mc_moments(
    dist: LogitDistribution,
    k: int,
    chunk: int = 10,
    generator: torch.Generator | None = None,
) -> MCMoments:
    """Monte-Carlo moments of softmax(eta) from ``k`` samples drawn ``chunk`` at a time.

    Args:
        dist: The logit distribution of a tile, mean (B, C, *sp).
        k: Number of samples (>= 1). A deterministic distribution is
            evaluated once (its k samples are identical).
        chunk: Samples held in memory at once (>= 1).
        generator: Optional generator for reproducible draws.

    Returns:
        :class:`MCMoments` with ``mean_p``, ``mean_p2`` (B, C, *sp) and
        ``mean_entropy`` (B, 1, *sp).
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"mc_moments needs k >= 1 and chunk >= 1, got k={k}, chunk={chunk}.")
    mu = dist.mean
    dtype = torch.promote_types(mu.dtype, torch.float32)
    b, _, *sp = mu.shape
    sum_p = torch.zeros(mu.shape, dtype=dtype, device=mu.device)
    sum_p2 = torch.zeros_like(sum_p)
    sum_h = torch.zeros((b, 1, *sp), dtype=dtype, device=mu.device)
    with torch.autocast(device_type=mu.device.type, enabled=False):
        if dist.is_deterministic:
            _accumulate(mu.to(dtype)[None], sum_p, sum_p2, sum_h)
            n = 1
        else:
            done = 0
            while done < k:
                c = min(chunk, k - done)
                _accumulate(dist.rsample(c, generator=generator).to(dtype), sum_p, sum_p2, sum_h)
                done += c
            n = k
    return MCMoments(sum_p / n, sum_p2 / n, sum_h / n, samples=k)
