"""HeadConfig / LossConfig validation and run tags."""

from __future__ import annotations

import pytest

from mobseg.core.config import HeadConfig, LossConfig
from mobseg.errors import ConfigurationError, UnknownNameError


@pytest.mark.parametrize(
    ("cfg", "tag"),
    [
        (HeadConfig("deterministic"), "deterministic"),
        (HeadConfig("diagonal"), "diagonal"),
        (HeadConfig("lowrank"), "lowrank-r16"),
        (HeadConfig("single-basis", rank=8), "single-basis-r8"),
        (HeadConfig("single-basis", noise="global"), "single-basis-r16-global"),
        (HeadConfig("mob"), "mob-b3-r16"),
        (HeadConfig("mob", bases=5, partitions=2, noise="block"), "mob-b5-r16-p2-block"),
        (HeadConfig("mob", mixing="hard"), "mob-b3-r16-hard"),
    ],
)
def test_tags(cfg: HeadConfig, tag: str) -> None:
    assert cfg.tag() == tag


def test_invalid_configs() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'mob'"):
        HeadConfig("mobb")
    with pytest.raises(ConfigurationError, match="single-basis only"):
        HeadConfig("mob", noise="global")
    with pytest.raises(ConfigurationError, match="--bases must be >= 1"):
        HeadConfig("mob", bases=0)
    with pytest.raises(ConfigurationError, match="even --samples"):
        LossConfig(samples=5, antithetic=True)
    with pytest.raises(UnknownNameError):
        LossConfig(mc_loss="median")
