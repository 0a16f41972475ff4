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
COMMANDS = ("prepare", "pretrain", "adopt", "finetune", "predict", "evaluate", "report", "status")


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
    args = ["finetune", "--organ", "pancreas", "--mc-loss", "logsumexp", "--samples", "6"]
    args += ["--antithetic", "--annotators", "all", "--lr", "3e-4", "--lambda-kl", "1e-3"]
    assert runner.invoke(app, base + args).exit_code == 0
    ft = got["ft"]
    assert (ft.loss.mc_loss, ft.loss.samples, ft.loss.antithetic) == ("logsumexp", 6, True)
    assert (ft.annotators, ft.lr, ft.loss.lambda_kl) == ("all", 3e-4, 1e-3)
    args = [
        "predict",
        "--organ",
        "pancreas",
        "--run",
        "mob-b3-r16-lse",
        "--inference-mixing",
        "hard",
    ]
    assert runner.invoke(app, base + args).exit_code == 0
    assert (got["pr"].tag, got["pr"].inference_mixing) == ("mob-b3-r16-lse", "hard")
    args = ["evaluate", "--organ", "pancreas", "--run", "mob-b3-r16-lse"]
    assert runner.invoke(app, base + args).exit_code == 0
    assert got["ev"].tag == "mob-b3-r16-lse"
    bad = runner.invoke(app, [*base, "finetune", "--organ", "pancreas", "--annotators", "some"])
    assert bad.exit_code == 1 and "Unknown annotator choice 'some'" in bad.output


# CLI habits (issue 15, item 6) -------------------------------------------------------


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"mobseg {version('mobseg')}"


@pytest.mark.parametrize("flag", ["-q", "--quiet", "-v", "--verbose", "--debug"])
def test_global_flags_after_the_command(tmp_path: Path, flag: str) -> None:
    from mobseg.cli import state

    before = runner.invoke(app, [flag, "--workdir", str(tmp_path), "status"])
    seen_before = (state.verbosity, state.debug)
    after = runner.invoke(app, ["--workdir", str(tmp_path), "status", flag])
    assert before.exit_code == 0 and after.exit_code == 0, after.output
    assert (state.verbosity, state.debug) == seen_before
    expected = {"-q": (0, False), "--quiet": (0, False), "-v": (2, False)}
    expected |= {"--verbose": (2, False), "--debug": (1, True)}
    assert seen_before == expected[flag]


def test_debug_after_the_command_shows_the_exception(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["--workdir", str(tmp_path), "pretrain", "--organ", "pancreaz", "--debug"]
    )
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "UnknownNameError"


