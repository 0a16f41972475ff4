"""What later stages need from the prepare and pretrain records.

Reads the manifest records of ``prepare/<organ>`` and ``pretrain/<organ>`` and
turns them into paths and nnU-Net objects, with one clear error per missing
piece.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobseg.errors import ConfigurationError, InvalidInputError
from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import prepare_command, prepare_key, pretrain_command, pretrain_key


@dataclass(frozen=True)
class PreparedDataset:
    """The outputs of ``prepare/<organ>`` that nnU-Net needs.

    Attributes:
        dataset_id: nnU-Net dataset id.
        dataset_name: ``DatasetXXX_<organ>``.
        raw_dir: nnU-Net raw dataset folder.
        splits: ``{"train": [...], "val": [...], "test": [...]}`` case ids.
    """

    dataset_id: int
    dataset_name: str
    raw_dir: Path
    splits: dict[str, list[str]]


def prepared_dataset(manifest: Manifest, organ: str) -> tuple[StageRecord, PreparedDataset]:
    """The finished prepare record of ``organ`` and its dataset.

    Raises:
        MissingStageError: prepare has not finished.
        InvalidInputError: its outputs are missing or unreadable.
    """
    rec = manifest.require(prepare_key(organ), prepare_command(organ))
    out = rec.outputs
    try:
        splits_file = Path(out["splits_json"])
        splits = json.loads(splits_file.read_text(encoding="utf-8"))
        data = PreparedDataset(
            dataset_id=int(out["dataset_id"]),
            dataset_name=str(out["dataset_name"]),
            raw_dir=Path(out["raw_dir"]),
            splits={k: [str(c) for c in splits.get(k, [])] for k in ("train", "val", "test")},
        )
    except (KeyError, OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(
            f"The prepare record of {organ} is incomplete or its split file is unreadable "
            f"({type(exc).__name__}: {exc}).",
            hint=f"Run `{prepare_command(organ)} --force`.",
        ) from exc
    return rec, data


@dataclass(frozen=True)
class PretrainedModel:
    """The outputs of ``pretrain/<organ>``.

    Attributes:
        record: The manifest record.
        preset: Preset name the backbone was trained with.
        plans_file: nnU-Net plans JSON.
        dataset_json: nnU-Net ``dataset.json`` (preprocessed copy).
        configuration: nnU-Net configuration name.
        checkpoint: The backbone's final checkpoint.
    """

    record: StageRecord
    preset: str
    plans_file: Path
    dataset_json: Path
    configuration: str
    checkpoint: Path

    def load(self) -> tuple[Any, Any, dict[str, Any]]:
        """nnU-Net's PlansManager, ConfigurationManager and the dataset.json dict."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pm = PlansManager(str(self.plans_file))
        cm = pm.get_configuration(self.configuration)
        return pm, cm, json.loads(self.dataset_json.read_text(encoding="utf-8"))

    def plans(self) -> dict[str, Any]:
        return json.loads(self.plans_file.read_text(encoding="utf-8"))


def pretrained_model(manifest: Manifest, organ: str, preset: str | None = None) -> PretrainedModel:
    """The finished pretrain record of ``organ``.

    Args:
        manifest: The manifest.
        organ: Target structure.
        preset: The preset asked for by a later stage, or None for "the
            pretrain's". A different preset is refused (one preset per organ).

    Raises:
        MissingStageError: pretrain has not finished.
        ConfigurationError: ``preset`` differs from the pretrain's preset.
        InvalidInputError: its files are missing.
    """
    rec = manifest.require(pretrain_key(organ), pretrain_command(organ))
    out = rec.outputs
    used = str(out.get("preset", rec.params.get("preset", "")))
    if preset is not None and preset != used:
        raise ConfigurationError(
            f"The backbone of {organ} was pretrained with preset {used!r}, not {preset!r}; "
            "a working directory holds one preset per organ.",
            f"Use --preset {used}, or rerun `{pretrain_command(organ)} --preset {preset} --force`.",
        )
    model = PretrainedModel(
        record=rec,
        preset=used,
        plans_file=Path(out["plans_file"]),
        dataset_json=Path(out["dataset_json"]),
        configuration=str(out["configuration"]),
        checkpoint=Path(out["checkpoint"]),
    )
    for path in (model.plans_file, model.dataset_json, model.checkpoint):
        if not path.is_file():
            raise InvalidInputError(
                "A file of the pretrained backbone is missing.",
                path=str(path),
                hint=f"Rerun `{pretrain_command(organ)} --force`.",
            )
    return model
