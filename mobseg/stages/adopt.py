"""Stage ``adopt``: an nnU-Net v2 model trained elsewhere becomes the organ's backbone.

Instead of ``mobseg pretrain``, ``run`` takes nnU-Net's results folder of a
trained model (``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG``),
checks it (:mod:`mobseg.nnunet.adopt`) and writes the ``pretrain/<organ>``
record that fine-tuning, prediction and evaluation read, so every later stage
works on the adopted model as on one mobseg pretrained.

Fine-tuning needs the organ's data preprocessed *with the model's plans*:
``run`` takes the dataset ``mobseg prepare`` wrote for the organ (any of its
sources; without one, the model's own raw dataset ``$nnUNet_raw/<dataset>``
when the user's ``nnUNet_raw`` holds it, prepared first as by
``mobseg prepare --source <that folder>``), copies the model's plans into
that dataset's preprocessed folder under the identifier
``mobsegAdopted_<plans>`` and runs nnU-Net's
preprocessing of the model's configuration on it (skipped when already done
for the same plans). A model with several labels gives a binary backbone for
the organ's label (:func:`mobseg.nnunet.adopt.binary_weights`), written to
``<workdir>/nnunet/adopted/<organ>/backbone.pth``.

Manifest key ``pretrain/<organ>`` (the key ``pretrain`` writes; adopting
replaces a pretrained backbone and the other way round); outputs as
``pretrain``'s plus ``adopted_from``, ``fold``, ``source_checkpoint``,
``label``, ``label_value``, ``num_classes``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mobseg.errors import ConfigurationError, MissingStageError
from mobseg.manifest import Manifest, StageRecord
from mobseg.nnunet.presets import get_preset
from mobseg.stages.keys import pretrain_key
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)

#: Prefix of the plans identifier under which an adopted model's plans are copied.
ADOPTED_PREFIX = "mobsegAdopted_"


@dataclass(frozen=True)
class AdoptParams:
    """Options of ``mobseg adopt``.

    Attributes:
        organ: Target structure, prepared before (its data fine-tunes the heads).
        model: nnU-Net's results folder of the model.
        fold: The fold whose checkpoint is used (``0``..``4`` or ``all``).
        checkpoint: The checkpoint's file name in ``fold_<fold>``.
        label: The organ's label in the model's dataset.json (name or value);
            needed for a model with several labels none of which is named
            like the organ.
        preset: Fine-tuning protocol of the later stages (``paper``, ``cpu``,
            ``micro``); the network is the model's.
    """

    organ: str
    model: Path
    fold: str = "0"
    checkpoint: str = "checkpoint_final.pth"
    label: str | None = None
    preset: str = "paper"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = str(Path(self.model).expanduser().resolve())
        return d


def run(ws: Workspace, params: AdoptParams, force: bool = False) -> StageRecord:
    """Check the model, preprocess the organ's data with its plans, record the backbone.

    Returns:
        The finished ``pretrain/<organ>`` record.

    Raises:
        MissingStageError: ``prepare`` has not finished for the organ.
        InvalidInputError: the model folder, a fold, a checkpoint or a file is
            missing or its weights do not fit its plans.
        ConfigurationError: an unknown preset, regions or several input
            channels, an unnamed label of a multi-label model, or a prepared
            dataset that is not binary.
    """
    from mobseg.nnunet.adopt import read_model_folder
    from mobseg.nnunet.context import prepared_dataset

    preset = get_preset(params.preset)
    fold: int | str = int(params.fold) if str(params.fold).isdigit() else str(params.fold)
    model = read_model_folder(params.model, params.organ, fold, params.checkpoint, params.label)
    manifest = Manifest(ws.manifest_path)
    try:
        prep_rec, data = prepared_dataset(manifest, params.organ)
    except MissingStageError:
        raw = users_raw_dataset(str(model.plans.get("dataset_name", "")))
        if raw is None:
            raise
        from mobseg.stages import prepare

        log.info("preparing %s from the model's nnU-Net raw dataset %s", params.organ, raw)
        prepare.run(ws, prepare.PrepareParams(organ=params.organ, source=str(raw)))
        prep_rec, data = prepared_dataset(manifest, params.organ)
    key = pretrain_key(params.organ)
    old = manifest.get(key)
    force = force or manifest.stale(old)
    if (
        old is not None
        and old.done
        and not force
        and old.params == params.to_dict()
        and old.outputs.get("source_digest") == _digest(model.checkpoint)
    ):
        return old

    from mobseg.nnunet.env import setup_nnunet

    setup_nnunet(ws, preset)
    inputs = {"prepare": prep_rec.key, "dataset_name": data.dataset_name}
    with manifest.running("pretrain", key, params.to_dict(), inputs, [prep_rec]) as outputs:
        outputs.update(_adopt(ws, params, model, data, preset))
    rec = manifest.get(key)
    assert rec is not None
    return rec


def users_raw_dataset(dataset_name: str) -> Path | None:
    """The model's own raw dataset, ``$nnUNet_raw/<dataset_name>``, when the user set
    ``nnUNet_raw`` and it holds the dataset (with ``dataset.json`` and ``imagesTr``)."""
    root = os.environ.get("nnUNet_raw")
    if not root or not dataset_name:
        return None
    path = Path(root) / dataset_name
    return path if (path / "dataset.json").is_file() and (path / "imagesTr").is_dir() else None


def _digest(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]


def _adopt(ws: Workspace, params: AdoptParams, model: Any, data: Any, preset: Any) -> dict:
    import torch

    from mobseg.nnunet.adopt import binary_weights, check_weights
    from mobseg.nnunet.planning import ensure_splits, extract_fingerprint, preprocess

    raw_json = json.loads((data.raw_dir / "dataset.json").read_text(encoding="utf-8"))
    fg = [n for n, v in raw_json.get("labels", {}).items() if v != 0]
    if len(fg) != 1:
        raise ConfigurationError(
            f"The prepared dataset of {params.organ} has labels {raw_json.get('labels')}; "
            "fine-tuning needs a binary one (background and the organ).",
            f"Rerun `mobseg prepare --organ {params.organ} --force`.",
        )
    ckpt = check_weights(model)
    state = ckpt["network_weights"]
    if model.num_classes > 2:
        log.info(
            "the model has %d classes: a binary backbone for label %r (%d)",
            model.num_classes,
            model.label,
            model.label_value,
        )
        state = binary_weights(state, model.label_value)

    # the model's plans, renamed for the prepared dataset and its own data folder
    plans_id = ADOPTED_PREFIX + model.plans_name
    plans = json.loads(json.dumps(model.plans))
    plans["dataset_name"] = data.dataset_name
    plans["plans_name"] = plans_id
    plans["configurations"][model.configuration]["data_identifier"] = (
        f"{plans_id}_{model.configuration}"
    )
    from nnunetv2.paths import nnUNet_preprocessed

    pre = Path(str(nnUNet_preprocessed)) / data.dataset_name
    pre.mkdir(parents=True, exist_ok=True)
    plans_file = pre / f"{plans_id}.json"
    plans_text = json.dumps(plans, indent=1)
    dataset_json_file = pre / "dataset.json"
    dataset_json_file.write_text(json.dumps(raw_json, indent=1), encoding="utf-8")
    ensure_splits(data.dataset_name, {"train": data.splits["train"], "val": data.splits["val"]})
    # nnU-Net's trainer copies the dataset's fingerprint into its output at the start
    fingerprint = pre / "dataset_fingerprint.json"
    if not fingerprint.is_file():
        own = model.folder / "dataset_fingerprint.json"
        if own.is_file():
            shutil.copyfile(own, fingerprint)
        else:
            extract_fingerprint(data.dataset_id, data.dataset_name, 1)
    marker = pre / f"mobseg_{plans_id}_{model.configuration}.json"
    digest = hashlib.sha256(
        (plans_text + json.dumps(raw_json, sort_keys=True)).encode()
    ).hexdigest()[:16]
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if done.get("digest") != digest or not Path(done.get("preprocessed_dir", "")).is_dir():
        marker.unlink(missing_ok=True)
        plans_file.write_text(plans_text, encoding="utf-8")
        num_processes = preset.num_processes or int(os.environ.get("nnUNet_def_n_proc", "1"))
        log.info("preprocessing %s with the model's plans", data.dataset_name)
        data_dir, cases = preprocess(
            data.dataset_id, data.dataset_name, plans_id, model.configuration, num_processes
        )
        marker.write_text(
            json.dumps({"digest": digest, "preprocessed_dir": str(data_dir), "cases": cases})
        )

    out_dir = ws.root / "nnunet" / "adopted" / params.organ
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = out_dir / "backbone.pth"
    torch.save(
        {
            "network_weights": state,
            "trainer_name": ckpt.get("trainer_name", model.trainer),
            "current_epoch": ckpt.get("current_epoch"),
            "mobseg_adopted": {
                "model": str(model.folder),
                "fold": model.fold,
                "checkpoint": str(model.checkpoint),
                "label": model.label,
                "label_value": model.label_value,
            },
        },
        backbone,
    )
    return {
        "dataset_name": data.dataset_name,
        "plans_identifier": plans_id,
        "plans_file": str(plans_file),
        "dataset_json": str(dataset_json_file),
        "configuration": model.configuration,
        "preset": params.preset,
        "checkpoint": str(backbone),
        "trainer_dir": str(model.folder),
        "trainer_class": model.trainer,
        "epochs": ckpt.get("current_epoch"),
        "val_dice": None,
        "adopted_from": str(model.folder),
        "fold": model.fold,
        "source_checkpoint": str(model.checkpoint),
        "source_digest": _digest(model.checkpoint),
        "label": model.label,
        "label_value": model.label_value,
        "num_classes": model.num_classes,
    }
