"""HeadConfig / LossConfig validation and run tags."""

from __future__ import annotations

import pytest

from mobseg.core.config import HeadConfig, LossConfig, RunConfig
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


# ------------------------------------------------------------------ run identity
def _variants() -> dict[str, RunConfig]:
    """One run per option that changes a trained model, each differing from the paper's mob."""
    mob = HeadConfig("mob")
    return {
        "paper": RunConfig(mob),
        "rank": RunConfig(HeadConfig("mob", rank=8)),
        "bases": RunConfig(HeadConfig("mob", bases=2)),
        "partitions": RunConfig(HeadConfig("mob", partitions=2)),
        "noise": RunConfig(HeadConfig("mob", noise="block")),
        "mixing": RunConfig(HeadConfig("mob", mixing="hard")),
        "temperature": RunConfig(HeadConfig("mob", temperature=0.5)),
        "sampler": RunConfig(HeadConfig("mob", sampler="factor")),
        "eps": RunConfig(HeadConfig("mob", eps=1e-4)),
        "mc_loss": RunConfig(mob, LossConfig(mc_loss="logsumexp")),
        "samples": RunConfig(mob, LossConfig(samples=8)),
        "antithetic": RunConfig(mob, LossConfig(samples=6, antithetic=True)),
        "samples6": RunConfig(mob, LossConfig(samples=6)),
        "lambda_ce": RunConfig(mob, LossConfig(lambda_ce=0.5)),
        "lambda_dice": RunConfig(mob, LossConfig(lambda_dice=0.0)),
        "lambda_kl": RunConfig(mob, LossConfig(lambda_kl=1e-3)),
        "lambda_orth": RunConfig(mob, LossConfig(lambda_orth=0.1)),
        "lambda_w": RunConfig(mob, LossConfig(lambda_w=0.0)),
        "smooth": RunConfig(mob, LossConfig(smooth=1.0)),
        "lr": RunConfig(mob, lr=3e-4),
        "weight_decay": RunConfig(mob, weight_decay=0.0),
        "epochs": RunConfig(mob, epochs=3),
        "iterations": RunConfig(mob, iterations=3),
        "epochs_iterations": RunConfig(mob, epochs=3, iterations=3),
        "val_every": RunConfig(mob, val_every=2),
        "annotators": RunConfig(mob, annotators="all"),
    }


def test_every_model_changing_option_has_its_own_tag() -> None:
    tags = {name: cfg.tag() for name, cfg in _variants().items()}
    assert len(set(tags.values())) == len(tags), tags
    assert tags["paper"] == "mob-b3-r16"
    assert tags["mc_loss"] == "mob-b3-r16-lse"
    assert tags["samples"] == "mob-b3-r16-k8"
    assert tags["antithetic"] == "mob-b3-r16-k6-anti"
    assert tags["annotators"] == "mob-b3-r16-annall"


def test_hash_suffix_is_the_sha256_of_the_non_default_options() -> None:
    import hashlib
    import json

    cfg = RunConfig(HeadConfig("lowrank"), LossConfig(lambda_kl=1e-3), lr=3e-4, epochs=3)
    text = json.dumps({"epochs": 3, "lambda_kl": 1e-3, "lr": 3e-4}, sort_keys=True).replace(" ", "")
    assert cfg.tag() == "lowrank-r16-x" + hashlib.sha256(text.encode()).hexdigest()[:8]
    assert RunConfig(HeadConfig("lowrank"), LossConfig(lambda_kl=1e-3)).tag() != cfg.tag()


@pytest.mark.parametrize("method", ["deterministic", "diagonal", "lowrank", "single-basis"])
def test_paper_tags_are_the_head_tags(method: str) -> None:
    assert RunConfig(HeadConfig(method)).tag() == HeadConfig(method).tag()


def test_deterministic_ignores_options_it_does_not_use() -> None:
    """No samples, no variance: the objective, k and the KL weight do not change the model."""
    det = HeadConfig("deterministic")
    loss = LossConfig(samples=6, antithetic=True, mc_loss="logsumexp", lambda_kl=1.0)
    assert RunConfig(det, loss).tag() == "deterministic"
    assert RunConfig(det, LossConfig(lambda_dice=0.5)).tag() != "deterministic"
    assert RunConfig(det, annotators="all").tag() == "deterministic-annall"


def test_single_basis_partitions_count_where_they_are_used() -> None:
    block = HeadConfig("single-basis", noise="block", partitions=2)
    assert block.tag() == "single-basis-r16-p2-block"
    assert HeadConfig("single-basis", noise="block").tag() == "single-basis-r16-block"
    # with voxel noise the partition is unused: the same model, the same tag
    assert HeadConfig("single-basis", partitions=2).tag() == "single-basis-r16"


def test_unknown_annotator_choice() -> None:
    with pytest.raises(UnknownNameError, match="annotator choice"):
        RunConfig(HeadConfig("mob"), annotators="2")


def test_freeze_backbone_is_part_of_the_run_identity() -> None:

    for method in ("diagonal", "lowrank", "single-basis", "mob"):
        head = HeadConfig(method)
        frozen = RunConfig(head, freeze_backbone=True)
        assert frozen.tag() == head.tag() + "-frozen"
        assert RunConfig(head).tag() == head.tag()
    both = RunConfig(
        HeadConfig("mob"), LossConfig(samples=8), annotators="all", lr=1e-3, freeze_backbone=True
    )
    assert both.tag().startswith("mob-b3-r16-k8-annall-frozen-x")
    # the deterministic head is the backbone's own layer: nothing would train
    with pytest.raises(ConfigurationError, match="nothing to train"):
        RunConfig(HeadConfig("deterministic"), freeze_backbone=True)


def test_decoder_dropout_is_part_of_the_run_identity() -> None:
    head = HeadConfig("deterministic")
    assert RunConfig(head, decoder_dropout=0.1).tag() == "deterministic-mcd0.1"
    assert RunConfig(HeadConfig("diagonal"), decoder_dropout=0.25, freeze_backbone=True).tag() == (
        "diagonal-frozen-mcd0.25"
    )
    with pytest.raises(ConfigurationError, match="dropout-rate"):
        RunConfig(head, decoder_dropout=1.0)
