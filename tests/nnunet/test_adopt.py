"""Checking an nnU-Net results folder before adopting it (mobseg/nnunet/adopt.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from nnunet_testlib import managers, micro_plans, model_folder

from mobseg.errors import ConfigurationError, InvalidInputError
from mobseg.nnunet.adopt import binary_weights, check_weights, read_model_folder
from mobseg.nnunet.network import build_backbone

LABELS3 = {"background": 0, "liver": 1, "pancreas": 2}


def test_reads_a_binary_model(tmp_path: Path) -> None:
    m = read_model_folder(model_folder(tmp_path), "pancreas")
    assert m.trainer == "nnUNetTrainer" and m.plans_name == "microPlans"
    assert m.configuration == "3d_fullres"
    assert (m.label, m.label_value, m.num_classes) == ("pancreas", 1, 2)
    assert m.checkpoint.name == "checkpoint_final.pth" and m.checkpoint.parent.name == "fold_0"
    ckpt = check_weights(m)
    assert ckpt["current_epoch"] == 7
    # a binary model's single label is the organ's, whatever its name
    other = read_model_folder(
        model_folder(tmp_path / "b", {"background": 0, "Pancreas tumour": 1}), "pancreas"
    )
    assert other.label == "Pancreas tumour"


def test_missing_fold_names_the_folds_present(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    with pytest.raises(InvalidInputError, match=r"no fold 3 \(folds present: fold_0\)"):
        read_model_folder(folder, "pancreas", fold=3)


def test_missing_checkpoint_names_those_present(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    with pytest.raises(InvalidInputError, match=r"no checkpoint_best.pth \(it has checkpoint_fin"):
        read_model_folder(folder, "pancreas", checkpoint="checkpoint_best.pth")


def test_missing_files_and_bad_folder_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_model_folder(tmp_path / "nope", "pancreas")
    odd = tmp_path / "just_a_folder"
    odd.mkdir()
    with pytest.raises(InvalidInputError, match="TRAINER__PLANS__CONFIGURATION"):
        read_model_folder(odd, "pancreas")
    folder = model_folder(tmp_path / "x")
    (folder / "plans.json").unlink()
    with pytest.raises(InvalidInputError, match="no plans.json"):
        read_model_folder(folder, "pancreas")
    folder = model_folder(tmp_path / "y", name="nnUNetTrainer__microPlans__2d")
    with pytest.raises(ConfigurationError, match="no configuration '2d'"):
        read_model_folder(folder, "pancreas")


def test_multi_label_model_needs_the_organs_label(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, LABELS3)
    assert read_model_folder(folder, "pancreas").label_value == 2  # named like the organ
    with pytest.raises(ConfigurationError, match=r"segments 2 labels .* none is named 'spleen'"):
        read_model_folder(folder, "spleen")
    assert read_model_folder(folder, "spleen", label="liver").label_value == 1
    assert read_model_folder(folder, "spleen", label="2").label == "pancreas"
    with pytest.raises(ConfigurationError, match="no label 'kidney'"):
        read_model_folder(folder, "spleen", label="kidney")


def test_regions_are_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, {"background": 0, "whole": [1, 2], "core": 2}, classes=3)
    with pytest.raises(ConfigurationError, match="regions"):
        read_model_folder(folder, "pancreas", label="core")


def test_mismatched_architecture_is_refused(tmp_path: Path) -> None:
    # weights of a wider network than the plans describe
    wide = micro_plans()
    wide["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [
        8,
        16,
        32,
    ]
    folder = model_folder(tmp_path, plans=wide)
    (folder / "plans.json").write_text(json.dumps(micro_plans()))
    with pytest.raises(InvalidInputError, match=r"not the network of microPlans/3d_fu.*shape"):
        check_weights(read_model_folder(folder, "pancreas"))
    # a two-class checkpoint under a three-label dataset.json
    folder = model_folder(tmp_path / "c", LABELS3, classes=2)
    with pytest.raises(InvalidInputError, match="with 3 classes"):
        check_weights(read_model_folder(folder, "pancreas"))


def test_binary_weights_give_the_models_own_organ_logits(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, LABELS3, seed=3)
    model = read_model_folder(folder, "pancreas")
    state = check_weights(model)["network_weights"]
    binary = binary_weights(state, model.label_value)
    pm, cm = managers(micro_plans())
    three = build_backbone(pm, cm, 1, 3, deep_supervision=False).eval()
    two = build_backbone(pm, cm, 1, 2, deep_supervision=False).eval()
    three.load_state_dict(state)
    two.load_state_dict(binary)  # strict: the binary weights are a whole 2-class network
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        full, pair = three(x), two(x)
    torch.testing.assert_close(pair, full[:, [0, 2]])
    # every weight outside the segmentation layers is the model's own
    same = [k for k in state if ".seg_layers." not in k]
    assert same and all(torch.equal(binary[k], state[k]) for k in same)
