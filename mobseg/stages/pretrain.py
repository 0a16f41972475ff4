"""Stage ``pretrain``: nnU-Net planning, preprocessing and backbone training.

``run`` plans and preprocesses the dataset written by ``prepare`` with the
preset's planner (:mod:`mobseg.nnunet.planning`), then trains nnU-Net's
default trainer for fold 0 (our train/val split) with
:class:`mobseg.nnunet.trainer.PretrainTrainer`. Training resumes from
``checkpoint_latest.pth`` after an interruption; a finished backbone is not
retrained unless ``force``. After training, the backbone's Dice on whole
validation volumes is recorded (``val_dice``). With ``num_gpus`` = N > 1 the
training is nnU-Net's own DDP over N CUDA GPUs (:mod:`mobseg.nnunet.ddp`).

Manifest key ``pretrain/<organ>``; outputs: ``dataset_name``,
``plans_identifier``, ``plans_file``, ``dataset_json``, ``configuration``,
``preset``, ``checkpoint`` (the final checkpoint), ``trainer_dir``,
``epochs``, ``val_dice``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mobseg.errors import ConfigurationError
from mobseg.manifest import Manifest, StageRecord
from mobseg.nnunet.presets import PRESET_NAMES, get_preset
from mobseg.stages.keys import pretrain_key
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)

PRESETS: tuple[str, ...] = PRESET_NAMES


@dataclass(frozen=True)
class PretrainParams:
    """Options of ``mobseg pretrain``.

    Attributes:
        organ: Target structure, prepared before.
        preset: ``paper`` (ResEncL plans, nnU-Net's default training),
            ``cpu`` (a small plan that finishes in minutes on 2 cores) or
            ``micro`` (tests).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        epochs: Override the preset's number of epochs.
        iterations: Override the preset's iterations per epoch.
        num_gpus: GPUs for nnU-Net's own DDP training (N > 1 needs N CUDA GPUs).
    """

    organ: str
    preset: str = "paper"
    device: str = "auto"
    epochs: int | None = None
    iterations: int | None = None
    num_gpus: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(ws: Workspace, params: PretrainParams, force: bool = False) -> StageRecord:
    """Plan, preprocess and train the deterministic backbone of ``params.organ``.

    Returns:
        The finished record (without work if it was done already).

    Raises:
        MissingStageError: ``prepare`` has not finished for the organ.
        ConfigurationError: a finished backbone used another preset (use
            ``force``), more than one GPU was asked for, or a bad option.
    """
    from mobseg.device import check_device, resolve_device
    from mobseg.nnunet.context import prepared_dataset

    check_device(params.device)
    preset = get_preset(params.preset)
    if params.num_gpus < 1:
        raise ConfigurationError(f"--num-gpus must be >= 1, got {params.num_gpus}.")
    if params.num_gpus > 1:
        check_gpus(resolve_device(params.device), params.num_gpus)
    for name in ("epochs", "iterations"):
        value = getattr(params, name)
        if value is not None and value < 1:
            raise ConfigurationError(f"--{name} must be >= 1, got {value}.")
    manifest = Manifest(ws.manifest_path)
    prep_rec, data = prepared_dataset(manifest, params.organ)
    key = pretrain_key(params.organ)
    old = manifest.get(key)
    stale = manifest.stale(old)  # prepare ran again: plan and train afresh
    force = force or stale
    if old is not None and old.done and not force:
        used = old.outputs.get("preset", old.params.get("preset"))
        if used != params.preset:
            raise ConfigurationError(
                f"The backbone of {params.organ} is already trained with preset {used!r}.",
                f"Add --force to retrain it with preset {params.preset!r} "
                "(runs fine-tuned on the old backbone are then redone when next asked for).",
            )
        return old
    device = resolve_device(params.device)

    from mobseg.nnunet.env import setup_nnunet

    setup_nnunet(ws, preset)
    inputs = {"prepare": prep_rec.key, "dataset_name": data.dataset_name}
    with manifest.running("pretrain", key, params.to_dict(), inputs, [prep_rec]) as outputs:
        outputs.update(_pretrain(params, preset, data, device, force))
    rec = manifest.get(key)
    assert rec is not None
    return rec


def _pretrain(params: PretrainParams, preset: Any, data: Any, device: str, force: bool) -> dict:
    import json
    import os

    from mobseg.nnunet.ddp import BackboneJob, train_backbone, train_distributed
    from mobseg.nnunet.planning import plan_and_preprocess
    from mobseg.nnunet.trainer import PretrainTrainer, backbone_dice, make_trainer

    num_processes = preset.num_processes or int(os.environ.get("nnUNet_def_n_proc", "1"))
    planned = plan_and_preprocess(
        data.dataset_id,
        data.dataset_name,
        preset.plan,
        num_processes,
        splits={"train": data.splits["train"], "val": data.splits["val"]},
        force=force,
    )
    plans = json.loads(planned.plans_file.read_text(encoding="utf-8"))
    dataset_json_file = planned.plans_file.parent / "dataset.json"
    dataset_json = json.loads(dataset_json_file.read_text(encoding="utf-8"))
    epochs = params.epochs or preset.pretrain_epochs
    iterations = params.iterations or preset.pretrain_iterations
    job = BackboneJob(
        plans=plans,
        configuration=planned.configuration,
        dataset_json=dataset_json,
        device=device,
        resume=not force,
        epochs=epochs,
        iterations=iterations,
        val_iterations=preset.pretrain_val_iterations,
        save_every=preset.pretrain_save_every,
        lr=preset.pretrain_lr,
    )
    if force:
        for old in trainer_folder(job).glob("checkpoint_*.pth"):
            old.unlink()
    if params.num_gpus > 1:
        log.info("training the backbone with nnU-Net's DDP on %d GPUs", params.num_gpus)
        train_distributed(job, params.num_gpus)
        trainer = make_trainer(
            PretrainTrainer, plans, job.configuration, dataset_json, device, True
        )
        trainer.load_checkpoint(str(trainer_folder(job) / "checkpoint_final.pth"))
    else:
        trainer = train_backbone(job)
    out_dir = Path(trainer.output_folder)
    final = out_dir / "checkpoint_final.pth"
    val_dice = backbone_dice(trainer)
    return {
        "dataset_name": data.dataset_name,
        "plans_identifier": planned.plans_identifier,
        "plans_file": str(planned.plans_file),
        "dataset_json": str(dataset_json_file),
        "configuration": planned.configuration,
        "preset": params.preset,
        "checkpoint": str(final),
        "trainer_dir": str(out_dir),
        "trainer_class": type(trainer).__name__,
        "epochs": int(trainer.current_epoch),
        "iterations": iterations,
        "val_dice": val_dice,
        "device": device,
        "num_gpus": params.num_gpus,
    }


def trainer_folder(job: Any) -> Path:
    """nnU-Net's output folder of the backbone trainer (fold 0) for ``job``'s plans."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(
        get_output_folder(
            job.plans["dataset_name"],
            "PretrainTrainer",
            job.plans["plans_name"],
            job.configuration,
            0,
        )
    )


def check_gpus(device: str, num_gpus: int) -> None:
    """DDP over ``num_gpus`` needs that many CUDA GPUs.

    Raises:
        ConfigurationError: another device, or fewer GPUs visible.
    """
    import torch

    if device != "cuda":
        raise ConfigurationError(
            f"--num-gpus {num_gpus} trains with nnU-Net's DDP on CUDA GPUs; "
            f"the device is {device}.",
            "Use --num-gpus 1 here, or run on a machine with CUDA GPUs.",
        )
    visible = torch.cuda.device_count()
    if visible < num_gpus:
        raise ConfigurationError(
            f"--num-gpus {num_gpus} asked for, but {visible} CUDA GPU(s) are visible.",
            "Lower --num-gpus or check CUDA_VISIBLE_DEVICES.",
        )
