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


def test_run_identity_options_reach_the_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finetune's loss and annotator options, predict's and evaluate's --run."""
    from mobseg.stages import evaluate, finetune, predict

    got: dict[str, object] = {}

    def keep(name: str, result: object = None):
        return lambda ws, p, force=False: (got.__setitem__(name, p), result)[1]

    monkeypatch.setattr(finetune, "run", keep("ft"))
    monkeypatch.setattr(predict, "run", keep("pr"))
    monkeypatch.setattr(evaluate, "run", keep("ev", []))
    base = ["--workdir", str(tmp_path)]
    args = ["finetune", "-o", "pancreas", "--mc-loss", "logsumexp", "--samples", "6"]
    args += ["--antithetic", "--annotators", "all", "--lr", "3e-4", "--lambda-kl", "1e-3"]
    assert runner.invoke(app, base + args).exit_code == 0
    ft = got["ft"]
    assert (ft.loss.mc_loss, ft.loss.samples, ft.loss.antithetic) == ("logsumexp", 6, True)
    assert (ft.annotators, ft.lr, ft.loss.lambda_kl) == ("all", 3e-4, 1e-3)
    args = ["predict", "-o", "pancreas", "--run", "mob-b3-r16-lse", "--inference-mixing", "hard"]
    assert runner.invoke(app, base + args).exit_code == 0
    assert (got["pr"].tag, got["pr"].inference_mixing) == ("mob-b3-r16-lse", "hard")
    args = ["evaluate", "-o", "pancreas", "--run", "mob-b3-r16-lse"]
    assert runner.invoke(app, base + args).exit_code == 0
    assert got["ev"].tag == "mob-b3-r16-lse"
    bad = runner.invoke(app, [*base, "finetune", "-o", "pancreas", "--annotators", "some"])
    assert bad.exit_code == 1 and "Unknown annotator choice 'some'" in bad.output
