"""Exact per-voxel moments of p = softmax(eta) for two classes (SPEC section 5).

With C = 2, softmax(eta) depends only on the logit difference
d = eta_1 - eta_0, and every method's per-voxel marginal of d is Gaussian,
d ~ N(m, s^2). Every map that ``predict`` writes is then a one-dimensional
Gaussian integral of a function of d:

    p(d)  = sigmoid(d)                               foreground probability
    H(d)  = -p ln p - (1 - p) ln(1 - p)
          = softplus(-d) + (1 - p) d                 entropy of one draw (nats)

    E[p], Var[p] = E[(p - E[p])^2], E[H],  H(E[p]),  MI = H(E[p]) - E[H].

This module evaluates these integrals by deterministic quadrature (no Monte
Carlo, no sample count), accurate for every m and s, from a point mass
(s = 0) to a very wide Gaussian. Write d = m + s x with x ~ N(0, 1):

* s <= 1: Gauss-Hermite in x. sigmoid has poles at d = +-i pi, i.e. at
  distance pi / s from the real x axis, so the narrower the Gaussian the
  fewer nodes it needs: 1 node for s = 0 (a point mass), 2 up to s = 0.02,
  4 up to 0.2, 8 up to 0.5 and 16 up to 1 (:data:`HERMITE_TIERS`, each with
  a measured error below 3e-8).
* s > 1: the poles come close and Gauss-Hermite converges slowly, but the
  Gaussian in d is now at least as wide as sigmoid's transition. Split
  f = A + B Phi(d / c) + r(d) with c = 1.7, where the smooth step has the
  closed form E[Phi(d / c)] = Phi(m / sqrt(c^2 + s^2)) (B = 1 for p and p^2,
  0 for H) and the remainder r decays like (|d| + 1) e^-|d|. E[r(d)] is the
  integral of r(d) N(d; m, s^2), analytic in the strip |Im d| < pi, so the
  trapezoidal rule on fixed nodes d_j = 0.75 j, |d_j| <= T = 20 (55 nodes)
  converges exponentially; r(d_j) is computed once, each voxel costs one
  exponential per node, and the sums over nodes are one matrix product.

Measured maximum absolute error against ``scipy.integrate.quad`` over
m in [-40, 35], s in [0, 100] (float64): below 3e-8 for E[p], E[p^2] and E[H]
(tests assert <= 1e-6). Var[p] and E[H] are accumulated as deviations from
their value at d = m, so a point mass (s = 0, every node at d = m) gives
Var[p] = 0 and MI = 0 exactly, by computation. Var[p] <= s^2 / 16 always
(sigmoid's slope is at most 1/4).

For C > 2 no one-dimensional reduction exists; see
:func:`mobseg.core.inference.voxel_mc_maps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

#: |d| beyond which the remainders of the wide rule are neglected (<= 21 e^-20 = 4.3e-8).
SATURATION = 20.0
#: Elements of one (nodes x voxels) weight matrix of the wide rule.
WIDE_ELEMENTS = 2**21
#: Step of the wide rule's trapezoidal nodes in d, and the scale c of its smooth part.
TRAPEZOID_STEP = 0.75
PROBIT_SCALE = 1.7
#: (largest s, Gauss-Hermite nodes): the fewest nodes whose measured error stays below
#: 3e-8 up to that s (a point mass needs one node, d = m).
HERMITE_TIERS: tuple[tuple[float, int], ...] = ((0.0, 1), (0.02, 2), (0.2, 4), (0.5, 8), (1.0, 16))
HERMITE_MAX_STD = HERMITE_TIERS[-1][0]
#: Remainders r(d_j) smaller than this are set to 0 (their share of any moment is < 1e-15).
REMAINDER_FLOOR = 1e-15
#: Floor of the wide rule's log-weights (see :func:`_wide`).
MIN_EXPONENT = -50.0
#: Voxels integrated at once (bounds memory: a few temporaries of this many values).
CHUNK = 2**18


@dataclass
class BinaryMaps:
    """Per-voxel maps of a two-class prediction, all of the shape of the inputs.

    Attributes:
        mean_p: E[p] of the foreground (class 1).
        var_p: Var[p] of the foreground.
        expected_entropy: E[H(p)] in nats.
        predictive_entropy: H(E[p]) in nats.
        mutual_information: H(E[p]) - E[H(p)] in nats (>= 0).
    """

    mean_p: Tensor
    var_p: Tensor
    expected_entropy: Tensor
    predictive_entropy: Tensor
    mutual_information: Tensor


@lru_cache(maxsize=8)
def _trapezoid_rule(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Fixed nodes d_j = j h, |d_j| <= T, and the remainders r(d_j) of p, p^2 and H.

    Returns:
        (d, r): d (J,), r (3, J) = sigmoid - Phi(d / c), sigmoid^2 - Phi(d / c), H.
    """
    half = math.ceil(SATURATION / TRAPEZOID_STEP)
    d = torch.arange(-half, half + 1, dtype=torch.float64) * TRAPEZOID_STEP
    smooth = _normal_cdf(d / PROBIT_SCALE)
    p, h = _p_and_entropy(d.clone())
    r = torch.stack([p - smooth, p * p - smooth, h])
    r[r.abs() < REMAINDER_FLOOR] = 0.0  # see _wide: no subnormal products
    return d.to(dtype=dtype, device=device), r.to(dtype=dtype, device=device)


