"""The method registry and the configuration extensions of the core."""

from __future__ import annotations

import pytest
import torch

from mobseg.core.config import METHOD_LABELS, METHOD_NAMES, HeadConfig, LossConfig
from mobseg.core.distributions import LogitDistribution
from mobseg.core.heads import StochasticHead
from mobseg.core.registry import METHODS, MethodEntry, build_head
from mobseg.errors import ConfigurationError, UnknownNameError


def test_registry_lists_the_five_methods_in_table_order() -> None:
    assert list(METHODS) == list(METHOD_NAMES)
    for name, entry in METHODS.items():
        assert isinstance(entry, MethodEntry)
        assert entry.name == name and entry.label == METHOD_LABELS[name]
        assert issubclass(entry.distribution, LogitDistribution)
        assert issubclass(entry.head, StochasticHead)
        assert entry.stochastic == (name != "deterministic")


@pytest.mark.parametrize(
    "cfg",
    [
        HeadConfig("deterministic"),
        HeadConfig("diagonal", num_classes=3),
        HeadConfig("lowrank", rank=5),
        HeadConfig("single-basis", noise="global"),
        HeadConfig("single-basis", noise="block", partitions=3),
        HeadConfig("mob", bases=1),
        HeadConfig("mob", bases=4, mixing="hard", noise="block"),
        HeadConfig("mob", sampler="factor"),
    ],
    ids=lambda c: c.tag(),
)
def test_build_head_returns_the_registered_pair(cfg: HeadConfig) -> None:
    head = build_head(cfg, 6)
    entry = METHODS[cfg.method]
    assert isinstance(head, entry.head) and isinstance(head, torch.nn.Module)
    feats = torch.randn(2, 6, 5, 6, 4)
    mu = torch.randn(2, cfg.num_classes, 5, 6, 4)
    dist = head(feats, mu)
    assert type(dist) is entry.distribution
    assert dist.rsample(2).shape == (2, *mu.shape)


def test_sampler_option_validation_and_tag() -> None:
    assert HeadConfig("mob").sampler == "cholesky"
    assert HeadConfig("mob", sampler="factor").tag() == "mob-b3-r16-factor"
    assert HeadConfig("single-basis", sampler="factor").tag() == "single-basis-r16-factor"
    with pytest.raises(UnknownNameError, match="sampler"):
        HeadConfig("mob", sampler="qr")
    with pytest.raises(ConfigurationError, match="voxel noise only"):
        HeadConfig("mob", sampler="factor", noise="block")
    with pytest.raises(ConfigurationError, match="voxel noise only"):
        HeadConfig("lowrank", sampler="factor")
    with pytest.raises(ConfigurationError, match="eps"):
        HeadConfig("diagonal", eps=0.0)


def test_loss_config_extensions() -> None:
    cfg = LossConfig()
    assert cfg.batch_dice is True and cfg.smooth == 1e-5
    assert (cfg.lambda_kl, cfg.lambda_orth, cfg.lambda_w) == (5e-4, 1.0, 0.05)
    with pytest.raises(ConfigurationError, match="smooth"):
        LossConfig(smooth=-1.0)