def test_global_flags_after_double_dash_are_not_moved(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--workdir", str(tmp_path), "status", "--", "-q"])
    assert result.exit_code == 2  # '-q' after '--' is an argument status does not take


def test_status_on_a_missing_workdir_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "there"
    for extra in ([], ["--records"]):
        result = runner.invoke(app, ["--workdir", str(missing), "status", *extra])
        assert result.exit_code == 0, result.output
        assert "No stage has run" in result.output
    assert not (tmp_path / "not").exists()


def test_error_hint_repeats_the_head_options(tmp_path: Path) -> None:
    Manifest(tmp_path / "manifest.json").put(
        StageRecord(stage="prepare", key="prepare/pancreas", status="done")
    )
    result = runner.invoke(
        app,
        ["--workdir", str(tmp_path), "evaluate", "--organ", "pancreas", "--method", "mob"]
        + ["--bases", "5", "--mixing", "hard", "--seed", "2"],
    )
    assert result.exit_code == 1
    assert (
        "Run `mobseg predict --organ pancreas --method mob --bases 5 --mixing hard --seed 2`"
        in (" ".join(result.output.split()))
    )


def test_head_options_name_only_what_the_method_uses() -> None:
    from mobseg.core.config import HeadConfig
    from mobseg.stages.keys import finetune_command, head_options

    assert head_options(HeadConfig("mob")) == ""
    assert head_options(HeadConfig("diagonal", bases=5, rank=4)) == ""  # unused by diagonal
    assert head_options(HeadConfig("lowrank", rank=8, bases=5)) == " --rank 8"
    sb = HeadConfig("single-basis", noise="block", partitions=2)
    assert head_options(sb) == " --noise block --partitions 2"
    assert head_options(HeadConfig("single-basis", partitions=2)) == ""  # voxel noise: unused
    assert (
        finetune_command("liver", "mob", 1, HeadConfig("mob", bases=5, rank=8))
        == "mobseg finetune --organ liver --method mob --bases 5 --rank 8 --seed 1"
    )


def test_predict_hint_names_the_finetune_with_its_head_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mobseg.nnunet.context as context

    monkeypatch.setattr(context, "pretrained_model", lambda manifest, organ: object())
    result = runner.invoke(
        app,
        ["--workdir", str(tmp_path), "predict", "--organ", "pancreas", "--bases", "5"],
    )
    assert result.exit_code == 1
    assert "`mobseg finetune --organ pancreas --method mob --bases 5 --seed 0`" in (
        " ".join(result.output.split())
    )


def test_demo_help_mentions_no_slurm() -> None:
    result = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--jobs" in result.output
    assert "slurm" not in result.output.lower()
    study = runner.invoke(app, ["study", "--help"], env={"COLUMNS": "200"})
    assert "slurm" in study.output.lower()  # the study's own help keeps them


def test_status_records_fit_80_columns(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "manifest.json")
    long_key = "finetune/pancreas/mob-b3-r16-lse-k8-anti-x1a2b3c4d/seed0"
    m.put(
        StageRecord(
            stage="finetune",
            key=long_key,
            status="failed",
            error="CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total)",
            started="2026-11-28T07:44:46+00:00",
            finished="2026-11-28T07:50:51+00:00",
        )
    )
    m.put(
        StageRecord(
            stage="prepare",
            key="prepare/pancreas",
            status="done",
            started="2026-11-28T06:00:00+00:00",
            finished="2026-11-28T09:12:30+00:00",
        )
    )
    result = runner.invoke(
        app, ["--workdir", str(tmp_path), "status", "--records"], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    row = next(ln for ln in lines if ln.lstrip().startswith("prepare/pancreas"))
    # a short key is never folded; the short columns keep their values whole
    assert row.split() == ["prepare/pancreas", "done", "1", "11-28", "06:00", "3h12m"]
    failed = next(ln for ln in lines if ln.lstrip().startswith("finetune/"))
    assert failed.split()[1:] == ["failed", "1", "11-28", "07:44", "6m05s"]
    # the error is printed whole under the table, after the full key
    text = " ".join(result.output.split())
    assert f"{long_key} (failed): CUDA out of memory." in text
    assert "(GPU 0; 23.65 GiB total)" in text


# predict like nnU-Net (issue 15, item 2) ---------------------------------------------


def test_predict_takes_a_model_and_o_is_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mobseg.stages import predict

    got: list = []
    monkeypatch.setattr(predict, "run", lambda ws, p, force=False: got.append(p))
    base = ["--workdir", str(tmp_path), "predict", "-i", "cts", "-o", "maps"]
    assert runner.invoke(app, [*base, "-m", "pancreas/mob-b2-r4-k3/seed3"]).exit_code == 0
    p = got[-1]
    assert (p.organ, p.tag, p.seed, p.backbone) == ("pancreas", "mob-b2-r4-k3", 3, False)
    assert (p.input, p.out) == (Path("cts"), Path("maps"))
    # a run folder, and the backbone
    folder = tmp_path / "runs" / "liver" / "diagonal" / "seed1"
    assert runner.invoke(app, [*base, "--model", str(folder)]).exit_code == 0
    assert (got[-1].organ, got[-1].tag, got[-1].seed) == ("liver", "diagonal", 1)
    assert runner.invoke(app, [*base, "-m", "pancreas/backbone"]).exit_code == 0
    assert got[-1].backbone and got[-1].tag == "backbone"
    # the organ is --organ only; -o is the output folder
    result = runner.invoke(app, [*base, "--organ", "pancreas"])
    assert result.exit_code == 0 and got[-1].out == Path("maps")
    missing = runner.invoke(app, ["--workdir", str(tmp_path), "predict", "-o", "maps"])
    assert missing.exit_code == 1 and "--organ NAME or --model" in missing.output
    bad = runner.invoke(app, [*base, "-m", "pancreas"])
    assert bad.exit_code == 1 and "is not ORGAN/TAG/seedS" in bad.output
    other = runner.invoke(app, [*base, "--organ", "liver", "-m", "pancreas/mob-b3-r16"])
    assert other.exit_code == 1 and "a model of pancreas, not liver" in other.output
    for cmd in ("finetune", "evaluate"):
        assert runner.invoke(app, [cmd, "-o", "pancreas"]).exit_code == 2  # no -o there