@lru_cache(maxsize=16)
def _hermite_rule(n: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of n-point Gauss-Hermite for the standard normal (weights sum to 1)."""
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x.tolist(), (w / w.sum()).tolist()


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def _entropy_of_p(p: Tensor) -> Tensor:
    """Binary entropy of a probability (nats)."""
    q = 1 - p
    tiny = torch.finfo(p.dtype).tiny  # 0 * log(tiny) = 0: the limit of x log x at 0
    return -(p * p.clamp_min(tiny).log() + q * q.clamp_min(tiny).log())


def _p_and_entropy(d: Tensor) -> tuple[Tensor, Tensor]:
    """sigmoid(d) and the binary entropy of it, stable for large |d|.

    ln p = -softplus(-d) and ln(1 - p) = ln p - d, so H = softplus(-d) + (1 - p) d.
    """
    sp = torch.nn.functional.softplus(-d)
    p = torch.exp(-sp)
    return p, sp.add_((1 - p).mul_(d))


class _Sums:
    """Running E[p - p_m], E[(p - p_m)^2], E[H - H_m] over quadrature nodes."""

    def __init__(self, p_m: Tensor, h_m: Tensor) -> None:
        self.p_m, self.h_m = p_m, h_m
        self.dp = torch.zeros_like(p_m)
        self.dp2 = torch.zeros_like(p_m)
        self.dh = torch.zeros_like(p_m)

    def scatter(self, idx: Tensor, part: _Sums) -> None:
        """Write the sums of the voxels ``idx`` from ``part``."""
        for name in ("dp", "dp2", "dh"):
            getattr(self, name)[idx] = getattr(part, name)

    def add(self, w: Tensor | float, d: Tensor) -> None:
        p, h = _p_and_entropy(d)
        dp = p.sub_(self.p_m)
        self.dh.add_(h.sub_(self.h_m).mul_(w))
        wdp = dp * w
        self.dp.add_(wdp)
        self.dp2.add_(wdp.mul_(dp))


def _hermite(m: Tensor, s: Tensor, sums: _Sums, n: int) -> None:
    """n-point Gauss-Hermite (d = m + s x_i)."""
    for xi, wi in zip(*_hermite_rule(n), strict=True):
        sums.add(wi, m + s * xi)


def _wide(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """E[p], E[p^2], E[H] for s > HERMITE_MAX_STD (see the module docstring).

    The Gaussian weights of all nodes are one (nodes, voxels) matrix per slice of
    voxels, and the three sums over nodes one matrix product with the remainders.
    """
    d, r = _trapezoid_rule(m.dtype, m.device)
    out = torch.empty((3, m.numel()), dtype=m.dtype, device=m.device)
    step = max(1, WIDE_ELEMENTS // d.numel())
    log_norm = math.log(TRAPEZOID_STEP / math.sqrt(2 * math.pi))
    buf = torch.empty((d.numel(), min(step, m.numel())), dtype=m.dtype, device=m.device)
    for start in range(0, m.numel(), step):
        mm, ss = m[start : start + step], s[start : start + step]
        # g = exp(log_norm - log s - z^2 / 2), z = (d_j - m) / s: in place in one (J, n)
        # buffer reused by every slice (fresh buffers cost page faults on the CPU)
        g = buf if mm.numel() == buf.shape[1] else buf[:, : mm.numel()].contiguous()
        torch.sub(d[:, None], mm[None, :], out=g).div_(ss[None, :]).square_()
        torch.add((log_norm - ss.log())[None, :], g, alpha=-0.5, out=g)
        # Weights below e^-50 (2e-22) are negligible; flooring the exponent keeps every
        # weight, and every product with a remainder (|r| >= 1e-15 or 0), a normal
        # float32: subnormal numbers make exp and the matrix product several times
        # slower on x86 CPUs.
        g.clamp_min_(MIN_EXPONENT).exp_()
        part = out[:, start : start + step]
        torch.matmul(r, g, out=part)
        part[:2] += _normal_cdf(mm * torch.rsqrt(ss * ss + PROBIT_SCALE**2))
    return out[0], out[1], out[2]


def _chunk(m: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """E[p], Var[p], E[H], H(E[p]) of one flat chunk of voxels."""
    s = s2.clamp_min(0).sqrt()
    p_m, h_m = _p_and_entropy(m.clone())
    sums = _Sums(p_m, h_m)
    lower = -1.0
    for upper, n in HERMITE_TIERS:
        idx = ((s > lower) & (s <= upper)).nonzero().squeeze(1)
        lower = upper
        if idx.numel() == s.numel():
            _hermite(m, s, sums, n)
        elif idx.numel():
            part = _Sums(p_m[idx], h_m[idx])
            _hermite(m[idx], s[idx], part, n)
            sums.scatter(idx, part)
    idx = (s > HERMITE_MAX_STD).nonzero().squeeze(1)
    if idx.numel():
        every = idx.numel() == s.numel()  # no gather and scatter when every voxel is wide
        wide = sums if every else _Sums(p_m[idx], h_m[idx])
        ep, ep2, eh = _wide(m, s) if every else _wide(m[idx], s[idx])
        p_i = wide.p_m
        wide.dp, wide.dp2, wide.dh = ep - p_i, ep2 - 2 * p_i * ep + p_i**2, eh - wide.h_m
        if not every:
            sums.scatter(idx, wide)
    mean_p = (p_m + sums.dp).clamp(0, 1)
    var_p = (sums.dp2 - sums.dp**2).clamp_min(0)
    expected_h = (h_m + sums.dh).clamp_min(0)
    # H(E[p]) as H(p_m) plus its change, so that it equals E[H] for a point mass
    pred_h = _entropy_of_p(mean_p) - _entropy_of_p(p_m) + h_m
    return mean_p, var_p, expected_h, pred_h.clamp_min(0)


@torch.no_grad()
def binary_maps(mean: Tensor, variance: Tensor, chunk: int = CHUNK) -> BinaryMaps:
    """E[p], Var[p], E[H], H(E[p]) and MI for d ~ N(mean, variance), per voxel.

    Args:
        mean: m, the mean of the logit difference eta_1 - eta_0, any shape.
        variance: s^2 >= 0, its variance, the shape of ``mean``.
        chunk: Voxels integrated at once.

    Returns:
        :class:`BinaryMaps` of the shape of ``mean``, float32 for float32 (or
        lower) inputs, float64 for float64 inputs.

    Raises:
        ValueError: mismatching shapes, a negative or non-finite variance, or
            a non-finite mean.
    """
    if mean.shape != variance.shape:
        raise ValueError(
            f"mean {tuple(mean.shape)} and variance {tuple(variance.shape)} must have one shape"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype = torch.promote_types(torch.promote_types(mean.dtype, variance.dtype), torch.float32)
    m = mean.reshape(-1).to(dtype)
    v = variance.reshape(-1).to(dtype)
    if not torch.isfinite(m).all() or not torch.isfinite(v).all():
        raise ValueError("mean and variance must be finite")
    if (v < 0).any():
        raise ValueError(f"variance must be >= 0, got a minimum of {float(v.min()):.3g}")
    outs = [torch.empty_like(m) for _ in range(4)]
    for start in range(0, m.numel(), chunk):
        sl = slice(start, start + chunk)
        for out, part in zip(outs, _chunk(m[sl], v[sl]), strict=True):
            out[sl] = part
    mean_p, var_p, exp_h, pred_h = (o.reshape(mean.shape) for o in outs)
    return BinaryMaps(
        mean_p=mean_p,
        var_p=var_p,
        expected_entropy=exp_h,
        predictive_entropy=pred_h,
        mutual_information=(pred_h - exp_h).clamp_min(0),
    )
