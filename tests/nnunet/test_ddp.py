"""Distributed backbone training (nnU-Net's DDP), run on the CPU with the gloo backend."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from nnunet_testlib import pretrained_micro_workspace

from mobseg.manifest import Manifest
from mobseg.nnunet.ddp import BackboneJob, train_distributed
from mobseg.workspace import Workspace


@pytest.fixture(scope="module")
def micro_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return pretrained_micro_workspace(tmp_path_factory.mktemp("micro_ws"))


def _job(ws: Workspace, plans_name: str, epochs: int) -> BackboneJob:
    out = Manifest(ws.manifest_path).require("pretrain/pancreas", "x").outputs
    plans = json.loads(Path(out["plans_file"]).read_text())
    plans["plans_name"] = plans_name  # its own results folder; same preprocessed data
    dataset_json = json.loads(Path(out["dataset_json"]).read_text())
    return BackboneJob(
        plans=plans,
        configuration=out["configuration"],
        dataset_json=dataset_json,
        device="cpu",
        resume=True,
        epochs=epochs,
        iterations=2,
        val_iterations=1,
        save_every=1,
    )


def test_argument_errors() -> None:
    job = BackboneJob({}, "3d_fullres", {}, "cpu", True, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="world_size >= 2"):
        train_distributed(job, 1)
    with pytest.raises(ValueError, match="cuda or cpu"):
        train_distributed(replace(job, device="mps"), 2)
    if torch.cuda.device_count() < 64:
        with pytest.raises(ValueError, match="64 GPUs asked for"):
            train_distributed(replace(job, device="cuda"), 64)


def _point_nnunet_at(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(getattr(ws, f"nnunet_{name}")))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")


def test_the_stage_finds_the_trainer_folder(
    micro_ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder the DDP path reads the final checkpoint from is the trainer's own."""
    from mobseg.stages.pretrain import trainer_folder

    _point_nnunet_at(micro_ws, monkeypatch)
    rec = Manifest(micro_ws.manifest_path).require("pretrain/pancreas", "x")
    job = _job(micro_ws, json.loads(Path(rec.outputs["plans_file"]).read_text())["plans_name"], 1)
    assert trainer_folder(job) == Path(rec.outputs["trainer_dir"])


@pytest.mark.slow
def test_two_ranks_train_the_backbone_and_resume(
    micro_ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    _point_nnunet_at(micro_ws, monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = _job(micro_ws, "ddpTestPlans", epochs=1)
    train_distributed(job, 2)

    dataset = job.plans["dataset_name"]
    folder = micro_ws.nnunet_results / dataset / "PretrainTrainer__ddpTestPlans__3d_fullres"
    final = folder / "fold_0" / "checkpoint_final.pth"
    assert final.is_file()
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 1
    # rank 0 saved the plain network (no DistributedDataParallel "module." prefix)
    assert not any(k.startswith("module.") for k in ckpt["network_weights"])
    # the global batch of the micro plans (2) was split over the two ranks
    debug = json.loads((folder / "fold_0" / "debug.json").read_text())
    assert int(debug["batch_size"]) == 1 and str(debug["is_ddp"]) == "True"

    # a longer schedule continues from the final checkpoint, again on two ranks
    train_distributed(_job(micro_ws, "ddpTestPlans", epochs=2), 2)
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2
    assert os.path.getsize(final) > 0


@pytest.mark.slow
def test_pretrain_stage_with_two_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrain --num-gpus 2`` end to end, with the GPU check lifted to run it on the CPU."""
    from mobseg.stages import prepare, pretrain

    for name in ("raw", "preprocessed", "results", "n_proc_DA"):
        monkeypatch.delenv(f"nnUNet_{name}", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(pretrain, "check_gpus", lambda device, n: None)
    ws = Workspace(tmp_path / "work").ensure()
    prepare.run(ws, prepare.PrepareParams(organ="pancreas", source="phantom", num_cases=6, size=32))
    rec = pretrain.run(
        ws, pretrain.PretrainParams("pancreas", preset="micro", device="cpu", num_gpus=2)
    )
    out = rec.outputs
    assert rec.done and out["num_gpus"] == 2 and out["epochs"] == 2
    assert Path(out["checkpoint"]).is_file() and 0.0 <= out["val_dice"] <= 1.0
    assert Path(out["trainer_dir"]).is_relative_to(ws.nnunet_results)
    debug = json.loads((Path(out["trainer_dir"]) / "debug.json").read_text())
    assert int(debug["batch_size"]) == 1 and str(debug["is_ddp"]) == "True"
