"""A workdir can be moved, copied and archived: the manifest holds relative paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mobseg.errors import ManifestError
from mobseg.manifest import Manifest, StageRecord
from mobseg.nnunet.context import prepared_dataset, pretrained_model
from mobseg.stages import prepare
from mobseg.workspace import Workspace


def _fake_pretrain(root: Path, outside: Path) -> None:
    """A finished pretrain record whose files exist under ``root``."""
    files = {
        "plans_file": root / "nnunet/preprocessed/D/plans.json",
        "dataset_json": root / "nnunet/preprocessed/D/dataset.json",
        "checkpoint": root / "nnunet/results/D/fold_all/checkpoint_final.pth",
    }
    for name, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name} of {root.name}")
    outputs = {k: str(v) for k, v in files.items()}
    outputs.update(
        preset="micro",
        configuration="3d_fullres",
        nested={"logs": [str(root / "runs/log.txt"), str(outside / "elsewhere.txt")]},
        note="3d_fullres",
    )
    Manifest(root / "manifest.json").put(
        StageRecord(stage="pretrain", key="pretrain/pancreas", status="done", outputs=outputs)
    )


def test_paths_are_stored_relative_and_read_under_the_current_folder(tmp_path: Path) -> None:
    root, outside = tmp_path / "study", tmp_path / "data"
    _fake_pretrain(root, outside)
    stored = json.loads((root / "manifest.json").read_text())["records"]["pretrain/pancreas"]
    assert stored["outputs"]["checkpoint"] == "nnunet/results/D/fold_all/checkpoint_final.pth"
    assert stored["outputs"]["nested"]["logs"] == ["runs/log.txt", str(outside / "elsewhere.txt")]
    assert stored["outputs"]["note"] == "3d_fullres"  # not a path: untouched
    assert str(root) not in json.dumps(stored)  # nothing ties the manifest to its place
    rec = Manifest(root / "manifest.json").get("pretrain/pancreas")
    assert rec is not None
    assert rec.outputs["checkpoint"] == str(root / "nnunet/results/D/fold_all/checkpoint_final.pth")
    assert rec.outputs["nested"]["logs"][1] == str(outside / "elsewhere.txt")


def test_a_moved_workdir_keeps_its_backbone(tmp_path: Path) -> None:
    root = tmp_path / "a"
    _fake_pretrain(root, tmp_path)
    moved = tmp_path / "b"
    shutil.move(str(root), str(moved))
    model = pretrained_model(Manifest(moved / "manifest.json"), "pancreas")
    assert model.checkpoint == moved / "nnunet/results/D/fold_all/checkpoint_final.pth"
    assert model.checkpoint.read_text() == "checkpoint of a"


def test_a_copied_workdir_never_reads_the_originals_files(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "orig").ensure()
    params = prepare.PrepareParams(organ="pancreas", source="phantom", num_cases=6, size=16, seed=0)
    prepare.run(ws, params)
    copy = tmp_path / "copy"
    shutil.copytree(ws.root, copy)
    rec, data = prepared_dataset(Manifest(copy / "manifest.json"), "pancreas")
    for value in (data.raw_dir, *(rec.outputs[k] for k in ("splits_json", "source_dir"))):
        assert Path(value).is_relative_to(copy), value
    # the original is gone: the copy still works on its own files
    shutil.rmtree(ws.root)
    again = prepare.run(Workspace(copy), params)
    assert again.status == "done" and Path(again.outputs["raw_dir"]).is_dir()


def test_sources_outside_the_workdir_stay_absolute(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "w" / "manifest.json")
    src = tmp_path / "dataset"
    m.put(
        StageRecord(
            stage="predict",
            key="predict/x",
            status="done",
            params={"input": str(src / "ct.nii.gz")},
            inputs={"checkpoint": str(tmp_path / "w" / "runs" / "c.pth")},
        )
    )
    stored = json.loads(m.path.read_text())["records"]["predict/x"]
    assert stored["params"]["input"] == str(src / "ct.nii.gz")
    assert stored["inputs"]["checkpoint"] == "runs/c.pth"


@pytest.mark.parametrize(
    "record",
    [
        ["not", "a", "record"],
        {"key": "prepare/x"},
        {"stage": "prepare", "key": "prepare/x", "outputs": []},
        {"stage": "prepare", "key": "prepare/x", "status": "finished"},
        {"stage": "prepare", "key": "prepare/x", "attempts": "2"},
    ],
)
def test_a_malformed_record_is_a_manifest_error(tmp_path: Path, record: object) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema": 1, "records": {"prepare/x": record}}))
    with pytest.raises(ManifestError, match=r"malformed: record 'prepare/x'"):
        Manifest(path).records()
