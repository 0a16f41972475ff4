"""Study jobs that the stages' public ``run`` functions cannot express exactly.

- :func:`evaluate_backbone`: evaluate *only* the backbone's test-split
  prediction (``predict/<organ>/backbone/seed0``). ``evaluate.run`` with
  ``head=None`` would evaluate every predicted run of that seed, which in a
  parallel study duplicates other jobs' work.
- :func:`predict_outside`: predict a CT outside the test split (the demo's
  real CT) under its own key ``predict/<organ>/<tag>/seed<S>/<name>``
  (``predict.run(..., key=...)``); under the run's own key it would replace
  the test-split prediction's record that ``evaluate`` reads.

Both reuse the stages' own functions for the work, so the files and records
are the same as the stages write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import predict_key
from mobseg.stages.predict import BACKBONE_SEED, BACKBONE_TAG
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

    :func:`mobseg.stages.predict.run` recording under ``job.key``, so the
    test-split prediction of the same run keeps its own record.

    Raises:
        ValueError: ``params.input`` or ``params.out`` is missing.
        MissingStageError: the fine-tuned run or the backbone is missing.
        InvalidInputError: the input is missing or unreadable.
    """
    from mobseg.stages import predict

    params = job.params
    if params.input is None or params.out is None:
        raise ValueError("An outside prediction needs params.input and params.out.")
    return predict.run(ws, params, force=force, key=job.key)


__all__ = ["OutsidePrediction", "evaluate_backbone", "predict_outside"]
