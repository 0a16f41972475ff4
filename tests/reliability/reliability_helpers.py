"""Helpers of the fault-injection tests (tests/reliability)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*args: str) -> bool:
    try:
        done = subprocess.run(list(args), capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@contextmanager
def small_tmpfs(folder: Path, size: str = "1m") -> Iterator[Path]:
    """A real full disk: a tmpfs of ``size`` on ``folder`` (skips where mounting fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        _run("umount", "-l", str(folder))


@contextmanager
def read_only_view(source: Path, view: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``view`` (a read-only bind mount; skips where impossible)."""
    view.mkdir(parents=True, exist_ok=True)
    if not _run("mount", "--bind", str(source), str(view)):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if not _run("mount", "-o", "remount,bind,ro", str(view)):
            pytest.skip("cannot remount read-only here")
        yield view
    finally:
        _run("umount", "-l", str(view))
