"""The CLI's contract: exit codes 0/1/2, one-line errors, help, workdir resolution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.manifest import Manifest, StageRecord

runner = CliRunner()
COMMANDS = ("prepare", "pretrain", "finetune", "predict", "evaluate", "report", "status")


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_usage_error_exits_2() -> None:
    result = runner.invoke(app, ["prepare", "--organ", "pancreas", "--no-such-option"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code == 2


def test_user_error_exits_1_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--workdir", str(tmp_path), "pretrain", "--organ", "pancreaz"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert "Unknown organ 'pancreaz'" in lines[0] and "'pancreas'" in lines[0]
    assert "Traceback" not in result.output


def test_bad_option_value_is_a_user_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["--workdir", str(tmp_path), "finetune", "--organ", "pancreas", "--method", "mobb"]
    )
    assert result.exit_code == 1
    assert "Unknown method 'mobb'" in result.output and "'mob'" in result.output
    result = runner.invoke(
        app,
        [
            "--workdir",
            str(tmp_path),
            "finetune",
            "--organ",
            "liver",
            "--method",
            "diagonal",
            "--noise",
            "block",
        ],
    )
    assert result.exit_code == 1
    assert "--noise block applies to single-basis and mob only" in result.output


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["--debug", "--workdir", str(tmp_path), "pretrain", "--organ", "pancreaz"]
    )
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "UnknownNameError"


def test_status_renders_the_manifest(tmp_path: Path) -> None:
    empty = runner.invoke(app, ["--workdir", str(tmp_path), "status"])
    assert empty.exit_code == 0
    assert "No stage has run" in empty.output
    m = Manifest(tmp_path / "manifest.json")
    m.put(StageRecord(stage="prepare", key="prepare/pancreas", status="done"))
    m.put(StageRecord(stage="pretrain", key="pretrain/pancreas", status="failed", error="oom"))
    summary = runner.invoke(app, ["--workdir", str(tmp_path), "status"], env={"COLUMNS": "200"})
    assert summary.exit_code == 0
    cells = [[c.strip() for c in ln.strip("│").split("│")] for ln in summary.output.splitlines()]
    rows = {c[0]: c[1:] for c in cells if c[0] in ("prepare", "pretrain")}
    # stage: total, done, running, failed, remaining
    assert rows["prepare"][:4] == ["1", "1", "0", "0"]
    assert rows["pretrain"][:4] == ["1", "0", "0", "1"]
    result = runner.invoke(
        app, ["--workdir", str(tmp_path), "status", "--records"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert any("prepare/pancreas" in ln and "done" in ln for ln in lines)
    assert any("pretrain/pancreas" in ln and "failed" in ln and "oom" in ln for ln in lines)


def test_workdir_from_environment(tmp_path: Path) -> None:
    Manifest(tmp_path / "manifest.json").put(
        StageRecord(stage="report", key="report", status="done")
    )
    result = runner.invoke(
        app, ["status", "--records"], env={"MOBSEG_WORKDIR": str(tmp_path), "COLUMNS": "200"}
    )
    assert result.exit_code == 0
    assert "report" in result.output


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from mobseg.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0\n"
        "print('torch' in sys.modules, 'nnunetv2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
