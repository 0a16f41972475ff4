"""Synthetic nnU-Net set-up for the benchmarks (``benchmarks/bench_train.py``,
``benchmarks/bench_predict.py``) and the tests' micro plans.

Builds an nnU-Net plans dict with one ``3d_fullres`` PlainConvUNet
configuration (no dataset needed) and a throw-away nnU-Net folder layout, so
that mobseg's real trainer and predictor classes run on synthetic patches.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


#: Intensity statistics of a CT-like foreground (CTNormalization's inputs).
CT_INTENSITY = {
    "max": 1000.0,
    "mean": 0.0,
    "median": 0.0,
    "min": -1000.0,
    "percentile_00_5": -1000.0,
    "percentile_99_5": 1000.0,
    "std": 100.0,
}


def plans_dict(
    features: tuple[int, ...],
    patch: int | tuple[int, int, int],
    batch_size: int = 1,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    transpose_forward: tuple[int, int, int] = (0, 1, 2),
    convs_per_stage: int = 2,
    median_shape: int = 128,
    name: str = "Dataset999_bench",
    plans_name: str = "benchPlans",
    intensity: dict[str, float] | None = None,
) -> dict[str, Any]:
    """nnU-Net plans with one 3d_fullres PlainConvUNet configuration (CT normalisation).

    Args:
        features: Features per encoder stage (the number of stages is its length).
        patch: Patch edge, or the three edges.
        batch_size: nnU-Net's batch size.
        spacing: Target spacing of the configuration (after the transpose).
        transpose_forward: nnU-Net's axis transpose.
        convs_per_stage: Convolutions per encoder and decoder stage.
        median_shape: Median image edge in voxels (informative only).
        name: Dataset name.
        plans_name: Plans identifier.
        intensity: Foreground intensity statistics; None = :data:`CT_INTENSITY`.
    """
    n = len(features)
    tf = list(transpose_forward)
    patch_size = [patch] * 3 if isinstance(patch, int) else list(patch)

    def resampling(is_seg: bool, order: int) -> dict[str, Any]:
        return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}

    return {
        "dataset_name": name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [median_shape] * 3,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": tf,
        "transpose_backward": [tf.index(i) for i in range(3)],
        "configurations": {
            "3d_fullres": {
                "data_identifier": f"{plans_name}_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": batch_size,
                "patch_size": patch_size,
                "median_image_size_in_voxels": [float(median_shape)] * 3,
                "spacing": list(spacing),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resampling(False, 3),
                "resampling_fn_seg_kwargs": resampling(True, 1),
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": resampling(False, 1),
                "architecture": {
                    "network_class_name": (
                        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
                    ),
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": list(features),
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n,
                        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                        "n_conv_per_stage": [convs_per_stage] * n,
                        "n_conv_per_stage_decoder": [convs_per_stage] * (n - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": dict(CT_INTENSITY if intensity is None else intensity)
        },
    }


def nnunet_sandbox() -> Path:
    """Point nnU-Net's folders into a temporary directory (with one dummy case file)."""
    root = Path(tempfile.mkdtemp(prefix="mobseg_bench_"))
    for name in ("raw", "preprocessed", "results"):
        (root / name).mkdir()
        os.environ[f"nnUNet_{name}"] = str(root / name)
    data = root / "preprocessed" / "Dataset999_bench" / "benchPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "dummy.b2nd").write_bytes(b"")  # lets nnU-Net infer its dataset class
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ.setdefault("nnUNet_compile", "false")
    return root


def managers(plans: dict[str, Any]) -> tuple[Any, Any]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plans))
    return pm, pm.get_configuration("3d_fullres")
