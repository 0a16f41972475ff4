"""Stage ``report``: the paper's tables and figures from the manifest's runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobseg.errors import NotImplementedYetError
from mobseg.manifest import StageRecord
from mobseg.workspace import Workspace


@dataclass(frozen=True)
class ReportParams:
    """Options of ``mobseg report``.

    Attributes:
        out: Output folder; None = ``<workdir>/report``.
        case: Case shown in the case panels; None = chosen automatically.
    """

    out: Path | None = None
    case: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"out": None if self.out is None else str(self.out), "case": self.case}


def run(ws: Workspace, params: ReportParams, force: bool = True) -> StageRecord:
    """Write tables, figures, report.md and report.html."""
    raise NotImplementedYetError("mobseg report")
