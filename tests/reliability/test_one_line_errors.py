"""Faults a user can cause are one plain line and exit 1, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.errors import ManifestError
from mobseg.manifest import Manifest, StageRecord

runner = CliRunner()


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # undo Rich's wrapping
    assert text.startswith("Error:"), text
    for needle in needles:
        assert needle in text, text


def _pred_gt(folder: Path, predicted: tuple[str, ...], truths: tuple[str, ...]) -> tuple:
    pred, gt = folder / "pred", folder / "gt"
    pred.mkdir(parents=True)
    gt.mkdir(parents=True)
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 1:4, 2:5] = 1
    for case in truths:
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(gt / f"{case}.nii.gz"), True)
    prob = np.where(mask == 1, 0.8, 0.1).astype(np.float32)
    for case in predicted:
        sitk.WriteImage(sitk.GetImageFromArray(prob), str(pred / f"{case}_prob.nii.gz"), True)
    return pred, gt


@pytest.mark.parametrize("below", [False, True])
@pytest.mark.parametrize("command", [["status"], ["prepare", "--organ", "pancreas"], ["report"]])
def test_workdir_that_is_a_file(tmp_path: Path, below: bool, command: list[str]) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("x")
    workdir = file / "study" if below else file
    result = runner.invoke(app, ["--workdir", str(workdir), *command])
    _one_line_error(result, "working directory", "Give --workdir a folder")


def test_evaluate_out_that_cannot_take_the_csv(tmp_path: Path) -> None:
    pred, gt = _pred_gt(tmp_path, ("s1",), ("s1",))
    base = ["evaluate", "--pred", str(pred), "--gt", str(gt), "--out"]
    _one_line_error(runner.invoke(app, [*base, str(tmp_path)]), "is a folder")
    (tmp_path / "file").write_text("x")
    _one_line_error(runner.invoke(app, [*base, str(tmp_path / "file" / "m.csv")]), "m.csv")
    assert runner.invoke(app, [*base, str(tmp_path / "m.csv")]).exit_code == 0


def test_evaluate_refuses_ground_truth_without_prediction(tmp_path: Path) -> None:
    pred, gt = _pred_gt(tmp_path, ("s1",), ("s1", "s2", "s3"))
    for companion in ("s1_ref1", "s1_p_true"):  # a rater and p*, not cases
        (gt / f"{companion}.nii.gz").write_bytes((gt / "s1.nii.gz").read_bytes())
    out = tmp_path / "m.csv"
    result = runner.invoke(
        app, ["evaluate", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]
    )
    _one_line_error(result, "2 of 3 ground-truth cases have no prediction", "s2, s3")
    assert not out.exists()


def test_malformed_and_corrupt_manifests(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema": 1, "records": {"prepare/x": {"stage": 3}}}))
    _one_line_error(runner.invoke(app, ["--workdir", str(tmp_path), "status"]), "malformed")
    path.unlink()
    m = Manifest(path)
    m.put(StageRecord(stage="prepare", key="prepare/a", status="done"))
    m.put(StageRecord(stage="prepare", key="prepare/b", status="done"))
    path.write_text("{cut")
    with pytest.raises(ManifestError, match=r"Restore it from manifest\.json\.bak"):
        m.records()
    # the backup is real: it holds the state before the last write
    path.write_bytes(m.backup_path.read_bytes())
    assert set(Manifest(path).records()) == {"prepare/a"}


def test_ctrl_c_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mobseg.stages import prepare

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "run", interrupted)
    result = runner.invoke(
        app, ["--workdir", str(tmp_path), "prepare", "--organ", "pancreas", "--source", "phantom"]
    )
    assert result.exit_code == 130
    assert "Interrupted; rerun the same command to resume." in result.output


def test_evaluate_of_an_organ_never_prepared_says_prepare(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--workdir", str(tmp_path), "evaluate", "--organ", "liver"])
    _one_line_error(result, "mobseg prepare --organ liver")
