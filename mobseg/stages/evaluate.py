"""Stage ``evaluate``: per-case and pooled metrics (SPEC section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobseg.core.config import HeadConfig
from mobseg.errors import NotImplementedYetError
from mobseg.manifest import StageRecord
from mobseg.workspace import Workspace


@dataclass(frozen=True)
class EvaluateParams:
    """Options of ``mobseg evaluate``.

    Study mode evaluates predicted runs of the manifest (``organ``, optionally
    narrowed by ``head`` and ``seed``). Standalone mode (``pred``, ``gt``,
    ``out``) scores any folder of predictions against a folder of masks.

    Attributes:
        organ: Target structure (study mode).
        head: Only this method's runs (study mode); None = all predicted runs.
        seed: Only this seed (study mode); None = all seeds.
        pred: Folder with ``<case>_prob.nii.gz`` (standalone mode).
        gt: Folder with ``<case>.nii.gz`` 0/1 masks (standalone mode).
        out: CSV file to write (standalone mode).
        region: ``all`` voxels or ``roi`` (bounding box of G or S plus a margin).
        margin: ROI margin in voxels.
    """

    organ: str | None = None
    head: HeadConfig | None = None
    seed: int | None = None
    pred: Path | None = None
    gt: Path | None = None
    out: Path | None = None
    region: str = "all"
    margin: int = 10

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["head"] = None if self.head is None else self.head.to_dict()
        for k in ("pred", "gt", "out"):
            d[k] = None if d[k] is None else str(d[k])
        return d


def run(ws: Workspace, params: EvaluateParams, force: bool = False) -> list[StageRecord]:
    """Evaluate; returns the records written (empty in standalone mode)."""
    raise NotImplementedYetError("mobseg evaluate")
