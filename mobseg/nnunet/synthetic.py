"""Synthetic nnU-Net set-up for the benchmarks (``benchmarks/bench_train.py``,
``benchmarks/bench_predict.py``).

Builds an nnU-Net plans dict with one ``3d_fullres`` PlainConvUNet
configuration (no dataset needed) and a throw-away nnU-Net folder layout, so
that mobseg's real trainer and predictor classes run on synthetic patches.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any

DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def plans_dict(features: tuple[int, ...], patch: int, batch_size: int = 1) -> dict[str, Any]:
    """nnU-Net plans with one 3d_fullres PlainConvUNet configuration."""
    n = len(features)
    return {
        "dataset_name": "Dataset999_bench",
        "plans_name": "benchPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [128, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "benchPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": batch_size,
                "patch_size": [patch] * 3,
                "median_image_size_in_voxels": [128.0] * 3,
                "spacing": [1.0, 1.0, 1.0],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0},
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
                        "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1),
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
            "0": {
                "max": 1000.0,
                "mean": 0.0,
                "median": 0.0,
                "min": -1000.0,
                "percentile_00_5": -1000.0,
                "percentile_99_5": 1000.0,
                "std": 100.0,
            }
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


def peak_mb() -> float:
    """Peak resident memory (VmHWM) of this process in MB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
