"""Two processes never run the same stage at once: the second says who holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.errors import BusyError
from mobseg.manifest import Manifest
from mobseg.stages import prepare
from mobseg.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]
KEY = "finetune/pancreas/mob-b3-r16/seed0"


def _hold_in_a_thread(manifest: Manifest, key: str):
    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with manifest.running("finetune", key):
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(30)
    return thread, leave


def test_the_second_run_of_a_stage_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path / "manifest.json")
    thread, leave = _hold_in_a_thread(manifest, KEY)
    try:
        with pytest.raises(BusyError) as info:
            with Manifest(tmp_path / "manifest.json").running("finetune", KEY):
                pytest.fail("the block must not run")
        assert f"process {os.getpid()} on" in str(info.value)
        rec = manifest.get(KEY)
        assert rec is not None and rec.attempts == 1 and rec.status == "running"
        # another stage runs meanwhile
        with manifest.running("finetune", KEY.replace("seed0", "seed1")):
            pass
    finally:
        leave.set()
        thread.join()
    rec = manifest.get(KEY)
    assert rec is not None and rec.status == "done" and rec.attempts == 1
    with manifest.running("finetune", KEY):  # released: a later run may go
        pass
    assert manifest.get(KEY).attempts == 2


def test_a_lock_held_by_another_process(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, time
        from mobseg.manifest import Manifest
        with Manifest({str(tmp_path / "manifest.json")!r}).running("finetune", {KEY!r}):
            print("holding", flush=True)
            sys.stdin.readline()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"holding"
        with pytest.raises(BusyError, match=rf"process {proc.pid} on .*Wait for it"):
            with Manifest(tmp_path / "manifest.json").running("finetune", KEY):
                pass
    finally:
        proc.communicate(b"\n", timeout=60)
    assert Manifest(tmp_path / "manifest.json").get(KEY).status == "done"


def test_two_prepares_of_one_organ(tmp_path: Path) -> None:
    ws = Workspace(tmp_path).ensure()
    params = prepare.PrepareParams(organ="pancreas", source="phantom", num_cases=6, size=16, seed=0)
    manifest = Manifest(ws.manifest_path)
    with manifest.stage_lock("prepare/pancreas"):  # the first prepare is running
        result = CliRunner().invoke(
            app,
            ["--workdir", str(tmp_path), "prepare", "--organ", "pancreas", "--source", "phantom"],
        )
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "is being run by process" in result.output
    assert manifest.get("prepare/pancreas") is None  # the refused run left no record
    assert prepare.run(ws, params).status == "done"
