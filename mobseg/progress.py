"""Progress bars for long work, shared by every stage.

Stages call :func:`progress_bar` or :func:`track`; the CLI decides whether bars
are shown (``--quiet`` turns them off). Nothing here prints otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

_state = {"enabled": True}
console = Console(stderr=True)


def set_enabled(enabled: bool) -> None:
    """Show (True) or hide (False) every progress bar of this process."""
    _state["enabled"] = enabled


def enabled() -> bool:
    return _state["enabled"]


@contextmanager
def progress_bar(description: str, total: float | None) -> Iterator[Callable[..., None]]:
    """A bar for ``total`` steps; yields ``advance(n=1, **fields)``.

    Extra fields (for example ``loss=0.42``) are shown after the bar.
    """
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console, disable=not enabled(), transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: float = 1, **fields: Any) -> None:
            info = "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
            )
            prog.update(task, advance=n, info=info)

        yield advance


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(description, total) as advance:
        for item in items:
            yield item
            advance()
