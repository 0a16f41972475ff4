"""Manifest keys of the stages, and the command that produces each one.

A key names one stage run: ``prepare/pancreas``, ``pretrain/pancreas``,
``finetune/pancreas/mob-b3-r16/seed0``, ``predict/...``, ``evaluate/...``,
``report``. The commands are used in "run ... first" messages.
"""

from __future__ import annotations

from pathlib import Path

REPORT_KEY = "report"


def prepare_key(organ: str) -> str:
    return f"prepare/{organ}"


def pretrain_key(organ: str) -> str:
    return f"pretrain/{organ}"


def finetune_key(organ: str, tag: str, seed: int) -> str:
    return f"finetune/{organ}/{tag}/seed{seed}"


def predict_key(organ: str, tag: str, seed: int) -> str:
    return f"predict/{organ}/{tag}/seed{seed}"


def predict_split_key(organ: str, tag: str, seed: int, split: str = "test") -> str:
    """The predict key of a split: the test split's is :func:`predict_key`, others
    append ``/<split>`` (``predict/pancreas/mob-b3-r16/seed0/val``)."""
    key = predict_key(organ, tag, seed)
    return key if split == "test" else f"{key}/{split}"


def split_prediction_dir(test_dir: Path, split: str = "test") -> Path:
    """The prediction folder of a split: the test split's, or its ``<split>`` subfolder."""
    return test_dir if split == "test" else test_dir / split


def evaluate_key(organ: str, tag: str, seed: int) -> str:
    return f"evaluate/{organ}/{tag}/seed{seed}"


def prepare_command(organ: str) -> str:
    return f"mobseg prepare --organ {organ}"


def pretrain_command(organ: str) -> str:
    return f"mobseg pretrain --organ {organ}"


def finetune_command(organ: str, method: str, seed: int) -> str:
    return f"mobseg finetune --organ {organ} --method {method} --seed {seed}"


def predict_command(organ: str, method: str, seed: int) -> str:
    return f"mobseg predict --organ {organ} --method {method} --seed {seed}"
