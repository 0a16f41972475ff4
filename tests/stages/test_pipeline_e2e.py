"""End to end through the CLI: prepare -> pretrain -> finetune (5 methods) -> predict.

A 6-case 32^3 phantom, nnU-Net planning and preprocessing, the ``micro`` plan,
two epochs of two iterations everywhere. Checks the contract of SPEC section
7: every prediction file exists on the input CT's exact grid, probabilities
lie in [0, 1], variances are >= 0, exactly 0 for the deterministic
fine-tuning and the backbone, and > 0 somewhere for the four stochastic heads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.manifest import Manifest

#: method -> the run's tag with --samples 3 (k is part of a stochastic run's identity)
METHODS = {
    "deterministic": "deterministic",
    "diagonal": "diagonal-k3",
    "lowrank": "lowrank-r4-k3",
    "single-basis": "single-basis-r4-k3",
    "mob": "mob-b2-r4-p2-k3",
}


def _ok(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output, result.exception)


@pytest.mark.slow
def test_prepare_pretrain_finetune_predict(tmp_path: Path) -> None:
    runner = CliRunner()
    w = ["--workdir", str(tmp_path / "work"), "--quiet"]
    organ = ["--organ", "pancreas"]
    _ok(runner, [*w, "prepare", *organ, "--source", "phantom", "--num-cases", "6", "--size", "32"])
    _ok(runner, [*w, "pretrain", *organ, "--preset", "micro", "--device", "cpu"])
    _ok(runner, [*w, "predict", *organ, "--method", "backbone", "--device", "cpu"])
    small = ["--rank", "4", "--bases", "2", "--partitions", "2"]
    for method, tag in METHODS.items():
        _ok(runner, [*w, "finetune", *organ, "--method", method, *small, "--samples", "3"])
        _ok(runner, [*w, "predict", *organ, "--run", tag, "--samples", "8"])

    manifest = Manifest(tmp_path / "work" / "manifest.json")
    prep = manifest.require("prepare/pancreas", "x").outputs
    raw_ts = Path(prep["raw_dir"]) / "imagesTs"
    for tag in ("backbone", *METHODS.values()):
        rec = manifest.require(f"predict/pancreas/{tag}/seed0", "x")
        pred = Path(rec.outputs["pred_dir"])
        assert rec.outputs["cases"], tag
        max_var = 0.0
        for case in rec.outputs["cases"]:
            ref = sitk.ReadImage(str(raw_ts / f"{case}_0000.nii.gz"))
            arrays = {}
            for suffix in ("seg", "prob", "var", "entropy", "mi"):
                img = sitk.ReadImage(str(pred / f"{case}_{suffix}.nii.gz"))
                assert img.GetSize() == ref.GetSize(), (tag, suffix)
                assert img.GetSpacing() == ref.GetSpacing(), (tag, suffix)
                assert img.GetOrigin() == ref.GetOrigin(), (tag, suffix)
                assert img.GetDirection() == ref.GetDirection(), (tag, suffix)
                arrays[suffix] = sitk.GetArrayFromImage(img)
            assert arrays["seg"].dtype == np.uint8 and set(np.unique(arrays["seg"])) <= {0, 1}
            prob, var = arrays["prob"], arrays["var"]
            assert prob.dtype == np.float32 and var.dtype == np.float32
            assert prob.min() >= 0.0 and prob.max() <= 1.0, tag
            assert var.min() >= 0.0, tag
            assert (arrays["entropy"] >= 0).all() and (arrays["mi"] >= 0).all()
            # segmentation = argmax of the mean probability
            np.testing.assert_array_equal(arrays["seg"] == 1, prob > 0.5)
            max_var = max(max_var, float(var.max()))
        if tag in ("backbone", "deterministic"):
            assert max_var == 0.0, tag
        else:
            assert max_var > 0.0, tag
