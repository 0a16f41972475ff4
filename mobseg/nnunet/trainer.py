"""nnU-Net trainers of mobseg: backbone pretraining and stochastic fine-tuning.

This module imports nnunetv2: import it after
:func:`mobseg.nnunet.env.setup_nnunet`. Both trainers are instantiated
directly (nnU-Net's lookup of trainers by name searches nnunetv2's own
folders only and cannot find them).

:class:`PretrainTrainer` is nnU-Net's default training (``nnUNetTrainer``:
SGD, poly learning rate, Dice + CE with deep supervision, nnU-Net's
augmentation and patch sampling) with three changes of form only: the
number of epochs and iterations comes from the preset, every epoch shows a
progress bar with the loss, and checkpoints are written atomically so that
an interrupted run resumes from ``checkpoint_latest.pth``.

:class:`FinetuneTrainer` fine-tunes all parameters of the pretrained network
with a stochastic head (SPEC sections 3-4):

- the network is :class:`~mobseg.nnunet.network.StochasticUNet`; the
  pretrained backbone is loaded strictly, only the head keeps its fresh
  initialisation;
- AdamW (lr 1e-4, weight decay 1e-4 by default) at a constant learning
  rate, gradient-norm clipping, batch size 1, AMP and gradient scaling on CUDA
  only; with batch size 1 nnU-Net's foreground oversampling becomes
  probabilistic (each patch is centred on foreground with probability 0.33;
  with nnU-Net's deterministic rule a batch of 1 would never be);
- per step: ONE backbone pass, k samples from the head, the loss of
  :class:`mobseg.core.losses.StochasticSegLoss` on the full-resolution logits,
  plus nnU-Net's deterministic Dice + CE on the lower-resolution
  deep-supervision outputs of mu. nnU-Net weighs its outputs
  w_0 > w_1 > ...; the full-resolution term is replaced by the stochastic
  loss with weight 1, so the total is
  ``L = L_stochastic + sum_{i>=1} (w_i / w_0) L_DiceCE(mu_i, t_i)``;
- every ``val_every`` epochs (and after the last) the Dice of the MC-mean
  prediction on WHOLE validation volumes (preprocessed grid, sliding
  window, ``val_samples`` samples per tile) selects ``checkpoint_best.pth``;
- per-term losses are logged per epoch to ``losses.csv`` and ``progress.png``;
- seeding of torch, numpy, random and nnU-Net's data loaders; the random
  states are stored in every checkpoint, so a resumed run continues the same
  random streams (bit-identical with in-process augmentation,
  ``nnUNet_n_proc_DA=0``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from mobseg.core.config import HeadConfig, LossConfig
from mobseg.errors import InvalidInputError
from mobseg.fsutil import atomic_write_bytes, describe_os_error, publish, storage_error
from mobseg.nnunet.env import quiet
from mobseg.nnunet.network import (
    StochasticUNet,
    build_backbone,
    build_network,
    feature_channels,
    load_backbone,
)
from mobseg.progress import progress_bar

log = logging.getLogger(__name__)

#: Columns of ``losses.csv``.
LOSS_COLUMNS: tuple[str, ...] = (
    "epoch",
    "lr",
    "total",
    "data",
    "ce",
    "dice",
    "kl",
    "orth",
    "entropy",
    "ds",
    "val_dice",
    "seconds",
)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The states of every random generator (for checkpoints)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def verify_checkpoint_file(path: Path) -> None:
    """A ``torch.save`` file (a zip archive) is complete: its central directory reads.

    Raises:
        InvalidInputError: the file is cut short or not a torch zip archive.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InvalidInputError(f"The checkpoint is incomplete ({exc}).", path=str(path)) from exc


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file, verify, fsync, then rename (never half a file)."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        try:
            torch.save(obj, tmp)
        except (OSError, RuntimeError) as exc:  # torch's zip writer raises RuntimeError
            raise storage_error(final, str(exc).strip().splitlines()[0]) from exc
        publish(tmp, final, verify_checkpoint_file)
    finally:
        tmp.unlink(missing_ok=True)


def make_trainer(
    cls: type[nnUNetTrainer],
    plans: dict[str, Any],
    configuration: str,
    dataset_json: dict[str, Any],
    device: str,
    resume: bool,
) -> Any:
    """Instantiate an nnU-Net trainer class directly (fold 0), quietly."""
    plans = dict(plans)
    plans["continue_training"] = resume
    with quiet():
        return cls(
            plans=plans,
            configuration=configuration,
            fold=0,
            dataset_json=dataset_json,
            device=torch.device(device),
        )


