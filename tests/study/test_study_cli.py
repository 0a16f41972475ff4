"""``mobseg study``, ``mobseg demo`` and ``mobseg status`` through the CLI (fake stages)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import study_fakes as fakes
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.manifest import Manifest
from mobseg.study import grid
from mobseg.workspace import Workspace

runner = CliRunner()


WIDE = {"COLUMNS": "200"}  # Rich wraps at 80 columns otherwise


def invoke(workdir: Path, *args: str):  # noqa: ANN201 - click Result
    return runner.invoke(app, ["--workdir", str(workdir), *args], env=WIDE)


def row(output: str, stage: str) -> list[int]:
    """Numbers of the stage table's row ``stage``: total, done, running, failed, remaining."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if cells and cells[0] == stage:
            return [int(c) for c in cells[1:]]
    raise AssertionError(f"no row {stage!r} in:\n{output}")


@pytest.fixture
def fake_expand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's plans run the fake stages (in this process: the sequential executor)."""
    real = grid.expand
    monkeypatch.setattr(grid, "expand", lambda spec: fakes.wrap(real(spec)))


def test_paper_dry_run_counts(tmp_path: Path) -> None:
    result = invoke(tmp_path, "study", "--dry-run")
    assert result.exit_code == 0, result.output
    assert row(result.output, "prepare") == [4, 0, 0, 0, 4]
    assert row(result.output, "pretrain") == [4, 0, 0, 0, 4]
    assert row(result.output, "finetune") == [4 * 5 * 5 + 4 * 5, 0, 0, 0, 120]
    assert row(result.output, "predict") == [124, 0, 0, 0, 124]
    assert row(result.output, "evaluate") == [124, 0, 0, 0, 124]
    assert row(result.output, "report") == [1, 0, 0, 0, 1]
    assert row(result.output, "all") == [377, 0, 0, 0, 377]
    assert "mob-b5-r16" in result.output
    assert not (tmp_path / "manifest.json").exists()
    assert not (tmp_path / "study" / "spec.json").exists()  # a dry run changes nothing


