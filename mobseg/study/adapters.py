"""Study jobs that the stages' public ``run`` functions cannot express exactly.

- :func:`evaluate_backbone`: evaluate *only* the backbone's test-split
  prediction (``predict/<organ>/backbone/seed0``). ``evaluate.run`` with
  ``head=None`` would evaluate every predicted run of that seed, which in a
  parallel study duplicates other jobs' work.
- :func:`predict_outside`: predict a CT outside the test split (the demo's
  real CT) under its own key ``predict/<organ>/<tag>/seed<S>/<name>``.
  ``predict.run`` with ``--input`` records under the run's own key and would
  replace the test-split prediction's record that ``evaluate`` reads.

Both reuse the stages' own functions for the work, so the files and records
are the same as the stages write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import (
    finetune_command,
    finetune_key,
    predict_command,
    predict_key,
)
from mobseg.stages.predict import BACKBONE_SEED, BACKBONE_TAG  # noqa: E402
from mobseg.workspace import Workspace


def evaluate_backbone(ws: Workspace, params: Any, force: bool = False) -> StageRecord:
    """Evaluate the backbone's test-split prediction of ``params.organ``.

    Args:
        ws: The workdir.
        params: :class:`mobseg.stages.evaluate.EvaluateParams` with ``organ``
            (``head`` and ``seed`` are ignored).
        force: Redo a finished evaluation.

    Returns:
        The record ``evaluate/<organ>/backbone/seed0``.

    Raises:
        MissingStageError: the backbone's prediction has not finished.
    """
    from mobseg.stages import evaluate

    manifest = Manifest(ws.manifest_path)
    key = predict_key(params.organ, BACKBONE_TAG, BACKBONE_SEED)
    pred = manifest.require(key, f"mobseg predict --organ {params.organ} --backbone")
    return evaluate._evaluate_run(ws, manifest, pred, params, force)


@dataclass(frozen=True)
class OutsidePrediction:
    """A prediction on CTs outside the test split, recorded under ``key``.

    Attributes:
        key: Manifest key, ``predict/<organ>/<tag>/seed<S>/<name>``.
        params: :class:`mobseg.stages.predict.PredictParams` with ``input`` and ``out``.
    """

    key: str
    params: Any

    @property
    def organ(self) -> str:
        return str(self.params.organ)


def predict_outside(ws: Workspace, job: OutsidePrediction, force: bool = False) -> StageRecord:
    """Predict ``job.params.input`` into ``job.params.out`` with the run of ``job.params``.

    Mirrors ``mobseg.stages.predict.run`` (same model lookup, nnU-Net set-up
    and :func:`mobseg.stages.predict.predict_files`) but records under
    ``job.key``. A finished record with the same parameters is returned
    without work unless ``force``.

    Raises:
        MissingStageError: the fine-tuned run or the backbone is missing.
        InvalidInputError: the input is missing or unreadable.
    """
    from mobseg.device import resolve_device
    from mobseg.nnunet.context import pretrained_model
    from mobseg.nnunet.env import setup_nnunet
    from mobseg.nnunet.presets import get_preset
    from mobseg.stages.predict import predict_files, resolve_inputs

    params = job.params
    if params.input is None or params.out is None:
        raise ValueError("An outside prediction needs params.input and params.out.")
    manifest = Manifest(ws.manifest_path)
    old = manifest.get(job.key)
    force = force or manifest.stale(old)
    if old is not None and old.done and not force and old.params == params.to_dict():
        return old
    model = pretrained_model(manifest, params.organ)
    if params.backbone:
        source, checkpoint = model.record, model.checkpoint
    else:
        source = manifest.require(
            finetune_key(params.organ, params.tag, params.seed),
            finetune_command(params.organ, params.head.method, params.seed),
        )
        checkpoint = Path(source.outputs["checkpoint_best"])
    inputs = resolve_inputs(params, None, [])
    device = resolve_device(params.device)
    preset = get_preset(model.preset)
    setup_nnunet(ws, preset)
    record_inputs = {"model": source.key, "checkpoint": str(checkpoint), "input": str(params.input)}
    with manifest.running("predict", job.key, params.to_dict(), record_inputs, [source]) as outputs:
        outputs.update(
            predict_files(
                model,
                checkpoint,
                params,
                inputs,
                Path(params.out),
                device,
                preset.tile_step_size,
                force,
            )
        )
    return manifest.require(job.key, predict_command(params.organ, params.head.method, params.seed))


__all__ = ["OutsidePrediction", "evaluate_backbone", "predict_outside"]
