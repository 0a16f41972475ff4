"""The smaller faults of issue 14: options checked always, meta.csv duplicates."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mobseg.core.config import HeadConfig, LossConfig
from mobseg.data.meta import parse_meta
from mobseg.errors import ConfigurationError, UnknownNameError
from mobseg.stages import evaluate, finetune, predict, pretrain
from mobseg.workspace import Workspace


def _runs(seed: int = 0, device: str = "cpu") -> dict:
    head = HeadConfig("mob")
    return {
        "finetune": lambda ws: finetune.run(
            ws,
            finetune.FinetuneParams(
                "pancreas", head=head, loss=LossConfig(), seed=seed, device=device
            ),
        ),
        "predict": lambda ws: predict.run(
            ws, predict.PredictParams("pancreas", head=head, seed=seed, device=device)
        ),
        "pretrain": lambda ws: pretrain.run(
            ws, pretrain.PretrainParams("pancreas", preset="micro", device=device)
        ),
        "evaluate": lambda ws: evaluate.run(ws, evaluate.EvaluateParams("pancreas", seed=seed)),
    }


@pytest.mark.parametrize("stage", ["finetune", "predict", "evaluate"])
def test_a_negative_seed_is_refused_by_every_stage(tmp_path: Path, stage: str) -> None:
    ws = Workspace(tmp_path).ensure()
    with pytest.raises(ConfigurationError, match="--seed must be >= 0, not -1"):
        _runs(seed=-1)[stage](ws)


@pytest.mark.parametrize("stage", ["finetune", "predict", "pretrain"])
def test_device_is_checked_before_anything_else(tmp_path: Path, stage: str) -> None:
    # before the manifest is read: a done stage cannot hide a typo in --device
    ws = Workspace(tmp_path).ensure()
    with pytest.raises(UnknownNameError, match="Unknown device 'cdua'"):
        _runs(device="cdua")[stage](ws)


def test_identical_duplicate_meta_rows_are_kept_once(caplog: pytest.LogCaptureFixture) -> None:
    head = "image_id;age;gender;institute;study_type;split;manufacturer;x;y;z;w"
    text = "\n".join(
        [
            head,
            "s0000;50;m;A;ct;train;;;;;",
            "s0001;60;f;B;ct;test;;;;;",
            "s0001;60;f;B;ct;test;;;;;",
            "s0002;70;m;A;ct;val;;;;;",
            "s0002;70;m;A;ct;train;;;;;",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="mobseg"):
        rows, problems = parse_meta(text.encode(), "meta.csv")
    assert [r.image_id for r in rows] == ["s0000", "s0001"]
    assert [(p.image_id, p.reason) for p in problems] == [("s0002", "duplicate_id")]
    assert "with different rows" in problems[0].message
    assert "s0001 2 times with identical rows (lines 3, 4); it is kept once" in caplog.text
