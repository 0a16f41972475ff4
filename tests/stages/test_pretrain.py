"""Stage ``pretrain``: prerequisites, the micro backbone, skip and preset rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from nnunet_testlib import pretrained_micro_workspace

from mobseg.errors import ConfigurationError, MissingStageError, UnknownNameError
from mobseg.manifest import Manifest
from mobseg.stages import pretrain
from mobseg.workspace import Workspace


@pytest.fixture(scope="module")
def micro_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return pretrained_micro_workspace(tmp_path_factory.mktemp("micro_ws"))


def test_needs_prepare_first(tmp_path: Path) -> None:
    ws = Workspace(tmp_path).ensure()
    with pytest.raises(MissingStageError, match="mobseg prepare --organ pancreas"):
        pretrain.run(ws, pretrain.PretrainParams("pancreas", preset="micro", device="cpu"))


def test_unknown_preset_and_gpu_count_are_user_errors(tmp_path: Path) -> None:
    ws = Workspace(tmp_path).ensure()
    with pytest.raises(UnknownNameError, match="preset"):
        pretrain.run(ws, pretrain.PretrainParams("pancreas", preset="gpu"))
    with pytest.raises(ConfigurationError, match="--num-gpus must be >= 1"):
        pretrain.run(ws, pretrain.PretrainParams("pancreas", preset="cpu", num_gpus=0))
    with pytest.raises(ConfigurationError, match="DDP on CUDA GPUs; the device is cpu"):
        pretrain.run(
            ws, pretrain.PretrainParams("pancreas", preset="cpu", num_gpus=2, device="cpu")
        )
    with pytest.raises(ConfigurationError, match="--epochs must be >= 1"):
        pretrain.run(ws, pretrain.PretrainParams("pancreas", preset="cpu", epochs=0))


def test_micro_backbone_record_and_files(micro_ws: Workspace) -> None:
    rec = Manifest(micro_ws.manifest_path).require("pretrain/pancreas", "x")
    out = rec.outputs
    assert out["preset"] == "micro" and out["configuration"] == "3d_fullres"
    assert out["plans_identifier"] == "mobsegMicroPlans"
    assert Path(out["checkpoint"]).is_file() and out["epochs"] == 2
    assert out["val_dice"] is None or math.isnan(out["val_dice"]) or 0 <= out["val_dice"] <= 1
    plans = json.loads(Path(out["plans_file"]).read_text())
    # only the trained configuration, shrunk to the micro plain U-Net
    assert list(plans["configurations"]) == ["3d_fullres"]
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == [4, 8, 16]
    # nnU-Net trained fold 0 = prepare's train/val split
    prep = Manifest(micro_ws.manifest_path).require("prepare/pancreas", "x").outputs
    splits = json.loads(Path(prep["splits_json"]).read_text())
    folds = json.loads((Path(out["plans_file"]).parent / "splits_final.json").read_text())
    assert set(folds[0]["train"]) == set(splits["train"])
    assert set(folds[0]["val"]) == set(splits["val"])
    # the checkpoint is nnU-Net's, from fold_0 of nnU-Net's results folder
    assert Path(out["trainer_dir"]).name == "fold_0"
    assert Path(out["checkpoint"]).parent == Path(out["trainer_dir"])


def test_done_backbone_is_not_retrained(micro_ws: Workspace) -> None:
    manifest = Manifest(micro_ws.manifest_path)
    before = manifest.get("pretrain/pancreas")
    ckpt = Path(before.outputs["checkpoint"])
    mtime = ckpt.stat().st_mtime_ns
    again = pretrain.run(micro_ws, pretrain.PretrainParams("pancreas", preset="micro"))
    assert again.to_dict() == before.to_dict()
    assert ckpt.stat().st_mtime_ns == mtime


def test_another_preset_needs_force(micro_ws: Workspace) -> None:
    with pytest.raises(ConfigurationError, match="already trained with preset 'micro'.*--force"):
        pretrain.run(micro_ws, pretrain.PretrainParams("pancreas", preset="cpu"))
