"""Stage ``pretrain``: nnU-Net planning, preprocessing and backbone training."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mobseg.errors import NotImplementedYetError
from mobseg.manifest import StageRecord
from mobseg.workspace import Workspace

PRESETS: tuple[str, ...] = ("paper", "cpu")


@dataclass(frozen=True)
class PretrainParams:
    """Options of ``mobseg pretrain``.

    Attributes:
        organ: Target structure, prepared before.
        preset: ``paper`` (ResEncL plans, nnU-Net's default training) or
            ``cpu`` (a small plan that finishes in minutes on 2 cores).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        epochs: Override the preset's number of epochs.
        num_gpus: GPUs for nnU-Net's own DDP training.
    """

    organ: str
    preset: str = "paper"
    device: str = "auto"
    epochs: int | None = None
    num_gpus: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(ws: Workspace, params: PretrainParams, force: bool = False) -> StageRecord:
    """Plan, preprocess and train the deterministic backbone of ``params.organ``."""
    raise NotImplementedYetError("mobseg pretrain")
