"""Backbone training on several GPUs with nnU-Net's own DDP (``pretrain --num-gpus N``).

nnU-Net trains with ``torch.distributed``: one process per GPU, the global
batch split over the ranks, gradients all-reduced by
``DistributedDataParallel``, rank 0 writing checkpoints and logs. Its own
launcher (``nnUNetv2_train -num_gpus``) looks trainers up by name inside
nnunetv2's own folders, which cannot find mobseg's classes. This module is the same
launch done programmatically: :func:`train_distributed` spawns ``world_size``
processes, each joins the process group (``nccl`` on CUDA, ``gloo`` on the
CPU), builds :class:`~mobseg.nnunet.trainer.PretrainTrainer` directly and
calls :func:`train_backbone`, the function single-device training uses too.

The CPU/``gloo`` path exists so that the distributed code is tested on
CPU-only machines; it is not faster than one process on one CPU.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneJob:
    """Everything a process needs to train the backbone (picklable).

    Attributes:
        plans: nnU-Net plans dict.
        configuration: nnU-Net configuration name (``3d_fullres``).
        dataset_json: nnU-Net dataset.json dict.
        device: ``cuda``, ``cpu`` or ``mps``.
        resume: Continue from the last checkpoint of an interrupted run.
        epochs: Epochs.
        iterations: Training iterations per epoch.
        val_iterations: Validation iterations per epoch.
        save_every: Epochs between checkpoints.
        lr: Initial learning rate (None = nnU-Net's).

    The spawned processes inherit this process's environment, so nnU-Net's
    folders (``nnUNet_raw`` etc.) need no passing.
    """

    plans: dict[str, Any]
    configuration: str
    dataset_json: dict[str, Any]
    device: str
    resume: bool
    epochs: int
    iterations: int
    val_iterations: int
    save_every: int
    lr: float | None = None


def train_backbone(job: BackboneJob) -> Any:
    """Train (or finish, or resume) the backbone in this process; returns the trainer.

    Under an initialised process group this is one rank of DDP training.
    A finished run (``checkpoint_final.pth``) with fewer epochs than asked is
    continued; an interrupted one resumes from ``checkpoint_latest.pth``.
    """
    from mobseg.nnunet.trainer import PretrainTrainer, make_trainer

    trainer = make_trainer(
        PretrainTrainer,
        job.plans,
        job.configuration,
        job.dataset_json,
        job.device,
        resume=job.resume,
    )
    trainer.configure(job.epochs, job.iterations, job.val_iterations, job.save_every, lr=job.lr)
    out_dir = Path(trainer.output_folder)
    final = out_dir / "checkpoint_final.pth"
    latest = out_dir / "checkpoint_latest.pth"
    if final.exists():
        log.info("backbone already trained: %s", final)
        trainer.load_checkpoint(str(final))
        if trainer.current_epoch < job.epochs:
            log.info("continuing from epoch %d to %d", trainer.current_epoch, job.epochs)
            trainer.run_training()
    else:
        if latest.exists():
            log.info("resuming backbone training from %s", latest)
            trainer.load_checkpoint(str(latest))
        trainer.run_training()
    return trainer


def free_port() -> int:
    """A TCP port on localhost that is free now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, job: BackboneJob) -> None:
    """One rank: join the group, train, leave (called by ``torch.multiprocessing.spawn``)."""
    import torch.distributed as dist

    from mobseg import progress

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    cuda = torch.device(job.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    progress.set_enabled(progress.enabled() and rank == 0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    try:
        train_backbone(job)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done, and rank 0's checkpoints are closed. Leave without the interpreter's
    # teardown: native threads of the process group (and of data loading) can
    # still be alive then, and a joinable std::thread destroyed at exit aborts
    # the process ("terminate called without an active exception"), which
    # spawn would report as a failed rank.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_distributed(job: BackboneJob, world_size: int) -> None:
    """Train the backbone with ``world_size`` processes (one GPU each on CUDA).

    Raises:
        ValueError: ``world_size`` < 2, more GPUs than the machine has, or a
            device other than ``cuda`` / ``cpu``.
        torch.multiprocessing.ProcessRaisedException: a rank failed (its
            traceback is in the message).
    """
    device = torch.device(job.device).type
    if world_size < 2:
        raise ValueError(f"distributed training needs world_size >= 2, got {world_size}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"{world_size} GPUs asked for, {torch.cuda.device_count()} visible "
            "(CUDA_VISIBLE_DEVICES)"
        )
    if device not in ("cuda", "cpu"):
        raise ValueError(f"distributed training runs on cuda or cpu, not {device}")
    import torch.multiprocessing as tmp

    tmp.spawn(_worker, args=(world_size, free_port(), job), nprocs=world_size, join=True)
