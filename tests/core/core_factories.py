"""Random parameters and distributions for the tests of mobseg.core."""

from __future__ import annotations

import torch

from mobseg.core.distributions import (
    DeterministicLogits,
    DiagonalLogits,
    LogitDistribution,
    LowRankLogits,
    MixtureOfBasesLogits,
    SingleBasisLogits,
)

#: (method, options) of every stochastic distribution variant.
VARIANTS: list[tuple[str, dict]] = [
    ("diagonal", {}),
    ("lowrank", {}),
    ("single-basis", {"noise": "voxel"}),
    ("single-basis", {"noise": "voxel", "sampler": "factor"}),
    ("single-basis", {"noise": "block"}),
    ("single-basis", {"noise": "global"}),
    ("mob", {"noise": "voxel"}),
    ("mob", {"noise": "voxel", "sampler": "factor"}),
    ("mob", {"noise": "block"}),
    ("mob", {"noise": "voxel", "mixing": "hard"}),
    ("mob", {"noise": "block", "mixing": "hard"}),
]


def variant_id(method: str, opts: dict) -> str:
    return "-".join([method, *(str(v) for v in opts.values())])


def random_params(
    method: str,
    batch: int,
    classes: int,
    spatial: tuple[int, ...],
    rank: int = 3,
    bases: int = 3,
    partitions: int = 2,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    requires_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Parameters of ``method`` with well-spread variances and correlations."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    p: dict[str, torch.Tensor] = {"mu": rnd(batch, classes, *spatial, scale=2.0)}
    if method != "deterministic":
        p["variance"] = torch.rand(batch, classes, *spatial, generator=g, dtype=dtype) * 0.5 + 0.05
    if method == "lowrank":
        p["factor"] = rnd(batch, classes, rank, *spatial, scale=0.7)
    if method in ("single-basis", "mob"):
        p["coeffs"] = rnd(batch, rank, *spatial)
    if method == "single-basis":
        p["basis"] = rnd(classes, rank)
    if method == "mob":
        p["bases"] = rnd(bases, classes, rank)
        nb = partitions ** len(spatial)
        p["weights"] = torch.softmax(rnd(batch, nb, bases, scale=2.0), -1)
    if requires_grad:
        for t in p.values():
            t.requires_grad_()
    return p


def build(
    method: str, params: dict[str, torch.Tensor], partitions: int = 2, **opts
) -> LogitDistribution:
    """The distribution of ``method`` from ``params`` (see random_params)."""
    mu = params["mu"]
    if method == "deterministic":
        return DeterministicLogits(mu)
    if method == "diagonal":
        return DiagonalLogits(mu, params["variance"])
    if method == "lowrank":
        return LowRankLogits(mu, params["variance"], params["factor"])
    if method == "single-basis":
        return SingleBasisLogits(
            mu, params["variance"], params["coeffs"], params["basis"], partitions=partitions, **opts
        )
    return MixtureOfBasesLogits(
        mu,
        params["variance"],
        params["coeffs"],
        params["bases"],
        params["weights"],
        partitions=partitions,
        **opts,
    )
