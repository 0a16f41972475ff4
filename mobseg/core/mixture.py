"""Moment matching of a mixture of passes: MC dropout and test-time augmentation as uncertainty.

SPEC section 5 (prediction). A prediction made of T passes that differ (MC
dropout: T dropout masks; ``--tta-mixture``: the mirrored passes) is, per
voxel, an equally weighted mixture of the passes' logit distributions: each
pass t gives the logit difference d = eta_1 - eta_0 a Gaussian N(m_t, s_t^2)
(a point mass, s_t^2 = 0, for the deterministic head). The mixture's exact
mean and variance of d are (law of total variance)

    m   = (1/T) sum_t m_t,
    s^2 = (1/T) sum_t s_t^2  +  (1/T) sum_t (m_t - m)^2,

the second term, Var_t(m_t) (ddof = 0), being the between-pass (epistemic)
part. The prediction carries the mixture as the Gaussian N(m, s^2) with
these two moments: the *moment matching is the approximation* (a mixture of
Gaussians is not Gaussian); every map computed from (m, s^2) is then exact
for that Gaussian. The between-pass variance is carried as a third channel,
so that it can be stitched, resampled (convex combinations keep it >= 0) and
written as its own map. Two classes only.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PassMoments:
    """Streaming moments of per-pass parameters (m_t, s_t^2), one pass at a time.

    Welford's update in float64, so T passes cost three float64 maps, not T.
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None
        self._s2: Tensor | None = None

    def add(self, params: Tensor) -> None:
        """Add one pass: (B, 2, *sp) parameters (m, s^2) of d."""
        if params.dim() < 2 or params.shape[1] != 2:
            raise ValueError(
                f"a pass must have shape (B, 2, ...) (m, s^2 of two classes), got "
                f"{tuple(params.shape)}"
            )
        m = params[:, 0:1].double()
        s2 = params[:, 1:2].double().clamp_min(0)
        self.n += 1
        if self._mean is None or self._m2 is None or self._s2 is None:
            self._mean, self._m2, self._s2 = m.clone(), torch.zeros_like(m), s2.clone()
            return
        delta = m - self._mean
        self._mean += delta / self.n
        self._m2 += delta * (m - self._mean)
        self._s2 += s2

    def result(self) -> Tensor:
        """(B, 3, *sp) float32: the mixture's m, s^2 (within + between) and Var_t(m_t)."""
        if self._mean is None or self._m2 is None or self._s2 is None:
            raise ValueError("no pass was added")
        between = (self._m2 / self.n).clamp_min(0)
        within = self._s2 / self.n
        return torch.cat([self._mean, within + between, between], dim=1).float()


def mixture_parameters(passes: Tensor) -> Tensor:
    """Moment-matched parameters of T passes stacked on axis 0: (T, B, 2, *sp) -> (B, 3, *sp).

    The batch form of :class:`PassMoments` (same result up to rounding).
    """
    acc = PassMoments()
    for p in passes:
        acc.add(p)
    return acc.result()
