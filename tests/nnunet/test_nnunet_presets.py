"""Presets and the derived small plan."""

from __future__ import annotations

import dataclasses

import pytest

from mobseg.errors import UnknownNameError
from mobseg.nnunet.planning import derive_small_configuration
from mobseg.nnunet.presets import PRESET_NAMES, PlanSpec, get_preset


def test_paper_preset_is_the_published_protocol() -> None:
    p = get_preset("paper")
    assert p.plan.planner == "nnUNetPlannerResEncL"
    assert p.plan.configuration == "3d_fullres"
    assert not p.plan.derived
    # nnU-Net's default training for the backbone
    assert (p.pretrain_epochs, p.pretrain_iterations, p.pretrain_val_iterations) == (1000, 250, 50)
    # the paper's fine-tuning: 20 x 250 at batch size 1, validation every epoch
    assert (p.finetune_epochs, p.finetune_iterations, p.finetune_batch_size) == (20, 250, 1)
    assert p.val_every == 1
    assert p.pretrain_lr is None  # nnU-Net's own initial learning rate


def test_cpu_and_micro_presets_are_small_derived_plans() -> None:
    for name in ("cpu", "micro"):
        p = get_preset(name)
        assert p.plan.derived
        assert p.plan.planner == "ExperimentPlanner"
        assert max(p.plan.features_per_stage) <= 64
        assert p.plan.patch_size <= 32
        assert p.plan.spacing_factor > 1
        assert p.n_proc_da == 0 and p.num_processes == 1
    assert get_preset("micro").pretrain_epochs < get_preset("cpu").pretrain_epochs
    assert get_preset("cpu").pretrain_lr == 3e-2


def test_presets_are_overridable_dataclasses() -> None:
    p = dataclasses.replace(get_preset("cpu"), finetune_epochs=3)
    assert p.finetune_epochs == 3 and p.name == "cpu"
    assert set(PRESET_NAMES) == {"paper", "cpu", "micro"}


def test_unknown_preset_suggests_the_closest_name() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'paper'"):
        get_preset("papr")


def _config(median: list[float]) -> dict:
    return {
        "patch_size": [128, 128, 128],
        "batch_size": 2,
        "median_image_size_in_voxels": median,
        "architecture": {
            "network_class_name": "x.ResidualEncoderUNet",
            "arch_kwargs": {
                "n_stages": 6,
                "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
                "conv_bias": True,
            },
        },
    }


def test_derived_configuration_shrinks_network_and_patch() -> None:
    spec = PlanSpec(
        derived=True,
        features_per_stage=(8, 16, 32, 64),
        conv_per_stage=2,
        conv_per_stage_decoder=1,
        patch_size=32,
        batch_size=3,
    )
    original = _config([100.0, 43.0, 20.0])
    out = derive_small_configuration(original, spec)
    # total stride 8: axis 1 caps at 48 -> 32; axis 2 median 20 -> ceil to 24; never below 16
    assert out["patch_size"] == [32, 32, 24]
    assert out["batch_size"] == 3
    kw = out["architecture"]["arch_kwargs"]
    assert out["architecture"]["network_class_name"].endswith("PlainConvUNet")
    assert kw["n_stages"] == 4 and kw["features_per_stage"] == [8, 16, 32, 64]
    assert kw["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kw["n_conv_per_stage"] == [2] * 4 and kw["n_conv_per_stage_decoder"] == [1] * 3
    assert "n_blocks_per_stage" not in kw
    assert kw["conv_bias"] is True  # untouched settings are kept
    assert original["patch_size"] == [128, 128, 128]  # input not modified


def test_derived_patch_never_smaller_than_twice_the_stride() -> None:
    spec = PlanSpec(derived=True, features_per_stage=(4, 8, 16), patch_size=32)
    out = derive_small_configuration(_config([5.0, 5.0, 5.0]), spec)
    assert out["patch_size"] == [8, 8, 8]


def test_derived_plan_needs_two_stages() -> None:
    with pytest.raises(ValueError, match="2 stages"):
        derive_small_configuration(_config([32.0] * 3), PlanSpec(features_per_stage=(8,)))
