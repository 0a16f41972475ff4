"""Reading prediction folders: file contract, clear errors, CSV round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mobseg.errors import InvalidInputError
from mobseg.metrics import evaluate_case
from mobseg.metrics.io import (
    evaluate_files,
    evaluate_many,
    read_metrics_csv,
    standalone_cases,
    write_metrics_csv,
)

SPACING = (0.8, 0.8, 2.0)


def _write(arr: np.ndarray, path: Path, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _folders(tmp_path: Path, n: int = 2) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    rng = np.random.default_rng(0)
    data = []
    for i in range(n):
        t = np.zeros((6, 10, 12), dtype=np.uint8)
        t[2:4, 3 + i : 7, 4:9] = 1
        p = np.clip(t * 0.4 + rng.random(t.shape) * 0.55, 0, 1).astype(np.float32)
        v = (p * (1 - p) * 0.2).astype(np.float32)
        _write(t, gt / f"c{i}.nii.gz")
        _write(p, pred / f"c{i}_prob.nii.gz")
        _write(v, pred / f"c{i}_var.nii.gz")
        _write((p > 0.5).astype(np.uint8), pred / f"c{i}_seg.nii.gz")
        data.append({"t": t, "p": p, "v": v})
    return pred, gt, data


def test_folder_results_equal_array_results_and_csv_round_trip(tmp_path: Path) -> None:
    pred, gt, data = _folders(tmp_path)
    cases = standalone_cases(pred, gt)
    assert [c.case for c in cases] == ["c0", "c1"]
    assert cases[0].var is not None and cases[0].entropy is None and cases[0].references == []
    acc = evaluate_many(cases)
    for row, d in zip(acc.rows, data, strict=True):
        ref = evaluate_case(d["p"], d["t"], variance=d["v"]).row
        for k in ("dice", "nll", "brier", "ece", "mce", "auroc_var"):
            assert not math.isnan(ref[k]) and row[k] == pytest.approx(ref[k]), k
    out = tmp_path / "m.csv"
    write_metrics_csv(out, acc.rows, acc.pooled_row())
    rows, pooled = read_metrics_csv(out)
    assert [r["case"] for r in rows] == ["c0", "c1"] and pooled is not None
    header = out.read_text().splitlines()[0].split(",")
    assert header[:6] == ["case", "dice", "nll", "brier", "ece", "mce"]
    assert out.read_text().splitlines()[-1].startswith("ALL,")
    assert pooled["ece"] == pytest.approx(acc.pooled_row()["ece"], rel=1e-9)
    assert math.isnan(rows[0]["ged2"]) and pooled["n_cases"] == 2


def test_extra_raters_in_gt_folder_enable_ged(tmp_path: Path) -> None:
    pred, gt, data = _folders(tmp_path, 1)
    other = data[0]["t"].copy()
    other[2, 3, 4:9] = 0
    _write(other, gt / "c0_ref1.nii.gz")
    (case,) = standalone_cases(pred, gt)  # c0_ref1 is not a case of its own
    assert [p.name for p in case.references] == ["c0.nii.gz", "c0_ref1.nii.gz"]
    row = evaluate_files(case).row
    assert row["n_references"] == 2 and not math.isnan(row["ged2"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("geometry", r"\[case c1, .*c1_prob.nii.gz\].*grid.*spacing"),
        ("size", r"\[case c1, .*c1_var.nii.gz\].*size"),
        ("nan", r"\[case c1, .*c1_prob.nii.gz\].*1 NaN and 0 infinite"),
        ("inf_var", r"\[case c1, .*c1_var.nii.gz\].*1 NaN and 1 infinite"),
        ("range", r"\[case c1, .*c1_prob.nii.gz\].*\[0, 1\]"),
        ("labels", r"\[case c1, .*c1.nii.gz\].*only 0 and 1"),
        ("no_gt", r"\[case c1, .*gt\] No ground truth c1.nii.gz"),
        ("int_prob", r"\[case c1, .*c1_prob.nii.gz\].*floating point"),
        ("neg_var", r"\[case c1, .*c1_var.nii.gz\].*>= 0"),
    ],
)
def test_clear_errors_name_case_and_file(tmp_path: Path, mutate: str, message: str) -> None:
    pred, gt, data = _folders(tmp_path)
    d = data[1]
    if mutate == "geometry":
        _write(d["p"], pred / "c1_prob.nii.gz", spacing=(0.8, 0.9, 2.0))
    elif mutate == "size":
        _write(d["v"][:, :, :-1].copy(), pred / "c1_var.nii.gz")
    elif mutate == "nan":
        p = d["p"].copy()
        p[0, 0, 0] = np.nan
        _write(p, pred / "c1_prob.nii.gz")
    elif mutate == "inf_var":
        v = d["v"].copy()
        v[1, 2, 3] = np.inf
        v[1, 2, 4] = np.nan
        _write(v, pred / "c1_var.nii.gz")
    elif mutate == "range":
        _write(d["p"] * 1.5, pred / "c1_prob.nii.gz")
    elif mutate == "labels":
        _write(d["t"] * 3, gt / "c1.nii.gz")
    elif mutate == "no_gt":
        (gt / "c1.nii.gz").unlink()
    elif mutate == "int_prob":
        _write((d["p"] * 100).astype(np.int16), pred / "c1_prob.nii.gz")
    elif mutate == "neg_var":
        _write(d["v"] - 0.5, pred / "c1_var.nii.gz")
    with pytest.raises(InvalidInputError, match=message):
        evaluate_many(standalone_cases(pred, gt))


def test_missing_folders_and_empty_prediction_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="--pred folder does not exist"):
        standalone_cases(tmp_path / "nope", tmp_path)
    (tmp_path / "p").mkdir()
    with pytest.raises(InvalidInputError, match="No <case>_prob.nii.gz files"):
        standalone_cases(tmp_path / "p", tmp_path)


def test_vector_probability_image_is_refused(tmp_path: Path) -> None:
    pred, gt, data = _folders(tmp_path, 1)
    vec = np.stack([1 - data[0]["p"], data[0]["p"]], axis=-1)
    img = sitk.GetImageFromArray(vec, isVector=True)
    img.SetSpacing(SPACING)
    sitk.WriteImage(img, str(pred / "c0_prob.nii.gz"))
    with pytest.raises(InvalidInputError, match=r"\[case c0.*one value per voxel, found 2"):
        evaluate_many(standalone_cases(pred, gt))


def test_real_example_scored_with_second_rater(totalseg_example: Path, tmp_path: Path) -> None:
    """The shared CT: rater 1 as ground truth, rater 2 (multi-label) as extra reference."""
    first = sitk.ReadImage(str(totalseg_example / "s0000/segmentations/pancreas.nii.gz"))
    multi = totalseg_example / "reference/s0000_total_multilabel.nii.gz"
    labels = json.loads(multi.with_name("s0000_total_multilabel.labels.json").read_text())
    value = next(int(k) for k, v in labels.items() if v == "pancreas")
    second = sitk.Cast(sitk.ReadImage(str(multi)) == value, sitk.sitkUInt8)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    gt.mkdir()
    pred.mkdir()
    sitk.WriteImage(first, str(gt / "s0000.nii.gz"))
    sitk.WriteImage(second, str(gt / "s0000_ref1.nii.gz"))
    # predict rater 2's mask, softened: p = 0.9 inside, 0.1 outside
    arr = sitk.GetArrayFromImage(second).astype(np.float32) * 0.8 + 0.1
    prob = sitk.GetImageFromArray(arr)
    prob.CopyInformation(first)
    sitk.WriteImage(prob, str(pred / "s0000_prob.nii.gz"))
    row = evaluate_many(standalone_cases(pred, gt)).rows[0]
    assert row["dice"] == pytest.approx(0.81, abs=0.01)  # SOURCE.md: Dice between raters
    assert row["nll"] == pytest.approx(
        -np.mean(np.log(np.where(sitk.GetArrayFromImage(first) == 1, arr, 1 - arr)))
    )
    assert row["ged2"] == pytest.approx(0.0, abs=1e-12)  # equals one rater exactly
