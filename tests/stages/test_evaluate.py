"""Stage evaluate: study mode over the manifest, standalone mode, and the CLI contract."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import report_fakes as fakes
import SimpleITK as sitk
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.core.config import HeadConfig
from mobseg.errors import ConfigurationError, InvalidInputError, MissingStageError
from mobseg.manifest import Manifest, StageRecord
from mobseg.metrics.io import read_metrics_csv
from mobseg.stages.evaluate import METRICS_VERSION, EvaluateParams, run
from mobseg.workspace import Workspace

runner = CliRunner()


@pytest.fixture
def study(tmp_path: Path) -> Workspace:
    return fakes.build_study(tmp_path / "work")


def test_study_mode_writes_a_record_per_run_with_correct_numbers(study: Workspace) -> None:
    recs = run(study, EvaluateParams(organ="pancreas"))
    assert sorted(r.key for r in recs) == [
        "evaluate/pancreas/diagonal/seed0",
        "evaluate/pancreas/diagonal/seed1",
        "evaluate/pancreas/mob-b3-r16/seed0",
        "evaluate/pancreas/mob-b3-r16/seed1",
    ]
    rec = next(r for r in recs if r.key == "evaluate/pancreas/mob-b3-r16/seed1")
    assert rec.status == "done" and rec.params["method"] == "mob" and rec.params["bases"] == 3
    rows, pooled = read_metrics_csv(study.root / rec.outputs["metrics_csv"])
    assert [r["case"] for r in rows] == list(fakes.CASES) and pooled is not None
    # independent recomputation of the Dice of every case from the generator
    dices = []
    for i, row in enumerate(rows):
        pred = fakes.prediction(i, 1.5 + 0.1, 0.3 - 0.2)["prob"] > 0.5
        gt = fakes.gt_mask(i).astype(bool)
        d = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
        assert row["dice"] == pytest.approx(d)
        dices.append(d)
    summary = rec.outputs["summary"]
    assert summary["dice"] == pytest.approx(np.mean(dices))
    assert summary["n_cases"] == 3 and summary["n_nan_dice"] == 0
    # phantom raters (3 annotators) and p* come from mobseg.data.references
    assert not math.isnan(rows[0]["ged2"]) and rows[0]["n_references"] == 3
    assert summary["pstar_mae"] is not None and summary["pstar_mae"] > 0
    rel = json.loads((study.root / rec.outputs["reliability_json"]).read_text())
    assert sum(rel["count"]) == pooled["n_voxels"] == 3 * int(np.prod(fakes.SHAPE))
    assert len(rel["edges"]) == 16


def test_aggregate_over_seeds(study: Workspace) -> None:
    recs = run(study, EvaluateParams(organ="pancreas"))
    path = study.root / "evaluation" / "pancreas" / "summary.csv"
    with open(path, newline="") as fh:
        rows = {r["tag"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"diagonal", "mob-b3-r16"}
    mob = rows["mob-b3-r16"]
    dices = [r.outputs["summary"]["dice"] for r in recs if "/mob-b3-r16/" in r.key]
    assert mob["n_seeds"] == "2" and mob["seeds"] == "0 1" and mob["method"] == "mob"
    assert float(mob["dice_mean"]) == pytest.approx(np.mean(dices))
    assert float(mob["dice_std"]) == pytest.approx(np.std(dices, ddof=1))


def test_done_runs_are_skipped_unless_forced(study: Workspace) -> None:
    first = run(study, EvaluateParams(organ="pancreas"))
    again = run(study, EvaluateParams(organ="pancreas"))
    assert [r.attempts for r in again] == [1, 1, 1, 1]
    assert [r.finished for r in again] == [r.finished for r in first]
    forced = run(study, EvaluateParams(organ="pancreas", seed=0), force=True)
    assert [r.attempts for r in forced] == [2, 2]


def test_filters_by_method_and_seed(study: Workspace) -> None:
    recs = run(study, EvaluateParams(organ="pancreas", head=HeadConfig("diagonal"), seed=1))
    assert [r.key for r in recs] == ["evaluate/pancreas/diagonal/seed1"]
    with pytest.raises(MissingStageError, match=r"lowrank-r16/seed0.*mobseg predict"):
        run(study, EvaluateParams(organ="pancreas", head=HeadConfig("lowrank"), seed=0))


def test_roi_and_truth_columns_come_from_the_same_run(study: Workspace) -> None:
    from mobseg.metrics import expected_calibration_error, negative_log_likelihood, roi_slices
    from mobseg.metrics.expected import expected_nll

    recs = run(study, EvaluateParams(organ="pancreas", seed=0, margin=2))
    assert {r.key for r in recs} == {
        "evaluate/pancreas/diagonal/seed0",
        "evaluate/pancreas/mob-b3-r16/seed0",
    }
    rec = next(r for r in recs if "/mob-b3-r16/" in r.key)
    assert rec.outputs["metrics_version"] == METRICS_VERSION == 3
    rows, pooled = read_metrics_csv(study.root / rec.outputs["metrics_csv"])
    assert pooled is not None and pooled["n_voxels_roi"] < pooled["n_voxels"]
    # case 0 recomputed from the generators: ROI box of G or S plus 2 voxels, and p*
    pr = fakes.prediction(0, 1.5, 0.3)["prob"]
    gt = fakes.gt_mask(0)
    box = roi_slices(pr, gt, 2)
    assert rows[0]["n_voxels_roi"] == pr[box].size
    assert rows[0]["ece_roi"] == pytest.approx(expected_calibration_error(pr[box], gt[box]))
    assert rows[0]["nll_roi"] == pytest.approx(negative_log_likelihood(pr[box], gt[box]))
    assert rows[0]["nll"] == pytest.approx(negative_log_likelihood(pr, gt))
    q = fakes.true_probability(0)
    band = (q > np.float32(0.01)) & (q < np.float32(0.99))
    assert rows[0]["n_voxels_band"] == int(band.sum()) > 0
    assert rows[0]["pstar_nll_band"] == pytest.approx(expected_nll(pr[band], q[band]), rel=1e-6)
    assert rows[0]["pstar_nll"] == pytest.approx(expected_nll(pr, q), rel=1e-6)
    assert not math.isnan(rows[0]["pstar_var_corr_band"])
    summary = rec.outputs["summary"]
    for key in ("nll_roi", "ece_roi", "mce_roi", "pstar_nll_band", "pstar_var_ratio_band"):
        assert summary[key] == pytest.approx(pooled[key]), key
    # the reliability bins of the ROI, and the binned Var[p] against p*(1 - p*) of the band
    rel_roi = json.loads((study.root / rec.outputs["reliability_roi_json"]).read_text())
    assert sum(rel_roi["count"]) == pooled["n_voxels_roi"]
    truth = json.loads((study.root / rec.outputs["truth_json"]).read_text())
    assert truth["band"] == [0.01, 0.99]
    assert sum(truth["variance_curve_band"]["count"]) == pooled["n_voxels_band"]
    # summary.csv carries both variants side by side
    with open(study.root / "evaluation" / "pancreas" / "summary.csv", newline="") as fh:
        agg = {r["tag"]: r for r in csv.DictReader(fh)}
    assert float(agg["mob-b3-r16"]["nll_roi_mean"]) == pytest.approx(summary["nll_roi"])
    assert float(agg["mob-b3-r16"]["pstar_mae_band_mean"]) == pytest.approx(
        summary["pstar_mae_band"]
    )


def test_records_of_an_older_metrics_version_are_evaluated_again(study: Workspace) -> None:
    (first,) = run(study, EvaluateParams(organ="pancreas", head=HeadConfig("diagonal"), seed=0))
    man = Manifest(study.manifest_path)

    def downgrade(rec):  # type: ignore[no-untyped-def]
        del rec.outputs["metrics_version"]
        return rec

    man.update(first.key, downgrade)
    (again,) = run(study, EvaluateParams(organ="pancreas", head=HeadConfig("diagonal"), seed=0))
    assert again.attempts == 2 and again.outputs["metrics_version"] == METRICS_VERSION
    (skipped,) = run(study, EvaluateParams(organ="pancreas", head=HeadConfig("diagonal"), seed=0))
    assert skipped.attempts == 2


def test_without_predictions_names_the_command(tmp_path: Path) -> None:
    ws = Workspace(tmp_path).ensure()
    # never prepared: the first missing stage is prepare, not predict (issue 14)
    with pytest.raises(MissingStageError, match="mobseg prepare --organ pancreas"):
        run(ws, EvaluateParams(organ="pancreas"))
    Manifest(ws.manifest_path).put(
        StageRecord(stage="prepare", key="prepare/pancreas", status="done")
    )
    with pytest.raises(MissingStageError, match="mobseg predict --organ pancreas"):
        run(ws, EvaluateParams(organ="pancreas"))


def test_missing_prediction_file_names_the_case_and_fails_the_record(study: Workspace) -> None:
    pred_dir = study.prediction_dir("pancreas", "diagonal", 0)
    (pred_dir / "s0001_prob.nii.gz").unlink()
    with pytest.raises(InvalidInputError, match=r"\[case s0001, .*seed0\] No prediction"):
        run(study, EvaluateParams(organ="pancreas", head=HeadConfig("diagonal"), seed=0))


def test_broken_probability_fails_the_record_with_the_case(study: Workspace) -> None:
    path = study.prediction_dir("pancreas", "diagonal", 1) / "s0002_prob.nii.gz"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img) * 2.0
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(path))
    with pytest.raises(InvalidInputError, match=r"\[case s0002, .*s0002_prob.nii.gz\].*\[0, 1\]"):
        run(study, EvaluateParams(organ="pancreas", head=HeadConfig("diagonal"), seed=1))
    rec = Manifest(study.manifest_path).get("evaluate/pancreas/diagonal/seed1")
    assert rec is not None and rec.status == "failed" and "s0002" in (rec.error or "")


def test_predictions_of_a_custom_input_are_skipped(study: Workspace) -> None:
    man = Manifest(study.manifest_path)
    key = "predict/pancreas/diagonal/seed0"

    def change(rec):  # type: ignore[no-untyped-def]
        rec.params["input"] = "/somewhere/else"
        return rec

    man.update(key, change)
    recs = run(study, EvaluateParams(organ="pancreas", head=HeadConfig("diagonal")))
    assert [r.key for r in recs] == ["evaluate/pancreas/diagonal/seed1"]


def test_standalone_mode_scores_any_folder(study: Workspace, tmp_path: Path) -> None:
    pred = study.prediction_dir("pancreas", "mob-b3-r16", 0)
    gt = study.nnunet_raw / "Dataset501_pancreas" / "labelsTs"
    out = tmp_path / "scores" / "m.csv"
    (rec,) = run(study, EvaluateParams(pred=pred, gt=gt, out=out))
    assert rec.outputs["metrics_csv"] == str(out)
    rows, pooled = read_metrics_csv(out)
    assert len(rows) == 3 and pooled is not None and pooled["n_cases"] == 3
    assert rec.outputs["dice"] == pytest.approx(pooled["dice"])
    assert Manifest(study.manifest_path).find("evaluate") == []  # nothing recorded
    assert pooled["n_voxels_roi"] < pooled["n_voxels"]  # ROI columns in standalone mode too
    assert math.isnan(pooled["pstar_mae"])  # no p* given
    # <case>_p_true.nii.gz beside the masks: the metrics against p*
    gt2 = tmp_path / "gt2"
    shutil.copytree(gt, gt2)
    for i, case in enumerate(fakes.CASES):
        fakes.write(fakes.true_probability(i), gt2 / f"{case}_p_true.nii.gz")
    run(study, EvaluateParams(pred=pred, gt=gt2, out=out))
    rows, pooled = read_metrics_csv(out)
    q = fakes.true_probability(0)
    pr = fakes.prediction(0, 1.5, 0.3)["prob"]
    assert rows[0]["pstar_mae"] == pytest.approx(np.abs(pr - q.astype(np.float64)).mean())
    with pytest.raises(ConfigurationError, match="--pred, --gt and --out together"):
        run(study, EvaluateParams(pred=pred, out=out))
    with pytest.raises(ConfigurationError, match="cannot be combined"):
        run(study, EvaluateParams(organ="pancreas", pred=pred, gt=gt, out=out))


def test_cli_standalone_success_and_one_line_errors(study: Workspace, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    shutil.copytree(study.prediction_dir("pancreas", "diagonal", 0), pred)
    gt = study.nnunet_raw / "Dataset501_pancreas" / "labelsTs"
    out = tmp_path / "m.csv"
    args = ["--workdir", str(study.root), "--quiet", "evaluate"]
    ok = runner.invoke(app, [*args, "--pred", str(pred), "--gt", str(gt), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert out.read_text().splitlines()[-1].startswith("ALL,")
    # a prediction on another grid: exit 1, one line naming the case
    img = sitk.ReadImage(str(pred / "s0001_prob.nii.gz"))
    img.SetSpacing((9.0, 9.0, 9.0))
    sitk.WriteImage(img, str(pred / "s0001_prob.nii.gz"))
    bad = runner.invoke(app, [*args, "--pred", str(pred), "--gt", str(gt), "--out", str(out)])
    assert bad.exit_code == 1
    lines = [ln for ln in bad.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "case s0001" in lines[0] and "grid" in lines[0]
    margin = runner.invoke(app, [*args, "--organ", "pancreas", "--margin", "-1"])
    assert margin.exit_code == 1 and "--margin must be >= 0" in margin.output


def _add_val_predictions(ws: Workspace, tag: str, seed: int, n: int = 4) -> list[str]:
    """Validation labels (labelsTr) and the ``predict/.../val`` record of one run."""
    from mobseg.stages.keys import predict_split_key, split_prediction_dir

    raw = ws.nnunet_raw / "Dataset501_pancreas"
    pred_dir = split_prediction_dir(ws.prediction_dir("pancreas", tag, seed), "val")
    cases = [f"v{i:03d}" for i in range(n)]
    for i, case in enumerate(cases):
        fakes.write(fakes.gt_mask(i % 3), raw / "labelsTr" / f"{case}.nii.gz")
        pr = fakes.prediction(i % 3, 0.6 + 0.2 * i, 1.0 - 0.4 * i)
        for name, arr in pr.items():
            fakes.write(arr, pred_dir / f"{case}_{name}.nii.gz")
    man = Manifest(ws.manifest_path)
    key = predict_split_key("pancreas", tag, seed, "val")
    with man.running("predict", key, {"organ": "pancreas", "seed": seed, "split": "val"}) as out:
        out.update(pred_dir=str(pred_dir), cases=cases)
    return cases


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_conformal_threshold_from_val_predictions_matches_brute_force(study: Workspace) -> None:
    from mobseg.metrics.conformal import threshold_grid

    cases = _add_val_predictions(study, "mob-b3-r16", 0)
    alpha = 0.3
    params = EvaluateParams(organ="pancreas", head=HeadConfig("mob"), seed=0, alpha=alpha)
    (rec,) = run(study, params)
    assert rec.inputs["predict_val"] == "predict/pancreas/mob-b3-r16/seed0/val"
    summary = rec.outputs["summary"]
    raw = study.nnunet_raw / "Dataset501_pancreas"
    val_dir = study.prediction_dir("pancreas", "mob-b3-r16", 0) / "val"
    cal = [
        (_read(val_dir / f"{c}_prob.nii.gz"), _read(raw / "labelsTr" / f"{c}.nii.gz") > 0)
        for c in cases
    ]
    n = len(cal)
    lam_bf = None
    for lam in threshold_grid():  # brute force over the grid
        risk = np.mean([((p < lam) & g).sum() / g.sum() for p, g in cal])
        if n / (n + 1) * risk + 1 / (n + 1) <= alpha:
            lam_bf = lam
    assert lam_bf is not None and summary["crc_lambda"] == pytest.approx(lam_bf)
    pred_dir = study.prediction_dir("pancreas", "mob-b3-r16", 0)
    test = [
        (_read(pred_dir / f"{c}_prob.nii.gz"), _read(raw / "labelsTs" / f"{c}.nii.gz") > 0)
        for c in fakes.CASES
    ]
    fnr = np.mean([((p < lam_bf) & g).sum() / g.sum() for p, g in test])
    ratio = sum((p >= lam_bf).sum() for p, _ in test) / sum((p > 0.5).sum() for p, _ in test)
    assert summary["crc_fnr"] == pytest.approx(fnr)
    assert summary["crc_volume_ratio"] == pytest.approx(ratio)
    assert summary["crc_n_cal"] == n and summary["crc_alpha"] == alpha
    default_fnr = np.mean([((p <= 0.5) & g).sum() / g.sum() for p, g in test])
    assert summary["fnr"] == pytest.approx(default_fnr)
    crc = json.loads((study.root / rec.outputs["conformal_json"]).read_text())
    assert crc["calibration_cases"] == cases and set(crc["test_fnr"]) == set(fakes.CASES)
    # the val record is not evaluated as a run of its own; another alpha re-evaluates
    again = run(study, EvaluateParams(organ="pancreas", head=HeadConfig("mob"), seed=0))
    assert [r.key for r in again] == [rec.key] and again[0].attempts == 2
    assert again[0].outputs["summary"]["crc_alpha"] == 0.1


def test_without_val_predictions_the_conformal_numbers_are_empty(study: Workspace) -> None:
    (rec,) = run(study, EvaluateParams(organ="pancreas", head=HeadConfig("mob"), seed=0))
    assert rec.outputs["summary"]["crc_lambda"] is None and "conformal_json" not in rec.outputs
    # failure detection and case scores are in every summary
    rows, pooled = read_metrics_csv(study.root / rec.outputs["metrics_csv"])
    assert pooled is not None and pooled["n_failed"] == 1
    assert all(r["n_voxels_boundary"] > 0 for r in rows)
    assert rec.outputs["summary"]["fail_auroc_var_pred"] in (0.0, 0.5, 1.0)
