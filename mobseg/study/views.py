"""Rich tables of a study's progress, shared by ``study --dry-run``, ``status`` and ``demo``.

The functions build :class:`rich.table.Table` objects; the CLI prints them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from rich.table import Table

from mobseg.core.config import METHOD_NAMES, HeadConfig
from mobseg.manifest import StageRecord
from mobseg.study.executors import Outcome
from mobseg.study.grid import BACKBONE_TAG, Plan
from mobseg.study.runner import StudyResult

_COLOURS = {"done": "green", "running": "yellow", "failed": "red", "pending": "white"}
_SYMBOLS = {"done": "done", "running": "running", "failed": "failed", "pending": "pending"}


def stage_table(plan: Plan, records: Mapping[str, StageRecord], title: str) -> Table:
    """Per stage: jobs in the plan, done, running, failed, remaining (= total - done)."""
    table = Table(title=title, title_justify="left")
    table.add_column("stage")
    for col in ("total", "done", "running", "failed", "remaining"):
        table.add_column(col, justify="right")
    totals = dict.fromkeys(("total", "done", "running", "failed", "remaining"), 0)
    for row in plan.stage_counts(records):
        for k in totals:
            totals[k] += row[k]
        table.add_row(
            row["stage"],
            str(row["total"]),
            f"[green]{row['done']}[/]",
            f"[yellow]{row['running']}[/]" if row["running"] else "0",
            f"[red]{row['failed']}[/]" if row["failed"] else "0",
            f"[bold]{row['remaining']}[/]" if row["remaining"] else "0",
        )
    table.add_section()
    table.add_row("all", *(str(totals[k]) for k in totals))
    return table


def _tag_order(tag: str) -> tuple[int, int, int, str]:
    """Backbone, then the five methods in the paper's order, each method's own tag first,
    then its other runs (the ablation by M, loss, noise and training variants by tag)."""
    if tag == BACKBONE_TAG:
        return (0, 0, 0, tag)
    for i, method in enumerate(METHOD_NAMES, start=1):
        if tag == HeadConfig(method).tag():
            return (i, 0, 0, tag)
    for i, method in enumerate(METHOD_NAMES, start=1):
        if tag.startswith(method + "-") or tag == method:
            m = re.match(r"mob-b(\d+)", tag)
            return (i, 1, int(m.group(1)) if m is not None else 0, tag)
    return (len(METHOD_NAMES) + 1, 0, 0, tag)


def grid_table(plan: Plan, records: Mapping[str, StageRecord], title: str) -> Table | None:
    """Runs per method (rows) x organ (columns): done / running / failed / pending seeds.

    A run is (organ, tag, seed) through finetune, predict and evaluate
    (:meth:`Plan.run_cells`). Returns None when the plan has no runs.
    """
    cells = plan.run_cells(records)
    if not cells:
        return None
    organs = list(dict.fromkeys(o for o, _t in cells))
    tags = sorted({t for _o, t in cells}, key=_tag_order)
    table = Table(title=title, title_justify="left")
    table.add_column("run")
    for organ in organs:
        table.add_column(organ, justify="left")
    for tag in tags:
        row = [tag]
        for organ in organs:
            c = cells.get((organ, tag))
            if c is None:
                row.append("")
                continue
            total = sum(c.values())
            parts = [
                f"[{_COLOURS[s]}]{c[s]} {_SYMBOLS[s]}[/]"
                for s in ("done", "running", "failed", "pending")
                if c[s]
            ]
            mark = " ✓" if c["done"] == total else ""
            row.append(", ".join(parts) + mark)
        table.add_row(*row)
    return table


def failure_table(result: StudyResult) -> Table | None:
    """The failed jobs with their error and log, and how many jobs each one held back."""
    if not result.failed and not result.skipped:
        return None
    held: dict[str, int] = {}
    for root in result.skipped.values():
        held[root] = held.get(root, 0) + 1
    table = Table(title="Failed jobs", title_justify="left")
    table.add_column("job", overflow="fold")
    table.add_column("error", overflow="fold")
    table.add_column("skipped after it", justify="right")
    table.add_column("log", overflow="fold")
    for o in result.failed:
        table.add_row(o.key, o.error or "", str(held.get(o.key, 0)), o.log or "")
    return table


def outcome_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """``key: error`` lines of failed outcomes (plain text)."""
    return [f"{o.key}: {o.error}" for o in outcomes if not o.ok]
