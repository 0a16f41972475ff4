"""Stage ``finetune``: stochastic heads on the pretrained backbone (SPEC sections 3-4).

``run`` builds :class:`mobseg.nnunet.trainer.FinetuneTrainer` for the method
of ``params.head``, loads the pretrained backbone strictly, and trains all
parameters with the paper's protocol (AdamW, lr 1e-4, weight decay 1e-4,
gradient clipping, k = 5 samples, batch size 1, 20 x 250 iterations for the
``paper`` preset; fewer for ``cpu`` and ``micro``). ``deterministic`` is the
same fine-tuning without a stochastic head: the control that separates "more
training" from "covariance model".

The run's tag is :meth:`mobseg.core.config.RunConfig.tag` of :func:`run_config`:
the head's readable tag (``mob-b3-r16``) plus a suffix for every option of
the loss and training that differs from its default (``-lse``, ``-k8``,
``-anti``, ``-annall``, ``-frozen``, ``-x<hash>``), so runs that differ in any option that
changes the model never share a folder or a key. Epochs, iterations and the
validation interval count as defaults when they equal the preset's.

``freeze_backbone`` trains the head alone: the backbone's parameters get no
gradient, are left out of the optimizer (so weight decay does not touch them
either) and the backbone runs in eval mode; its deep-supervision outputs then
add a constant to the loss.

``decoder_dropout = p > 0`` is the MC-dropout variant of the backbone:
channel dropout of rate p after every convolution of the decoder
(:func:`mobseg.nnunet.network.add_decoder_dropout`), active during the
training steps and off for validation; fine-tuned with the same protocol
(the deterministic head gives the MC-dropout baseline). The checkpoint
records the rate (``mobseg.decoder_dropout``) for the predictor.

``annotators = "all"`` trains on a random annotator's mask per case per
iteration (:mod:`mobseg.nnunet.annotators`); the masks are preprocessed with
nnU-Net's preprocessing of the backbone once per organ.

The run folder ``<workdir>/runs/<organ>/<tag>/seed<S>/`` holds
``checkpoint_latest.pth`` (every epoch), ``checkpoint_best.pth`` (best
whole-volume validation Dice), ``checkpoint_final.pth``, ``losses.csv``,
``progress.png`` and nnU-Net's ``training_log.txt``. An interrupted run (even
``kill -9``) resumes from ``checkpoint_latest.pth``.

Manifest key ``finetune/<organ>/<tag>/seed<S>``; outputs: ``run_dir``,
``checkpoint_best``, ``checkpoint_final``, ``losses_csv``, ``progress_png``,
``best_val_dice``, ``best_epoch``, ``inference_mixing``, ``annotators``, ``epochs``,
``preset``.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobseg.core.config import HeadConfig, LossConfig, RunConfig, check_annotators
from mobseg.errors import ConfigurationError
from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import finetune_key
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneParams:
    """Options of ``mobseg finetune``.

    Attributes:
        organ: Target structure, pretrained before.
        head: The method and its hyper-parameters.
        loss: Samples per step and loss weights.
        seed: Seed of the run (torch, numpy, random, data loaders).
        preset: ``paper``, ``cpu`` or ``micro``; None = the backbone's preset
            (a different one is refused).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        epochs: Override the preset's epochs (paper: 20).
        iterations: Override the preset's iterations per epoch (paper: 250).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        val_every: Override the preset's validation interval (epochs).
        annotators: ``0`` (the nnU-Net label) or ``all`` (a random annotator
            per case per iteration; sources with several annotators only).
        freeze_backbone: Train the head only (tag suffix ``-frozen``).
        decoder_dropout: MC-dropout variant: channel dropout of this rate in
            the decoder during training (tag suffix ``-mcd<rate>``); 0 = none.
    """

    organ: str
    head: HeadConfig = field(default_factory=lambda: HeadConfig("mob"))
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    preset: str | None = None
    device: str = "auto"
    epochs: int | None = None
    iterations: int | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-4
    val_every: int | None = None
    annotators: str = "0"
    freeze_backbone: bool = False
    decoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_annotators(self.annotators)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for name in ("freeze_backbone", "decoder_dropout"):
            if not d[name]:  # records written before the option stay equal
                del d[name]
        d["head"], d["loss"] = self.head.to_dict(), self.loss.to_dict()
        return d


def run_config(params: FinetuneParams, preset: Any) -> RunConfig:
    """The identity of the run of ``params`` under ``preset`` (the backbone's).

    Epochs, iterations and validation interval equal to the preset's are the
    defaults (None), so ``--epochs 20`` at the paper preset is the paper's run.
    """

    def own(value: int | None, default: int) -> int | None:
        return None if value is None or value == default else value

    return RunConfig(
        head=params.head,
        loss=params.loss,
        lr=params.lr,
        weight_decay=params.weight_decay,
        epochs=own(params.epochs, preset.finetune_epochs),
        iterations=own(params.iterations, preset.finetune_iterations),
        val_every=own(params.val_every, preset.val_every),
        annotators=params.annotators,
        freeze_backbone=params.freeze_backbone,
        decoder_dropout=params.decoder_dropout,
    )


def run_tag(params: FinetuneParams, preset: str | Any) -> str:
    """The tag of the run of ``params`` (``preset``: the backbone's, a name or a Preset)."""
    from mobseg.nnunet.presets import get_preset

    return run_config(params, get_preset(preset) if isinstance(preset, str) else preset).tag()


def run(ws: Workspace, params: FinetuneParams, force: bool = False) -> StageRecord:
    """Fine-tune the backbone of ``params.organ`` with the head ``params.head``.

    Returns:
        The finished record (without work if it was done already).

    Raises:
        MissingStageError: ``pretrain`` has not finished for the organ.
        ConfigurationError: another preset than the backbone's, or a bad option.
    """
    from mobseg.device import check_device, check_seed, resolve_device
    from mobseg.nnunet.context import pretrained_model
    from mobseg.nnunet.presets import get_preset

    check_seed(params.seed)
    check_device(params.device)

    for name in ("epochs", "iterations", "val_every"):
        value = getattr(params, name)
        if value is not None and value < 1:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if params.lr <= 0 or params.weight_decay < 0:
        raise ConfigurationError("--lr must be > 0 and --weight-decay >= 0.")
    if params.preset is not None:
        get_preset(params.preset)
    manifest = Manifest(ws.manifest_path)
    model = pretrained_model(manifest, params.organ, params.preset)
    preset = get_preset(model.preset)
    tag = run_tag(params, preset)
    key = finetune_key(params.organ, tag, params.seed)
    old = manifest.get(key)
    force = force or manifest.stale(old)  # the backbone was retrained: start afresh
    if old is not None and old.done and not force:
        return old
    device = resolve_device(params.device)
    run_dir = ws.run_dir(params.organ, tag, params.seed)
    if force and run_dir.exists():
        shutil.rmtree(run_dir)

    from mobseg.nnunet.env import setup_nnunet

    setup_nnunet(ws, preset)
    segs = annotator_segs(ws, manifest, params.organ, model) if params.annotators == "all" else None
    inputs = {"pretrain": model.record.key, "backbone_checkpoint": str(model.checkpoint)}
    with manifest.running("finetune", key, params.to_dict(), inputs, [model.record]) as outputs:
        outputs.update(_finetune(params, preset, model, run_dir, device, tag, segs))
    rec = manifest.get(key)
    assert rec is not None
    return rec


def annotator_segs(
    ws: Workspace, manifest: Manifest, organ: str, model: Any
) -> dict[str, list[Path | None]]:
    """The training cases' annotators 1..K-1, preprocessed like the backbone's labels.

    Cached under ``<workdir>/data/<organ>/annotators/<configuration>_<plans hash>/``.

    Raises:
        ConfigurationError: a training case has a single annotator (the source
            has no extra annotators, e.g. TotalSegmentator).
    """
    from mobseg.data.references import reference_masks
    from mobseg.nnunet.annotators import cache_dir, preprocess_annotators
    from mobseg.nnunet.context import prepared_dataset

    prep, data = prepared_dataset(manifest, organ)
    pm, cm, dataset_json = model.load()
    channels = sorted(dataset_json.get("channel_names", {"0": ""}), key=int)
    images, masks = {}, {}
    for case in data.splits["train"]:
        found = reference_masks(ws, organ, case)
        if len(found) < 2:
            raise ConfigurationError(
                f"--annotators all needs several annotators per case, but case {case} of "
                f"{organ} (source {prep.outputs.get('source')}) has one.",
                "Train on the label (--annotators 0), or prepare a source with several "
                "annotators (--source phantom).",
            )
        masks[case] = found
        images[case] = [data.raw_dir / "imagesTr" / f"{case}_{int(c):04d}.nii.gz" for c in channels]
    out = cache_dir(ws.data_dir(organ) / "annotators", model.plans_file, model.configuration)
    log.info("preprocessing the annotators of %d training cases into %s", len(masks), out)
    return preprocess_annotators(pm, cm, dataset_json, images, masks, out)


def _finetune(
    params: FinetuneParams,
    preset: Any,
    model: Any,
    run_dir: Path,
    device: str,
    tag: str,
    annotator_segs: dict[str, list[Path | None]] | None = None,
) -> dict[str, Any]:
    import torch

    from mobseg.nnunet.trainer import FinetuneTrainer, make_trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    latest = run_dir / "checkpoint_latest.pth"
    final = run_dir / "checkpoint_final.pth"
    best = run_dir / "checkpoint_best.pth"
    epochs = params.epochs or preset.finetune_epochs
    resume = latest.exists() or final.exists()
    plans = model.plans()
    _, _, dataset_json = model.load()
    trainer = make_trainer(
        FinetuneTrainer, plans, model.configuration, dataset_json, device, resume=resume
    )
    trainer.configure(
        head=params.head,
        loss=params.loss,
        run_dir=run_dir,
        backbone_checkpoint=None if resume else model.checkpoint,
        seed=params.seed,
        epochs=epochs,
        iterations=params.iterations or preset.finetune_iterations,
        batch_size=preset.finetune_batch_size,
        lr=params.lr,
        weight_decay=params.weight_decay,
        grad_clip=preset.grad_clip,
        val_every=params.val_every or preset.val_every,
        val_samples=preset.val_samples,
        tile_step_size=preset.tile_step_size,
        label=f"{params.organ} {tag} seed{params.seed}",
        annotator_segs=annotator_segs,
        freeze_backbone=params.freeze_backbone,
        decoder_dropout=params.decoder_dropout,
    )
    if final.exists():
        trainer.load_checkpoint(str(final))
        if trainer.current_epoch < epochs:
            trainer.run_training()
    else:
        if latest.exists():
            log.info("resuming %s from %s", tag, latest)
            trainer.load_checkpoint(str(latest))
        else:
            trainer.initialize()
        trainer.run_training()
    meta = torch.load(best, map_location="cpu", weights_only=False).get("mobseg", {})
    return {
        "run_dir": str(run_dir),
        "checkpoint_best": str(best),
        "checkpoint_final": str(final),
        "losses_csv": str(run_dir / "losses.csv"),
        "progress_png": str(run_dir / "progress.png"),
        "best_val_dice": (
            float(trainer.best_val_dice) if math.isfinite(trainer.best_val_dice) else None
        ),
        "best_epoch": int(meta.get("best_epoch", trainer.best_epoch)),
        "inference_mixing": params.head.mixing,
        "annotators": params.annotators,
        "freeze_backbone": params.freeze_backbone,
        "decoder_dropout": params.decoder_dropout,
        "epochs": int(trainer.current_epoch),
        "preset": model.preset,
        "tag": tag,
        "device": device,
    }
