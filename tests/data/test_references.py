"""Reference masks (raters) and the phantom's true probability, for evaluation."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mobseg.data.references import (
    extract_organ_mask,
    label_value,
    reference_masks,
    true_probability,
)
from mobseg.errors import InvalidInputError, MissingStageError
from mobseg.stages.prepare import PrepareParams, run
from mobseg.workspace import Workspace


def arr(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_phantom_gives_k_annotators_and_p_star(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "w")
    rec = run(
        ws, PrepareParams(organ="duodenum", source="phantom", num_cases=6, size=16, annotators=4)
    )
    splits = json.loads(Path(rec.outputs["splits_json"]).read_text())
    case = splits["test"][0] if splits["test"] else splits["train"][0]
    masks = reference_masks(ws, "duodenum", case)
    assert len(masks) == 4 and masks[0].name == "duodenum.nii.gz"
    assert masks[0].parent.name == "segmentations"
    p_path = true_probability(ws, "duodenum", case)
    assert p_path is not None
    p = arr(p_path)
    stack = np.stack([arr(m) for m in masks])
    assert p.dtype == np.float32 and 0.0 <= p.min() and p.max() <= 1.0
    # where p* is (nearly) certain, every annotator agrees with it
    assert (stack[:, p > 0.999] == 1).all() and (stack[:, p < 0.001] == 0).all()
    # annotator 0 is the mask nnU-Net trains on (on the same grid, no --spacing)
    raw = Path(rec.outputs["raw_dir"])
    label = next(raw.glob(f"labels*/{case}.nii.gz"))
    np.testing.assert_array_equal(arr(label), stack[0])


def test_before_prepare_the_missing_stage_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingStageError, match="mobseg prepare --organ pancreas"):
        reference_masks(Workspace(tmp_path), "pancreas", "s0000")
    with pytest.raises(MissingStageError):
        true_probability(Workspace(tmp_path), "pancreas", "s0000")


def test_shared_example_has_a_second_rater(totalseg_example: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "w")
    run(ws, PrepareParams(organ="pancreas", source=str(totalseg_example)))
    masks = reference_masks(ws, "pancreas", "s0000")
    assert len(masks) == 2
    assert masks[0] == totalseg_example.resolve() / "s0000" / "segmentations" / "pancreas.nii.gz"
    assert masks[1].is_relative_to(ws.root)
    a, b = arr(masks[0]), arr(masks[1])
    assert int(a.sum()) == 548 and int(b.sum()) == 644  # SOURCE.md
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice == pytest.approx(0.81, abs=0.01)  # SOURCE.md
    first, second = sitk.ReadImage(str(masks[0])), sitk.ReadImage(str(masks[1]))
    assert second.GetSize() == first.GetSize()
    assert second.GetOrigin() == pytest.approx(first.GetOrigin())
    assert second.GetDirection() == pytest.approx(first.GetDirection())
    assert true_probability(ws, "pancreas", "s0000") is None
    # cached: a second call does not rewrite the extracted rater
    mtime = masks[1].stat().st_mtime_ns
    assert reference_masks(ws, "pancreas", "s0000")[1].stat().st_mtime_ns == mtime


def test_zip_source_masks_are_extracted_into_the_workdir(
    totalseg_example: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "ex.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(totalseg_example.rglob("*")):
            if p.is_file() and ("gallbladder" in p.name or p.parent.name != "segmentations"):
                zf.write(p, "x/" + p.relative_to(totalseg_example).as_posix())
    ws = Workspace(tmp_path / "w")
    run(ws, PrepareParams(organ="gallbladder", source=str(archive)))
    masks = reference_masks(ws, "gallbladder", "s0000")
    assert len(masks) == 2 and all(m.is_relative_to(ws.root) for m in masks)
    assert int(arr(masks[0]).sum()) == 1349 and int(arr(masks[1]).sum()) == 1333  # SOURCE.md


def test_extract_organ_mask_and_resampling_onto_the_case_grid(tmp_path: Path) -> None:
    labels = np.zeros((4, 6, 8), np.uint8)
    labels[1:3, 2:4, 2:6] = 7
    labels[0, 0, 0] = 3
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(img, str(tmp_path / "ml.nii.gz"))
    (tmp_path / "ml.json").write_text(json.dumps({"3": "liver", "7": "pancreas"}))
    assert label_value(tmp_path / "ml.json", "pancreas") == 7
    out = extract_organ_mask(
        tmp_path / "ml.nii.gz", tmp_path / "ml.json", "pancreas", tmp_path / "o.nii.gz"
    )
    np.testing.assert_array_equal(arr(out), (labels == 7).astype(np.uint8))
    like = sitk.Image(16, 12, 8, sitk.sitkUInt8)
    like.SetSpacing((1.0, 1.0, 1.0))
    fine = extract_organ_mask(
        tmp_path / "ml.nii.gz", tmp_path / "ml.json", "pancreas", tmp_path / "f.nii.gz", like=like
    )
    fine_arr = arr(fine)
    assert fine_arr.shape == (8, 12, 16)
    assert int(fine_arr.sum()) == pytest.approx(8 * int((labels == 7).sum()), rel=0.3)
    with pytest.raises(InvalidInputError, match="does not list 'gallbladder'"):
        label_value(tmp_path / "ml.json", "gallbladder")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="Unreadable label table"):
        label_value(tmp_path / "bad.json", "pancreas")


def test_a_case_without_the_mask_is_refused(totalseg_example: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(totalseg_example, src)
    ws = Workspace(tmp_path / "w")
    run(ws, PrepareParams(organ="pancreas", source=str(src)))
    (src / "s0000" / "segmentations" / "pancreas.nii.gz").unlink()
    with pytest.raises(InvalidInputError, match="no pancreas mask"):
        reference_masks(ws, "pancreas", "s0000")
