"""``mobseg predict`` with nnU-Net's conventions: ``--nnunet-names`` read by nnU-Net's own
evaluation, ``--dtype uint16`` maps, and the backbone checkpoint in
``nnUNetv2_predict_from_modelfolder``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_testlib import pretrained_micro_workspace
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.errors import ConfigurationError, UnknownNameError
from mobseg.manifest import Manifest
from mobseg.stages import predict
from mobseg.workspace import Workspace

runner = CliRunner()


@pytest.fixture(scope="module")
def micro_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return pretrained_micro_workspace(tmp_path_factory.mktemp("micro_ws"))


def _raw(ws: Workspace) -> Path:
    rec = Manifest(ws.manifest_path).require("prepare/pancreas", "x")
    return Path(rec.outputs["raw_dir"])


def _cli_predict(ws: Workspace, *args: str) -> None:
    base = ["--workdir", str(ws.root), "predict", "-m", "pancreas/backbone", "--device", "cpu"]
    result = runner.invoke(app, [*base, *args])
    assert result.exit_code == 0, result.output


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_storage_options_are_checked(micro_ws: Workspace, tmp_path: Path) -> None:
    base = predict.PredictParams("pancreas", backbone=True, device="cpu")
    with pytest.raises(ConfigurationError, match="NIfTI has no float16"):
        predict.run(micro_ws, predict.PredictParams(**{**base.__dict__, "dtype": "float16"}))
    with pytest.raises(UnknownNameError):
        predict.run(micro_ws, predict.PredictParams(**{**base.__dict__, "dtype": "int8"}))
    with pytest.raises(ConfigurationError, match="--nnunet-names needs -o/--out"):
        predict.run(micro_ws, predict.PredictParams(**{**base.__dict__, "nnunet_names": True}))
    # -o = -i with plain names: the segmentation <case>.nii.gz would replace the CT
    src = tmp_path / "in"
    src.mkdir()
    ct = next((_raw(micro_ws) / "imagesTs").glob("*_0000.nii.gz"))
    shutil.copy(ct, src / "a.nii.gz")
    params = {**base.__dict__, "input": src, "out": src, "nnunet_names": True}
    with pytest.raises(ConfigurationError, match="would overwrite the input CT"):
        predict.run(micro_ws, predict.PredictParams(**params))
    assert (src / "a.nii.gz").read_bytes() == ct.read_bytes()


def test_nnunet_names_are_read_by_nnunet_evaluation(micro_ws: Workspace, tmp_path: Path) -> None:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    raw = _raw(micro_ws)
    images, labels = raw / "imagesTs", raw / "labelsTs"
    out, plain = tmp_path / "nn", tmp_path / "plain"
    _cli_predict(micro_ws, "-i", str(images), "-o", str(out), "--nnunet-names", "--dtype", "uint16")
    _cli_predict(micro_ws, "-i", str(images), "-o", str(plain))
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in images.glob("*_0000.nii.gz"))
    assert cases
    # OUT holds nnU-Net's names only; the maps are in OUT/maps with their suffixes
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]
    for c in cases:
        for suffix in ("prob", "var", "entropy", "mi"):
            assert (out / "maps" / f"{c}_{suffix}.nii.gz").is_file()
        assert not (out / f"{c}_seg.nii.gz").exists()
    # nnU-Net's evaluation finds every case and agrees with Dice computed here
    result = compute_metrics_on_folder(
        str(labels), str(out), None, SimpleITKIO(), ".nii.gz", [1], num_processes=1, chill=False
    )
    per_case = {Path(r["prediction_file"]).name: r["metrics"][1] for r in result["metric_per_case"]}
    assert sorted(per_case) == [f"{c}.nii.gz" for c in cases]
    for c in cases:
        seg, ref = _array(out / f"{c}.nii.gz") > 0, _array(labels / f"{c}.nii.gz") > 0
        denom = seg.sum() + ref.sum()
        dice = 2 * (seg & ref).sum() / denom if denom else float("nan")
        np.testing.assert_allclose(per_case[f"{c}.nii.gz"]["Dice"], dice, rtol=1e-12)
        # the same segmentation as the plain run's <case>_seg.nii.gz
        np.testing.assert_array_equal(
            _array(out / f"{c}.nii.gz"), _array(plain / f"{c}_seg.nii.gz")
        )
    # a prediction equal to its reference: Dice 1 (where the segmentation is not empty)
    same = tmp_path / "same"
    shutil.copytree(out, same, ignore=shutil.ignore_patterns("maps"))
    result = compute_metrics_on_folder(
        str(same), str(out), None, SimpleITKIO(), ".nii.gz", [1], num_processes=1, chill=False
    )
    for r in result["metric_per_case"]:
        if r["metrics"][1]["n_ref"] > 0:
            assert r["metrics"][1]["Dice"] == 1.0
    # uint16 maps: within the documented bound of the float32 run's, and smaller on disk
    size16 = size32 = 0
    for c in cases:
        for suffix, bound in (("prob", 7.7e-6), ("var", 1.9e-6), ("entropy", 5.4e-6)):
            f16, f32 = out / "maps" / f"{c}_{suffix}.nii.gz", plain / f"{c}_{suffix}.nii.gz"
            assert nib.load(str(f16)).get_data_dtype() == np.uint16
            a16, a32 = _array(f16), _array(f32)
            assert a16.dtype == np.float32 and a32.dtype == np.float32
            assert np.abs(a16.astype(np.float64) - a32).max() <= bound
            size16 += f16.stat().st_size
            size32 += f32.stat().st_size
    # gzip shrinks float32 a little and 16-bit integers of noisy maps little more:
    # 0.56x measured on these micro-model maps (0.15x on the smooth maps of
    # tests/data/test_quantized.py)
    assert size16 < 0.6 * size32
    rec = next(
        r
        for r in Manifest(micro_ws.manifest_path).records().values()
        if r.outputs.get("pred_dir") == str(out)
    )
    assert rec.outputs["dtype"] == "uint16" and rec.outputs["maps_dir"] == str(out / "maps")
    assert rec.params["dtype"] == "uint16" and rec.params["nnunet_names"] is True


@pytest.fixture(scope="module")
def nnunet_prediction(micro_ws: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test split predicted by ``nnUNetv2_predict_from_modelfolder`` from the
    micro backbone's nnU-Net model folder (probabilities saved)."""
    exe = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
    exe = exe if exe.is_file() else Path(shutil.which("nnUNetv2_predict_from_modelfolder") or "")
    if not exe.is_file():
        pytest.skip("nnUNetv2_predict_from_modelfolder is not installed")
    pre = Manifest(micro_ws.manifest_path).require("pretrain/pancreas", "x").outputs
    model = Path(pre["trainer_dir"]).parent
    out = tmp_path_factory.mktemp("nnunet_pred")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}
    cmd = [str(exe), "-i", str(_raw(micro_ws) / "imagesTs"), "-o", str(out), "-m", str(model)]
    cmd += ["-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities"]
    done = subprocess.run([*cmd, "--disable_progress_bar"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.mark.slow
def test_backbone_checkpoint_loads_in_nnunet_predict_from_modelfolder(
    micro_ws: Workspace, nnunet_prediction: Path
) -> None:
    pre = Manifest(micro_ws.manifest_path).require("pretrain/pancreas", "x").outputs
    model = Path(pre["trainer_dir"]).parent
    assert (model / "plans.json").is_file() and (model / "dataset.json").is_file()
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer"  # a class nnU-Net finds by name
    images = _raw(micro_ws) / "imagesTs"
    for ct in images.glob("*_0000.nii.gz"):
        c = ct.name.removesuffix("_0000.nii.gz")
        seg = sitk.ReadImage(str(nnunet_prediction / f"{c}.nii.gz"))
        assert seg.GetSize() == sitk.ReadImage(str(ct)).GetSize()
        assert np.load(nnunet_prediction / f"{c}.npz")["probabilities"].shape[0] == 2


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="open: nnU-Net's probabilities differ from mobseg's backbone prediction by up to "
    "0.16 on the micro model (0.25% of the seg voxels); nnU-Net gives a constant "
    "0.7310586 = sigmoid(1) in regions where mobseg's E[p] varies",
)
def test_nnunet_predicts_the_backbone_like_mobseg(
    micro_ws: Workspace, nnunet_prediction: Path, tmp_path: Path
) -> None:
    images = _raw(micro_ws) / "imagesTs"
    out_mob = tmp_path / "mobseg"
    _cli_predict(micro_ws, "-i", str(images), "-o", str(out_mob))
    for ct in images.glob("*_0000.nii.gz"):
        c = ct.name.removesuffix("_0000.nii.gz")
        # nnU-Net's softmax foreground probability (reader's array order) vs mobseg's E[p]
        prob_nn = np.load(nnunet_prediction / f"{c}.npz")["probabilities"][1]
        np.testing.assert_allclose(prob_nn, _array(out_mob / f"{c}_prob.nii.gz"), atol=1e-4)
        np.testing.assert_array_equal(
            _array(nnunet_prediction / f"{c}.nii.gz"), _array(out_mob / f"{c}_seg.nii.gz")
        )
