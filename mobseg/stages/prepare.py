"""Stage ``prepare``: source data -> filtered cases, splits, nnU-Net raw dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mobseg.errors import NotImplementedYetError
from mobseg.manifest import StageRecord
from mobseg.workspace import Workspace


@dataclass(frozen=True)
class PrepareParams:
    """Options of ``mobseg prepare`` (SPEC section 7).

    Attributes:
        organ: Target structure (one of the 117).
        source: ``zenodo``, ``phantom``, an extracted dataset folder or a zip file.
        subset: ``full`` (1228 scans) or ``small`` (102 scans), zenodo only.
        seed: Seed of the splits (and of the phantom).
        test_fraction: Share of visible cases held out for testing.
        val_fraction: Share of the rest used for validation.
        min_voxels: A case is visible when its mask has at least this many voxels.
        spacing: Optional isotropic resampling (mm) of images and masks.
        num_cases: Number of phantom cases.
        size: Edge length in voxels of the phantom volumes.
        annotators: Annotator masks per phantom case.
        on_error: ``skip`` (record the bad case and go on) or ``fail``.
    """

    organ: str
    source: str = "zenodo"
    subset: str = "full"
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    min_voxels: int = 1
    spacing: float | None = None
    num_cases: int = 40
    size: int = 64
    annotators: int = 3
    on_error: str = "skip"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(ws: Workspace, params: PrepareParams, force: bool = False) -> StageRecord:
    """Prepare ``params.organ`` from ``params.source`` and record it in the manifest."""
    raise NotImplementedYetError("mobseg prepare")
