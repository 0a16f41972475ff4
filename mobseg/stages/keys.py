"""Manifest keys of the stages, and the command that produces each one.

A key names one stage run: ``prepare/pancreas``, ``pretrain/pancreas``,
``finetune/pancreas/mob-b3-r16/seed0``, ``predict/...``, ``evaluate/...``,
``report``. The commands are used in "run ... first" messages.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mobseg.core.config import HeadConfig

REPORT_KEY = "report"

#: The head's CLI options, in the order the hints write them.
_HEAD_OPTIONS = ("bases", "rank", "partitions", "noise", "mixing")


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


def head_options(head: HeadConfig | None) -> str:
    """The head's options that differ from the defaults, as the CLI spells them.

    Only options that the method uses (those that change its tag) appear, so
    ``mob`` with ``--bases 5`` gives ``" --bases 5"`` and ``diagonal`` gives
    ``""`` whatever the other fields hold.
    """
    if head is None:
        return ""
    base = HeadConfig(method=head.method, noise=head.noise)
    words = [f" --noise {head.noise}"] if head.noise != HeadConfig(method=head.method).noise else []
    for name in _HEAD_OPTIONS:
        value = getattr(head, name)
        if name != "noise" and replace(base, **{name: value}).tag() != base.tag():
            words.append(f" --{name} {value}")
    return "".join(words)


def finetune_command(organ: str, method: str, seed: int, head: HeadConfig | None = None) -> str:
    """The command that fine-tunes the run, with the head options the user gave."""
    return f"mobseg finetune --organ {organ} --method {method}{head_options(head)} --seed {seed}"


def predict_command(organ: str, method: str, seed: int, head: HeadConfig | None = None) -> str:
    """The command that predicts with the run, with the head options the user gave."""
    return f"mobseg predict --organ {organ} --method {method}{head_options(head)} --seed {seed}"