class _QuietLogMixin:
    """Send nnU-Net's log lines to its log file and to logging, not to the console."""

    def print_to_log_file(self, *args: Any, also_print_to_console: bool = True, **kw: Any) -> None:
        super().print_to_log_file(*args, also_print_to_console=False, **kw)  # type: ignore[misc]
        log.debug(" ".join(str(a) for a in args))


# ---------------------------------------------------------------------------------
class PretrainTrainer(_QuietLogMixin, nnUNetTrainer):
    """nnU-Net's default training with progress bars and atomic checkpoints.

    Under ``torch.distributed`` (see :mod:`mobseg.nnunet.ddp`) it is nnU-Net's
    own DDP training: the global batch split over the ranks, gradients
    all-reduced, rank 0 writing checkpoints and logs. nnU-Net assumes CUDA
    there; this class also accepts a CPU device (the ``gloo`` backend), so
    the distributed path is tested on CPU-only machines.
    """

    progress_label = "pretrain"
    plot_every = 10
    #: The ``trainer_name`` its checkpoints record: nnU-Net's own trainer, which
    #: builds the same network from the plans (the convolutions' parameters are
    #: nnU-Net's), so ``nnUNetv2_predict_from_modelfolder`` finds the class by
    #: name; nnU-Net searches only its own package for it.
    checkpoint_trainer_name = "nnUNetTrainer"

    def __init__(  # nnU-Net records these argument names for its checkpoints
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's default
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and torch.device(device).type == "cpu":
            self.device = torch.device("cpu")  # nnU-Net would pick cuda:<rank>

    def initialize(self) -> None:
        """nnU-Net's set-up; under DDP on the CPU, wrapped without ``device_ids``."""
        if not (self.is_ddp and self.device.type == "cpu") or self.was_initialized:
            super().initialize()
            return
        from torch.nn.parallel import DistributedDataParallel

        self.is_ddp = False  # nnU-Net's wrapper passes device_ids, which CPU modules refuse
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self._set_batch_size_and_oversample()  # this rank's share of the global batch
        self.network = DistributedDataParallel(self.network)
        self.loss = self._build_loss()  # nnU-Net's DDP variant of the loss

    def configure(
        self,
        epochs: int,
        iterations: int,
        val_iterations: int,
        save_every: int,
        lr: float | None = None,
    ) -> None:
        """Set the length of training and the initial learning rate (before ``initialize``)."""
        if lr is not None:
            self.initial_lr = lr
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations
        self.num_val_iterations_per_epoch = val_iterations
        self.save_every = max(1, save_every)
        original = self.logger.plot_progress_png

        def plot(folder: str) -> None:
            if (self.current_epoch + 1) % self.plot_every == 0 or (
                self.current_epoch + 1 >= self.num_epochs
            ):
                original(folder)

        self.logger.plot_progress_png = plot  # nnU-Net's plot is slow; not every epoch

    def build_network_architecture(  # type: ignore[override]
        self,
        plans_manager: Any,
        configuration_manager: Any,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> torch.nn.Module:
        """nnU-Net's network, with :class:`~mobseg.nnunet.network.CPUConv3d` convolutions."""
        return build_backbone(
            plans_manager,
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
        )

    def save_checkpoint(self, filename: str) -> None:
        tmp = str(Path(filename).with_name(f".{Path(filename).name}.{os.getpid()}.tmp"))
        try:
            super().save_checkpoint(tmp)
            if Path(tmp).exists():  # nnU-Net saves on the main rank only
                ckpt = torch.load(tmp, map_location="cpu", weights_only=False)
                ckpt["trainer_name"] = self.checkpoint_trainer_name
                torch.save(ckpt, tmp)
        except (OSError, RuntimeError) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise storage_error(filename, str(exc).strip().splitlines()[0]) from exc
        if Path(tmp).exists():  # nnU-Net saves on the main rank only
            publish(tmp, filename, verify_checkpoint_file)

    def run_training(self) -> None:
        """nnU-Net's epoch loop, with a progress bar per epoch."""
        with quiet():
            self.on_train_start()
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            label = f"{self.progress_label} {epoch + 1}/{self.num_epochs}"
            with progress_bar(label, self.num_iterations_per_epoch) as advance:
                for _ in range(self.num_iterations_per_epoch):
                    out = self.train_step(next(self.dataloader_train))
                    outputs.append(out)
                    advance(loss=float(out["loss"]))
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [
                    self.validation_step(next(self.dataloader_val))
                    for _ in range(self.num_val_iterations_per_epoch)
                ]
                self.on_validation_epoch_end(val)
            with quiet():
                self.on_epoch_end()
        with quiet():
            self.on_train_end()


# ---------------------------------------------------------------------------------
class ConstantLR:
    """A learning-rate 'scheduler' that keeps the optimizer's rate (nnU-Net calls ``step``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, epoch: int | None = None) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class FinetuneTrainer(_QuietLogMixin, nnUNetTrainer):
    """Fine-tuning with a stochastic head (see the module docstring)."""

    def configure(
        self,
        *,
        head: HeadConfig,
        loss: LossConfig,
        run_dir: Path,
        backbone_checkpoint: Path | None,
        seed: int,
        epochs: int,
        iterations: int,
        batch_size: int = 1,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        grad_clip: float = 1.0,
        val_every: int = 1,
        val_samples: int = 10,
        tile_step_size: float = 0.5,
        label: str = "finetune",
        annotator_segs: dict[str, list[Path | None]] | None = None,
        freeze_backbone: bool = False,
        decoder_dropout: float = 0.0,
    ) -> None:
        """Set the method and protocol (call once, before ``initialize``).

        ``freeze_backbone``: only the head's parameters are optimised; the
        backbone's get ``requires_grad = False`` and it runs in eval mode.
        ``decoder_dropout``: channel dropout rate in the decoder (MC-dropout
        variant; :func:`mobseg.nnunet.network.add_decoder_dropout`).
        ``annotator_segs`` (case -> ``[None, path_1, ...]`` from
        :func:`mobseg.nnunet.annotators.preprocess_annotators`) trains on a
        random annotator per case per iteration; None = the nnU-Net label.
        """
        self.head_cfg = head
        self.freeze_backbone = freeze_backbone
        self.decoder_dropout = decoder_dropout
        self.annotator_segs = annotator_segs
        self.loss_cfg = loss
        self.seed = seed
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations
        self.num_val_iterations_per_epoch = 0
        self.ft_batch_size = batch_size
        self.initial_lr = lr
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.val_every = max(1, val_every)
        self.val_samples = val_samples
        self.tile_step_size = tile_step_size
        self.backbone_checkpoint = backbone_checkpoint
        self.label = label
        if batch_size == 1:
            self.probabilistic_oversampling = True
        # our folders instead of nnU-Net's results folder
        old_log = Path(self.log_file)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.output_folder_base = self.output_folder = str(run_dir)
        self.log_file = str(run_dir / "training_log.txt")
        old_log.unlink(missing_ok=True)
        for folder in (old_log.parent, old_log.parent.parent):
            try:
                folder.rmdir()
            except OSError:
                pass
        self.history: list[dict[str, float]] = []
        self.best_val_dice = -math.inf
        self.best_epoch = -1
        self._resume_rng: dict[str, Any] | None = None
        self.stochastic_loss: Any = None

    # -- nnU-Net hooks ---------------------------------------------------------------
    def build_network_architecture(  # type: ignore[override]
        self,
        plans_manager: Any,
        configuration_manager: Any,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> StochasticUNet:
        return build_network(
            plans_manager,
            configuration_manager,
            num_input_channels,
            num_output_channels,
            self.head_cfg,
            enable_deep_supervision,
            decoder_dropout=getattr(self, "decoder_dropout", 0.0),
        )

    def _set_batch_size_and_oversample(self) -> None:
        if self.is_ddp:
            super()._set_batch_size_and_oversample()
        else:
            self.batch_size = self.ft_batch_size

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, ConstantLR]:
        params = self.network.parameters()
        if getattr(self, "freeze_backbone", False):
            net = getattr(self.network, "module", self.network)  # not yet wrapped in DDP here
            net = getattr(net, "_orig_mod", net)
            for p in net.backbone.parameters():
                p.requires_grad_(False)
            params = net.head.parameters()
        opt = torch.optim.AdamW(params, lr=self.initial_lr, weight_decay=self.weight_decay)
        return opt, ConstantLR(opt)

    def initialize(self) -> None:
        """Build the network (seeded), the optimizer, the losses; load the backbone."""
        from mobseg.core.losses import StochasticSegLoss

        seed_everything(self.seed)
        with quiet():
            super().initialize()
        # nnU-Net's Dice convention of this configuration (batch Dice or per sample)
        self.loss_cfg = dataclasses.replace(
            self.loss_cfg, batch_dice=bool(self.configuration_manager.batch_dice)
        )
        self.stochastic_loss = StochasticSegLoss(self.loss_cfg)
        if self.backbone_checkpoint is not None:
            load_backbone(self._net(), self.backbone_checkpoint)

    def _net(self) -> StochasticUNet:
        net = self.network.module if self.is_ddp else self.network
        return getattr(net, "_orig_mod", net)

    def get_tr_and_val_datasets(self) -> tuple[Any, Any]:
        """nnU-Net's datasets; the training one draws annotators when ``annotator_segs``."""
        from mobseg.nnunet.annotators import AnnotatorDataset

        ds_tr, ds_val = super().get_tr_and_val_datasets()
        if self.annotator_segs:
            ds_tr = AnnotatorDataset(ds_tr, self.annotator_segs)
        return ds_tr, ds_val

    def get_dataloaders(self) -> tuple[Any, Any]:
        """nnU-Net's loaders; with workers, each worker gets a seed derived from ``seed``."""
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        if get_allowed_n_proc_DA() == 0:
            return super().get_dataloaders()
        from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

        n = get_allowed_n_proc_DA()
        ds_scales = self._get_deep_supervision_scales()
        rot, dummy2d, initial_patch, mirror = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        lm = self.label_manager
        regions = lm.foreground_regions if lm.has_regions else None
        tr_t = self.get_training_transforms(
            self.configuration_manager.patch_size,
            rot,
            ds_scales,
            mirror,
            dummy2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels,
            regions=regions,
            ignore_label=lm.ignore_label,
        )
        val_t = self.get_validation_transforms(
            ds_scales,
            is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels,
            regions=regions,
            ignore_label=lm.ignore_label,
        )
        ds_tr, ds_val = self.get_tr_and_val_datasets()
        patch = self.configuration_manager.patch_size

        def loader(ds: Any, size: Any, transforms: Any) -> Any:
            return nnUNetDataLoader(
                ds,
                self.batch_size,
                size,
                patch,
                lm,
                oversample_foreground_percent=self.oversample_foreground_percent,
                transforms=transforms,
                probabilistic_oversampling=self.probabilistic_oversampling,
            )

        gen_tr = MultiThreadedAugmenter(
            loader(ds_tr, initial_patch, tr_t),
            None,
            n,
            max(6, n // 2),
            seeds=[self.seed * 1000 + i for i in range(n)],
            pin_memory=self.device.type == "cuda",
        )
        gen_val = MultiThreadedAugmenter(
            loader(ds_val, patch, val_t),
            None,
            1,
            3,
            seeds=[self.seed * 1000 + 999],
            pin_memory=self.device.type == "cuda",
        )
        next(gen_tr)
        next(gen_val)
        return gen_tr, gen_val

    # -- one step -------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One fine-tuning step (module docstring); returns the per-term losses."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        targets = target if isinstance(target, list) else [target]
        targets = [t.to(self.device, non_blocking=True) for t in targets]
        self.optimizer.zero_grad(set_to_none=True)
        if self.freeze_backbone:
            self._net().backbone.eval()  # no statistics of a normalisation layer move
        cuda = self.device.type == "cuda"
        ctx = torch.autocast("cuda", enabled=True) if cuda else _nullcontext()
        with ctx:
            outputs, dist = self.network(data, stochastic=True)
        terms = self.stochastic_loss(dist, targets[0].long())
        total = terms.total
        ds_value = torch.zeros((), device=self.device)
        if isinstance(outputs, (list, tuple)) and len(outputs) > 1:
            weights = self.loss.weight_factors
            inner = self.loss.loss
            for i in range(1, len(outputs)):
                if weights[i] == 0:
                    continue
                with ctx:
                    ds_value = ds_value + (weights[i] / weights[0]) * inner(outputs[i], targets[i])
            total = total + ds_value
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.optimizer.step()
        out = {k: _as_float(v) for k, v in terms.as_dict().items()}
        out["ds"] = float(ds_value.detach())
        out["total"] = float(total.detach())
        out["loss"] = out["total"]
        return out

    # -- whole-volume validation -------------------------------------------------------
    def validate(self) -> float:
        """Mean Dice of the MC-mean prediction over whole validation volumes (NaN-free mean)."""
        dice = whole_volume_dice(
            self._net(),
            self,
            samples=self.val_samples,
            point_mass=not self.head_cfg.stochastic,
            tile_step_size=self.tile_step_size,
        )
        self.network.train()
        return dice

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        net = self._net()
        ckpt = {
            "network_weights": net.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": (
                self.grad_scaler.state_dict() if self.grad_scaler is not None else None
            ),
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "mobseg": {
                "head": self.head_cfg.to_dict(),
                "loss": self.loss_cfg.to_dict(),
                "seed": self.seed,
                "history": self.history,
                "best_val_dice": self.best_val_dice,
                "best_epoch": self.best_epoch,
                "inference_mixing": self.head_cfg.mixing,
                "freeze_backbone": self.freeze_backbone,
                "decoder_dropout": self.decoder_dropout,
                "rng": rng_state(),
            },
        }
        atomic_torch_save(ckpt, filename)

    def load_checkpoint(self, filename_or_checkpoint: str | dict[str, Any]) -> None:
        """Resume: network, optimizer, epoch, history, best score and random states."""
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, dict):
            ckpt = filename_or_checkpoint
        else:
            ckpt = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        self._net().load_state_dict(ckpt["network_weights"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.current_epoch = int(ckpt["current_epoch"])
        self.logger.load_checkpoint(ckpt["logging"])
        self._best_ema = ckpt.get("_best_ema")
        self.inference_allowed_mirroring_axes = ckpt.get(
            "inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes
        )
        extra = ckpt.get("mobseg", {})
        self.history = list(extra.get("history", []))
        self.best_val_dice = float(extra.get("best_val_dice", -math.inf))
        self.best_epoch = int(extra.get("best_epoch", -1))
        self._resume_rng = extra.get("rng")

    # -- the loop --------------------------------------------------------------------
    def run_training(self, after_checkpoint: Callable[[int], None] | None = None) -> None:
        """Train from ``current_epoch`` to ``num_epochs``.

        Args:
            after_checkpoint: Called with the epoch after ``checkpoint_latest.pth``
                of that epoch is written (used by the stage for bookkeeping).
        """
        with quiet():
            self.on_train_start()
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        out_dir = Path(self.output_folder)
        for epoch in range(self.current_epoch, self.num_epochs):
            t0 = time.time()
            self.network.train()
            self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], epoch)
            steps: list[dict[str, float]] = []
            label = f"{self.label} {epoch + 1}/{self.num_epochs}"
            with progress_bar(label, self.num_iterations_per_epoch) as advance:
                for _ in range(self.num_iterations_per_epoch):
                    out = self.train_step(next(self.dataloader_train))
                    steps.append(out)
                    advance(loss=out["total"])
            lr = float(self.optimizer.param_groups[0]["lr"])
            row: dict[str, float] = {"epoch": float(epoch), "lr": lr}
            for col in LOSS_COLUMNS[2:10]:
                vals = [s[col] for s in steps if col in s]
                row[col] = float(np.mean(vals)) if vals else float("nan")
            last = epoch + 1 == self.num_epochs
            val = float("nan")
            if (epoch + 1) % self.val_every == 0 or last:
                val = self.validate()
            row["val_dice"] = val
            row["seconds"] = time.time() - t0
            self.history.append(row)
            self.current_epoch = epoch + 1
            if not math.isnan(val) and val > self.best_val_dice:
                self.best_val_dice, self.best_epoch = val, epoch
                self.save_checkpoint(str(out_dir / "checkpoint_best.pth"))
            self.save_checkpoint(str(out_dir / "checkpoint_latest.pth"))
            write_history(self.history, out_dir / "losses.csv")
            plot_history(self.history, out_dir / "progress.png", self.label)
            log.info(
                "%s epoch %d: loss %.4f, val Dice %s",
                self.label,
                epoch,
                row["total"],
                "-" if math.isnan(val) else f"{val:.4f}",
            )
            if after_checkpoint is not None:
                after_checkpoint(epoch)
        if not (out_dir / "checkpoint_best.pth").exists():
            self.save_checkpoint(str(out_dir / "checkpoint_best.pth"))
        self.save_checkpoint(str(out_dir / "checkpoint_final.pth"))
        (out_dir / "checkpoint_latest.pth").unlink(missing_ok=True)
        self.shutdown_loaders()

    def shutdown_loaders(self) -> None:
        """Stop background augmentation workers, if any."""
        for gen in (self.dataloader_train, self.dataloader_val):
            finish = getattr(gen, "_finish", None)
            if callable(finish):
                with quiet():
                    finish()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


# ---------------------------------------------------------------------------------
def whole_volume_dice(
    network: StochasticUNet,
    trainer: nnUNetTrainer,
    samples: int,
    point_mass: bool,
    tile_step_size: float = 0.5,
) -> float:
    """Mean foreground Dice of argmax E[p] over whole validation volumes.

    Computed on the preprocessed grid of each validation case (fold 0's
    ``val`` list) with :class:`HeadPredictor` (no mirroring) and argmax E[p]
    (exact for two classes, ``samples`` Monte-Carlo draws per voxel for more); Dice is
    2|S and G| / (|S| + |G|) for the foreground classes pooled (C = 2: the
    organ); cases where both are empty are left out of the mean. Returns NaN
    if every case is empty.
    """
    from mobseg.core.inference import voxel_maps
    from mobseg.nnunet.predictor import HeadPredictor

    was_ds = network.decoder.deep_supervision
    network.decoder.deep_supervision = False
    network.eval()
    predictor = HeadPredictor(
        tile_step_size=tile_step_size, use_mirroring=False, device=trainer.device
    )
    predictor.setup(
        network,
        trainer.plans_manager,
        trainer.configuration_manager,
        trainer.dataset_json,
        trainer.inference_allowed_mirroring_axes,
        point_mass=point_mass,
    )
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys)
    c = trainer.label_manager.num_segmentation_heads
    scores = []
    try:
        for key in val_keys:
            data, seg, _, _ = dataset.load_case(key)
            params = predictor.predict_parameters(np.asarray(data[:], dtype=np.float32))
            pred = voxel_maps(params, c, samples=samples).seg.numpy() > 0
            gt = np.asarray(seg[:])[0] > 0
            denom = pred.sum() + gt.sum()
            if denom == 0:
                continue
            scores.append(2.0 * np.logical_and(pred, gt).sum() / denom)
    finally:
        network.decoder.deep_supervision = was_ds
    return float(np.mean(scores)) if scores else float("nan")


