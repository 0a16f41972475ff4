"""A read-only workdir (an archived or shared study): reading commands still work."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from reliability_helpers import read_only_view
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.manifest import Manifest, StageRecord

runner = CliRunner()


def _study(root: Path) -> None:
    m = Manifest(root / "manifest.json")
    m.put(StageRecord(stage="prepare", key="prepare/pancreas", status="done"))
    m.put(StageRecord(stage="finetune", key="finetune/pancreas/mob-b3-r16/seed0", status="failed"))


def _standalone_inputs(folder: Path) -> tuple[Path, Path]:
    pred, gt = folder / "pred", folder / "gt"
    pred.mkdir(parents=True)
    gt.mkdir(parents=True)
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 1:4, 2:5] = 1
    prob = np.where(mask == 1, 0.8, 0.1).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(gt / "s0001.nii.gz"), True)
    sitk.WriteImage(sitk.GetImageFromArray(prob), str(pred / "s0001_prob.nii.gz"), True)
    return pred, gt


def _one_line_ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_reading_commands_on_a_read_only_mount(tmp_path: Path) -> None:
    src = tmp_path / "study"
    src.mkdir()
    _study(src)
    (src / "manifest.json.lock").unlink()  # an archive need not hold the lock file
    pred, gt = _standalone_inputs(src)
    with read_only_view(src, tmp_path / "ro") as ro:
        status = runner.invoke(
            app, ["--workdir", str(ro), "status", "--records"], env={"COLUMNS": "200"}
        )
        _one_line_ok(status)
        assert "prepare/pancreas" in status.output
        _one_line_ok(runner.invoke(app, ["--workdir", str(ro), "status"]))
        out = tmp_path / "metrics.csv"
        ev = runner.invoke(
            app,
            ["--workdir", str(ro), "evaluate"]
            + ["--pred", str(ro / "pred"), "--gt", str(ro / "gt"), "--out", str(out)],
        )
        _one_line_ok(ev)
        assert out.read_text().count("s0001") == 1
        rep = runner.invoke(app, ["--workdir", str(ro), "report", "--out", str(tmp_path / "rep")])
        _one_line_ok(rep)
        assert (tmp_path / "rep" / "report.md").is_file()
        # writing into it is one line naming the file, not a traceback
        bad = runner.invoke(
            app,
            ["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(ro / "m.csv")],
        )
        assert bad.exit_code == 1 and "Traceback" not in bad.output
        assert "read-only" in bad.output.lower()
        rec = runner.invoke(app, ["--workdir", str(ro), "report"])
        assert rec.exit_code == 1 and "Traceback" not in rec.output
        assert "Read-only file system" in rec.output or "read-only" in rec.output.lower()


def test_status_reads_without_the_lock_where_it_cannot_be_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same as above without mounting: the lock file cannot be made (EROFS)."""
    _study(tmp_path)

    def refuse(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self.lock_file))

    monkeypatch.setattr("filelock.BaseFileLock.acquire", refuse)
    recs = Manifest(tmp_path / "manifest.json").records()
    assert set(recs) == {"prepare/pancreas", "finetune/pancreas/mob-b3-r16/seed0"}
    result = runner.invoke(app, ["--workdir", str(tmp_path), "status", "--records"])
    _one_line_ok(result)
