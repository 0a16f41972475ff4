"""An nnU-Net v2 model trained elsewhere, checked and turned into mobseg's backbone.

nnU-Net writes a trained model as ``nnUNet_results/DatasetXXX_Name/
TRAINER__PLANS__CONFIGURATION/`` holding ``plans.json``, ``dataset.json`` and
``fold_<f>/checkpoint_final.pth`` (``checkpoint_best.pth`` too). This module
reads such a folder, checks that its parts agree (the configuration exists in
the plans, the checkpoint's weights are exactly the network the plans
describe, one input channel, plain labels rather than regions), picks the
organ's label, and writes a *binary* backbone checkpoint: for a two-class
model the weights as they are; for a model with more labels the
segmentation layers keep the rows of the background and of the organ's
label, so the binary logit at the start of fine-tuning is the model's own
organ-versus-background logit. Fine-tuning a head over all labels (C > 2) is
not supported yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobseg.errors import ConfigurationError, InvalidInputError

#: The part of a state-dict key that marks nnU-Net's 1x1x1 segmentation layers.
SEG_LAYERS = ".seg_layers."


@dataclass(frozen=True)
class ModelFolder:
    """A checked nnU-Net results folder.

    Attributes:
        folder: ``.../TRAINER__PLANS__CONFIGURATION``.
        trainer: Trainer class name (from the folder's name).
        plans_name: Plans identifier.
        configuration: Configuration name.
        fold: The fold whose checkpoint is used.
        checkpoint: The checkpoint file.
        plans: ``plans.json``.
        dataset_json: ``dataset.json``.
        labels: Foreground label name -> value.
        label: The organ's label name in ``labels``.
        label_value: Its value.
    """

    folder: Path
    trainer: str
    plans_name: str
    configuration: str
    fold: int | str
    checkpoint: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    labels: dict[str, int]
    label: str
    label_value: int

    @property
    def num_classes(self) -> int:
        """C, the classes of the model's output (background included)."""
        return len(self.labels) + 1


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidInputError(
            f"The model folder has no {what}.",
            path=str(path),
            hint="Give nnU-Net's results folder of the model, "
            "nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION.",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{what} cannot be read ({exc}).", path=str(path)) from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"{what} is not a JSON object.", path=str(path))
    return data


def _labels(dataset_json: dict[str, Any], path: Path) -> dict[str, int]:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InvalidInputError("dataset.json has no labels.", path=str(path))
    out: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ConfigurationError(
                f"The model is trained on regions (label {name!r} = {list(value)}); "
                "mobseg adopts models with plain labels only."
            )
        if int(value) != 0:
            out[str(name)] = int(value)
    if sorted(out.values()) != list(range(1, len(out) + 1)):
        raise InvalidInputError(
            f"dataset.json's labels are not 0..{len(out)}: {labels}.", path=str(path)
        )
    return out


def _pick_label(labels: dict[str, int], organ: str, label: str | None) -> str:
    """The organ's label name: ``label`` if given, else the organ's name, else the only one."""
    by_lower = {name.lower(): name for name in labels}
    if label is not None:
        if label.lower() in by_lower:
            return by_lower[label.lower()]
        if label.isdigit() and int(label) in labels.values():
            return next(n for n, v in labels.items() if v == int(label))
    else:
        for wanted in (organ, organ.replace("_", " ")):
            if wanted.lower() in by_lower:
                return by_lower[wanted.lower()]
        if len(labels) == 1:
            return next(iter(labels))
    names = ", ".join(f"{n!r} ({v})" for n, v in labels.items())
    if label is not None:
        raise ConfigurationError(
            f"The model has no label {label!r}; its labels are {names}.",
            "Give --label with one of these names or values.",
        )
    raise ConfigurationError(
        f"The model segments {len(labels)} labels ({names}) and none is named {organ!r}.",
        "Name the organ's label with --label NAME (mobseg fine-tunes a binary head for it).",
    )


def read_model_folder(
    folder: str | Path,
    organ: str,
    fold: int | str = 0,
    checkpoint: str = "checkpoint_final.pth",
    label: str | None = None,
) -> ModelFolder:
    """Check an nnU-Net results folder and pick the organ's label.

    Args:
        folder: ``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION``.
        organ: The organ mobseg will fine-tune for.
        fold: nnU-Net fold (``0``..``4`` or ``all``).
        checkpoint: File name inside ``fold_<fold>``.
        label: The organ's label name (or value) in dataset.json; needed when
            the model has several labels and none is named like the organ.

    Raises:
        InvalidInputError: a missing folder, file, fold or checkpoint, or
            unreadable JSON.
        ConfigurationError: the configuration is not in the plans, the model
            has several input channels or regions, or the organ's label is
            not named.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InvalidInputError(
            "The model folder does not exist.",
            path=str(root),
            hint="Give nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION.",
        )
    parts = root.name.split("__")
    if len(parts) != 3 or not all(parts):
        raise InvalidInputError(
            f"{root.name!r} is not an nnU-Net model folder name (TRAINER__PLANS__CONFIGURATION).",
            path=str(root),
            hint="Give the folder inside nnUNet_results/DatasetXXX_Name/, e.g. "
            "nnUNetTrainer__nnUNetPlans__3d_fullres.",
        )
    trainer, plans_name, configuration = parts
    plans = _read_json(root / "plans.json", "plans.json")
    dataset_json = _read_json(root / "dataset.json", "dataset.json")
    if configuration not in plans.get("configurations", {}):
        have = ", ".join(sorted(plans.get("configurations", {})))
        raise ConfigurationError(
            f"The plans have no configuration {configuration!r} (they have {have})."
        )
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    if len(channels) != 1:
        raise ConfigurationError(
            f"The model takes {len(channels)} input channels ({channels}); "
            "mobseg works with single-channel CT models."
        )
    fold_dir = root / f"fold_{fold}"
    if not fold_dir.is_dir():
        present = sorted(p.name for p in root.glob("fold_*") if p.is_dir())
        raise InvalidInputError(
            f"The model has no fold {fold}"
            + (f" (folds present: {', '.join(present)})." if present else " (no fold_* folder)."),
            path=str(fold_dir),
            hint="Choose one with --fold.",
        )
    ckpt = fold_dir / checkpoint
    if not ckpt.is_file():
        present = sorted(p.name for p in fold_dir.glob("*.pth"))
        raise InvalidInputError(
            f"Fold {fold} has no {checkpoint}"
            + (f" (it has {', '.join(present)})." if present else " (no checkpoint at all)."),
            path=str(ckpt),
            hint="Choose one with --checkpoint, or finish the training.",
        )
    labels = _labels(dataset_json, root / "dataset.json")
    name = _pick_label(labels, organ, label)
    return ModelFolder(
        folder=root,
        trainer=trainer,
        plans_name=plans_name,
        configuration=configuration,
        fold=fold,
        checkpoint=ckpt,
        plans=plans,
        dataset_json=dataset_json,
        labels=labels,
        label=name,
        label_value=labels[name],
    )


def check_weights(model: ModelFolder) -> dict[str, Any]:
    """Load the checkpoint and check its weights against the plans' network.

    Returns:
        The checkpoint dict (``network_weights`` with prefixes stripped).

    Raises:
        InvalidInputError: unreadable checkpoint, or weights that do not fit
            the network the plans describe (names the first differences).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from mobseg.nnunet.network import _strip_prefixes, build_backbone, load_checkpoint_file

    ckpt = load_checkpoint_file(model.checkpoint)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise InvalidInputError(
            "The checkpoint holds no 'network_weights' (not an nnU-Net v2 checkpoint).",
            path=str(model.checkpoint),
        )
    state = _strip_prefixes(ckpt["network_weights"])
    pm = PlansManager(model.plans)
    cm = pm.get_configuration(model.configuration)
    net = build_backbone(pm, cm, 1, model.num_classes, deep_supervision=True)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"shape {', '.join(shapes[:3])}" if shapes else "",
            )
            if part
        )
        raise InvalidInputError(
            f"The checkpoint's weights are not the network of {model.plans_name}/"
            f"{model.configuration} with {model.num_classes} classes ({detail}).",
            path=str(model.checkpoint),
            hint="Give the plans.json and dataset.json the model was trained with.",
        )
    ckpt["network_weights"] = state
    return ckpt


def binary_weights(state: dict[str, torch.Tensor], label_value: int) -> dict[str, torch.Tensor]:
    """The weights of a binary model for one label of a C-class one.

    Every segmentation layer keeps output rows 0 (background) and
    ``label_value``; all other weights are unchanged.
    """
    out = {}
    for key, value in state.items():
        if SEG_LAYERS in key and value.shape[0] > 2:
            out[key] = value[[0, label_value]].clone()
        else:
            out[key] = value
    return out
