"""Stage ``predict``: sliding-window Monte-Carlo inference (SPEC section 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobseg.core.config import HeadConfig
from mobseg.errors import NotImplementedYetError
from mobseg.manifest import StageRecord
from mobseg.workspace import Workspace


@dataclass(frozen=True)
class PredictParams:
    """Options of ``mobseg predict``.

    Attributes:
        organ: Target structure.
        head: Identifies the fine-tuned run (method and hyper-parameters).
        seed: Seed of the fine-tuned run.
        input: A CT file or a folder of CTs; None = the organ's test split.
        samples: k, samples of the logits per tile.
        tta: Mirroring test-time augmentation (mirrored passes add samples).
        out: Output folder; None = the workdir's predictions folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
    """

    organ: str
    head: HeadConfig = field(default_factory=lambda: HeadConfig("mob"))
    seed: int = 0
    input: Path | None = None
    samples: int = 30
    tta: bool = False
    out: Path | None = None
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["head"] = self.head.to_dict()
        d["input"] = None if self.input is None else str(self.input)
        d["out"] = None if self.out is None else str(self.out)
        return d


def run(ws: Workspace, params: PredictParams, force: bool = False) -> StageRecord:
    """Predict probability, variance and entropy maps with the run of ``params``."""
    raise NotImplementedYetError("mobseg predict")
