"""The one list of methods: name -> (distribution class, head class).

The CLI, the trainer, the predictor and the report all read :data:`METHODS`
(in the order of the paper's tables, :data:`mobseg.core.config.METHOD_NAMES`)
and build heads with :func:`build_head`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mobseg.core.config import METHOD_LABELS, METHOD_NAMES, HeadConfig, check_method
from mobseg.core.distributions import (
    DeterministicLogits,
    DiagonalLogits,
    LogitDistribution,
    LowRankLogits,
    MixtureOfBasesLogits,
    SingleBasisLogits,
)
from mobseg.core.heads import (
    DeterministicHead,
    DiagonalHead,
    LowRankHead,
    MixtureOfBasesHead,
    SingleBasisHead,
    StochasticHead,
)


@dataclass(frozen=True)
class MethodEntry:
    """One method of the study.

    Attributes:
        name: CLI name (``mob``).
        label: Display name (``Mixture-of-Bases``).
        distribution: The LogitDistribution subclass its head returns.
        head: The StochasticHead subclass, built as ``head(cfg, in_channels)``.
    """

    name: str
    label: str
    distribution: type[LogitDistribution]
    head: type[StochasticHead]

    @property
    def stochastic(self) -> bool:
        return self.name != "deterministic"


_CLASSES: dict[str, tuple[type[LogitDistribution], type[StochasticHead]]] = {
    "deterministic": (DeterministicLogits, DeterministicHead),
    "diagonal": (DiagonalLogits, DiagonalHead),
    "lowrank": (LowRankLogits, LowRankHead),
    "single-basis": (SingleBasisLogits, SingleBasisHead),
    "mob": (MixtureOfBasesLogits, MixtureOfBasesHead),
}

#: name -> MethodEntry, in the order of METHOD_NAMES.
METHODS: dict[str, MethodEntry] = {
    name: MethodEntry(name, METHOD_LABELS[name], *_CLASSES[name]) for name in METHOD_NAMES
}


def build_head(cfg: HeadConfig, in_channels: int) -> StochasticHead:
    """A freshly initialised head for ``cfg``.

    Args:
        cfg: The method and its hyper-parameters.
        in_channels: F, channels of the decoder features it reads.

    Returns:
        An ``nn.Module``; ``head(features, mu)`` returns the logit distribution.
    """
    check_method(cfg.method)
    return METHODS[cfg.method].head(cfg, in_channels)
