"""Stage ``finetune``: stochastic heads on the pretrained backbone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mobseg.core.config import HeadConfig, LossConfig
from mobseg.errors import NotImplementedYetError
from mobseg.manifest import StageRecord
from mobseg.workspace import Workspace


@dataclass(frozen=True)
class FinetuneParams:
    """Options of ``mobseg finetune``.

    Attributes:
        organ: Target structure, pretrained before.
        head: The method and its hyper-parameters.
        loss: Samples per step and loss weights.
        seed: Seed of the run (torch, numpy, random, data loaders).
        preset: ``paper`` or ``cpu``.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        epochs: Override the preset's epochs (paper: 20).
        iterations: Override the preset's iterations per epoch (paper: 250).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    organ: str
    head: HeadConfig = field(default_factory=lambda: HeadConfig("mob"))
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    preset: str = "paper"
    device: str = "auto"
    epochs: int | None = None
    iterations: int | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-4

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["head"], d["loss"] = self.head.to_dict(), self.loss.to_dict()
        return d


def run(ws: Workspace, params: FinetuneParams, force: bool = False) -> StageRecord:
    """Fine-tune the backbone of ``params.organ`` with the head ``params.head``."""
    raise NotImplementedYetError("mobseg finetune")