def test_truth_grid_dry_run_counts(tmp_path: Path) -> None:
    result = invoke(tmp_path, "study", "--grid", "truth", "--preset", "cpu", "--dry-run")
    assert result.exit_code == 0, result.output
    assert row(result.output, "finetune") == [78, 0, 0, 0, 78]  # 26 configurations x 3 seeds
    assert row(result.output, "predict") == [79, 0, 0, 0, 79]
    assert row(result.output, "all") == [239, 0, 0, 0, 239]
    for tag in ("deterministic-annall", "mob-b3-r16-block-lse-annall", "diagonal-lse"):
        assert f" {tag} " in result.output
    # shrunk: two methods, voxel noise, one seed, all runs at lr 3e-3
    result = invoke(
        tmp_path,
        "study",
        "--grid",
        "truth",
        "--preset",
        "cpu",
        "--methods",
        "deterministic,mob",
        "--noises",
        "voxel",
        "--seeds",
        "1",
        "--lr",
        "3e-3",
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert row(result.output, "finetune") == [6, 0, 0, 0, 6]
    total = 1 + 1 + 6 + 7 + 7 + 1  # prepare, pretrain, finetune, predict, evaluate, report
    assert row(result.output, "all") == [total, 0, 0, 0, total]
    assert "mob-b3-r16-lse-annall-x" in result.output
    assert " mob-b3-r16-lse-annall " not in result.output  # the lr is part of every tag


def test_dry_run_of_a_small_grid_lists_the_remaining_keys(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "--workdir",
            str(tmp_path),
            "--verbose",
            "study",
            "--dry-run",
            "--organs",
            "duodenum",
            "--methods",
            "mob,lowrank",
            "--seeds",
            "2",
            "--bases-ablation",
            "none",
            "--no-backbone",
        ],
        env=WIDE,
    )
    assert result.exit_code == 0, result.output
    assert row(result.output, "finetune") == [4, 0, 0, 0, 4]
    assert row(result.output, "predict") == [4, 0, 0, 0, 4]
    assert "finetune/duodenum/lowrank-r16/seed1" in result.output
    assert "after finetune/duodenum/lowrank-r16/seed1" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bases-ablation", "5..1"], "empty"),
        (["--executor", "nope"], "Unknown executor"),
        (["--organs", "pancraes"], "pancreas"),
        (["--methods", "mob,diag"], "diagonal"),
        (["--seeds", "0"], "--seeds"),
        (["--slurm-arg", "account"], "KEY=VALUE"),
        (["--save-samples", "-1"], "--save-samples must be >= 0"),
        (["--num-gpus", "0"], "--num-gpus"),
        (["--grid", "truth", "--source", "zenodo"], "--grid truth needs --source phantom"),
        (["--grid", "truht"], "Unknown grid"),
        (["--objectives", "mean,lse"], "logsumexp"),
        (["--annotators", "1"], "annotator choice"),
        (["--lr", "0"], "--lr must be > 0"),
    ],
)
def test_user_errors_exit_1_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke(tmp_path, "study", *args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("fake_expand")
def test_status_counts_outdated_runs_as_remaining(tmp_path: Path) -> None:
    args = ["study", "--organs", "pancreas", "--methods", "mob", "--seeds", "1"]
    args += ["--bases-ablation", "", "--source", "phantom", "--preset", "cpu"]
    assert invoke(tmp_path, *args).exit_code == 0
    assert row(invoke(tmp_path, "status").output, "all") == [8, 8, 0, 0, 0]
    # the backbone is retrained outside the study: everything built on it is outdated
    plan = fakes.wrap(grid.expand(grid.load_spec(tmp_path)))
    fakes.run(Workspace(tmp_path), plan["pretrain/pancreas"].params, force=True)
    status = invoke(tmp_path, "status")
    assert row(status.output, "pretrain") == [1, 1, 0, 0, 0]
    assert row(status.output, "finetune") == [1, 0, 0, 0, 1]
    assert row(status.output, "predict") == [2, 0, 0, 0, 2]
    assert "5 outdated" in status.output  # finetune, 2 predict, 2 evaluate (the report has none)
    records = invoke(tmp_path, "status", "--records")
    text = " ".join(records.output.split())
    assert (
        "finetune/pancreas/mob-b3-r16/seed0 (outdated): pretrain/pancreas ran again since" in text
    )
    line = next(ln for ln in records.output.splitlines() if "finetune/pancreas/mob" in ln)
    assert line.split()[1] == "outdated"
    again = invoke(tmp_path, *args)
    assert (
        again.exit_code == 0 and "8 jobs: 3 already done, 6 ran" in again.output
    )  # the report is refreshed


@pytest.mark.usefixtures("fake_expand")
def test_study_runs_reports_and_status_shows_the_grid(tmp_path: Path) -> None:
    args = ["study", "--organs", "pancreas", "--methods", "mob", "--seeds", "2"]
    args += ["--bases-ablation", "2", "--source", "phantom", "--preset", "cpu"]
    result = invoke(tmp_path, *args)
    assert result.exit_code == 0, result.output
    assert "17 jobs: 0 already done, 17 ran (17 ok, 0 failed)" in result.output
    assert grid.load_spec(tmp_path).ablation_bases == (2,)

    status = invoke(tmp_path, "status")
    assert status.exit_code == 0, status.output
    assert row(status.output, "all") == [17, 17, 0, 0, 0]  # 1+1+4+5+5+1
    lines = {ln.split("│")[1].strip(): ln for ln in status.output.splitlines() if "│" in ln}
    assert "2 done" in lines["mob-b3-r16"] and "2 done" in lines["mob-b2-r16"]
    assert "1 done" in lines["backbone"]

    again = invoke(tmp_path, *args)
    assert again.exit_code == 0
    assert "17 jobs: 17 already done, 0 ran" in again.output

    records = invoke(tmp_path, "status", "--records")
    assert "finetune/pancreas/mob-b2-r16/seed1" in records.output
    assert "tries" in records.output


@pytest.mark.usefixtures("fake_expand")
def test_a_failed_job_exits_1_and_is_listed(tmp_path: Path) -> None:
    bad = "finetune/pancreas/mob-b3-r16/seed0"
    fakes.control(tmp_path, fail=[bad])
    args = ["study", "--organs", "pancreas", "--methods", "mob", "--seeds", "2"]
    result = invoke(tmp_path, *args, "--bases-ablation", "none")
    assert result.exit_code == 1
    assert "Failed jobs" in result.output
    assert f"fake failure of {bad}" in result.output
    assert "1 job(s) failed, 2 were skipped" in result.output
    status = invoke(tmp_path, "status")
    line = next(ln for ln in status.output.splitlines() if "mob-b3-r16" in ln)
    assert "1 done" in line and "1 failed" in line
    assert "1 failed" in status.output.splitlines()[-1]


@pytest.mark.usefixtures("fake_expand")
def test_an_interrupted_study_exits_130_and_resumes(tmp_path: Path) -> None:
    stop = "predict/pancreas/backbone/seed0"
    fakes.control(tmp_path, interrupt=[stop])
    args = ["study", "--organs", "pancreas", "--methods", "diagonal", "--seeds", "1"]
    args += ["--bases-ablation", "none"]
    first = invoke(tmp_path, *args)
    assert first.exit_code == 130
    assert "Interrupted" in first.output
    status = invoke(tmp_path, "status")
    line = next(ln for ln in status.output.splitlines() if "backbone" in ln)
    assert "1 running" in line
    done_before = [k for k in fakes.calls(tmp_path) if k != stop]
    fakes.control(tmp_path)
    second = invoke(tmp_path, *args)
    assert second.exit_code == 0, second.output
    assert f"{len(done_before)} already done" in second.output
    assert Manifest(tmp_path / "manifest.json").get(stop).attempts == 2


def test_status_of_an_empty_and_of_a_hand_made_workdir(tmp_path: Path) -> None:
    empty = invoke(tmp_path, "status")
    assert empty.exit_code == 0 and "No stage has run" in empty.output
    m = Manifest(tmp_path / "manifest.json")
    for key in ("prepare/pancreas", "finetune/pancreas/diagonal/seed0"):
        m.start(key.split("/")[0], key)
        m.finish(key)
    m.start("predict", "predict/pancreas/diagonal/seed0")
    result = invoke(tmp_path, "status")
    assert result.exit_code == 0, result.output
    assert "no study started here" in result.output
    assert row(result.output, "finetune") == [1, 1, 0, 0, 0]
    assert row(result.output, "predict") == [1, 0, 1, 0, 1]
    line = next(ln for ln in result.output.splitlines() if "│ diagonal" in ln)
    assert "1 running" in line


def test_demo_dry_run_with_and_without_the_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, totalseg_example: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ../shared/data/totalseg_example from here
    work = tmp_path / "work"
    result = invoke(work, "demo", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "skips the prediction on a real CT" in result.output
    # five methods and the best configuration with its control, x 2 seeds
    assert row(result.output, "finetune") == [14, 0, 0, 0, 14]
    assert row(result.output, "predict") == [15, 0, 0, 0, 15]
    assert row(result.output, "evaluate") == [15, 0, 0, 0, 15]
    best, control = _demo_tags()
    assert f" {best} " in result.output and f" {control} " in result.output

    with_ct = invoke(work, "demo", "--dry-run", "--example", str(totalseg_example))
    assert with_ct.exit_code == 0, with_ct.output
    assert str(totalseg_example / "s0000" / "ct.nii.gz") in with_ct.output
    assert row(with_ct.output, "predict") == [16, 0, 0, 0, 16]

    missing = invoke(work, "demo", "--dry-run", "--example", str(tmp_path / "nothing"))
    assert missing.exit_code == 1
    assert "No CT found" in missing.output


@pytest.mark.usefixtures("fake_expand")
def test_demo_runs_and_prints_the_report_path(tmp_path: Path, totalseg_example: Path) -> None:
    result = invoke(tmp_path, "demo", "--example", str(totalseg_example), "--seeds", "1")
    assert result.exit_code == 0, result.output
    assert "Prediction of the real CT" in result.output
    assert str(tmp_path / "example" / "s0000") in result.output
    assert re.search(r"Report:\s+" + re.escape(str(tmp_path / "report")), result.output)
    spec = grid.load_spec(tmp_path)
    assert spec.preset == "cpu" and spec.source == "phantom" and spec.seeds == 1
    assert "predict/pancreas/mob-b3-r16/seed0/s0000" in fakes.calls(tmp_path)
    best, control = _demo_tags()
    assert f"finetune/pancreas/{best}/seed0" in fakes.calls(tmp_path)
    assert f"finetune/pancreas/{control}/seed0" in fakes.calls(tmp_path)
    # the closing comparison: the paper's mob, the best configuration and its control
    assert "the best configuration beside the paper's" in result.output
    for tag in ("mob-b3-r16", best, control):
        assert tag in result.output


def _demo_tags() -> tuple[str, str]:
    """Tags of the demo's best configuration and its control, as the finetune stage names them."""
    from mobseg.core.config import HeadConfig, LossConfig
    from mobseg.stages.finetune import FinetuneParams, run_tag
    from mobseg.study.demo import DEMO_BEST

    best = FinetuneParams(
        "pancreas",
        head=HeadConfig(DEMO_BEST.method),
        loss=LossConfig(mc_loss=DEMO_BEST.mc_loss),
        lr=DEMO_BEST.lr,
        annotators=DEMO_BEST.annotators,
    )
    control = FinetuneParams(
        "pancreas",
        head=HeadConfig("deterministic"),
        lr=DEMO_BEST.lr,
        annotators=DEMO_BEST.annotators,
    )
    return run_tag(best, "cpu"), run_tag(control, "cpu")


@pytest.mark.parametrize("name", ["study", "demo", "status"])
def test_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"], env=WIDE)
    assert result.exit_code == 0
    assert "Usage" in result.output
    top = runner.invoke(app, ["--help"], env=WIDE)
    assert name in top.output


def test_a_second_study_on_the_same_workdir_is_refused(tmp_path: Path) -> None:
    from filelock import FileLock

    (tmp_path / "study").mkdir()
    first = grid.StudySpec(organs=("duodenum",), ablation_bases=())
    grid.save_spec(tmp_path, first)
    with FileLock(str(tmp_path / "study" / "study.lock")):
        result = invoke(tmp_path, "study", "--organs", "pancreas", "--bases-ablation", "none")
    assert result.exit_code == 1
    assert "Another mobseg study is running" in result.output
    assert grid.load_spec(tmp_path) == first  # the running study's grid is kept for status