def backbone_dice(trainer: nnUNetTrainer, samples: int = 1) -> float:
    """Whole-volume validation Dice of a pretrained nnU-Net network (no head)."""
    from mobseg.core.registry import build_head

    backbone = trainer.network.module if trainer.is_ddp else trainer.network
    backbone = getattr(backbone, "_orig_mod", backbone)
    head = build_head(
        HeadConfig("deterministic", num_classes=trainer.label_manager.num_segmentation_heads),
        feature_channels(backbone),
    ).to(trainer.device)
    wrapped = StochasticUNet(backbone, head)
    try:
        return whole_volume_dice(wrapped, trainer, samples=samples, point_mass=True)
    finally:
        wrapped._hook.remove()


# ---------------------------------------------------------------------------------
def write_history(rows: list[dict[str, float]], path: Path) -> None:
    """Write the per-epoch rows to CSV (columns :data:`LOSS_COLUMNS`), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(LOSS_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: (int(row[k]) if k == "epoch" else row.get(k, "")) for k in LOSS_COLUMNS}
        )
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def plot_history(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Plot the loss terms and the validation Dice per epoch to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    with plt.style.context("default"):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for col in ("total", "data", "ce", "dice", "kl", "orth", "entropy", "ds"):
            ys = [r.get(col, float("nan")) for r in rows]
            if all(math.isnan(y) or y == 0 for y in ys):
                continue
            ax1.plot(epochs, ys, marker="o", label=col)
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("loss")
        ax1.set_title(f"{title}: training loss terms")
        ax1.legend(fontsize=8)
        pts = [(int(r["epoch"]), r["val_dice"]) for r in rows if not math.isnan(r["val_dice"])]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="tab:green")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
        ax2.set_title("validation Dice (whole volumes, MC mean)")
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        try:
            fig.savefig(tmp, dpi=80)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(path, describe_os_error(exc)) from exc
        finally:
            plt.close(fig)
    publish(tmp, path)
