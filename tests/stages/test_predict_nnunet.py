"""``mobseg predict`` with nnU-Net's conventions: ``--nnunet-names`` read by nnU-Net's own
evaluation, ``--dtype uint16`` maps, and the backbone checkpoint in
``nnUNetv2_predict_from_modelfolder``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

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


# nnU-Net's predictor accumulates the Gaussian-weighted logits of the tiles in
# float16 (torch.half accumulators) with a float16 Gaussian whose outer weights
# are subnormal, down to 2**-24. Where a voxel's weight sum is that small, the
# stitched logit is half(l * g) / g: l rounded to a multiple of 2**-24 / g, an
# integer at g = 2**-24 (hence nnU-Net's constant sigmoid(1) = 0.7310586 where
# mobseg's E[p] varies). mobseg stitches in float32. With float32 accumulators
# nnU-Net gives mobseg's numbers (docs/own-data.md).
SMALLEST_NORMAL_HALF = 2.0**-14


class _TorchWithFloat32Half(types.ModuleType):
    """``torch`` as seen by nnU-Net's predictor module, with ``torch.half`` = float32."""

    half = torch.float32

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _nnunet_predictor(ws: Workspace) -> Any:
    """nnU-Net's own predictor of the micro backbone's model folder (its defaults, CPU)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = Path(
        Manifest(ws.manifest_path).require("pretrain/pancreas", "x").outputs["trainer_dir"]
    )
    nn = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    nn.initialize_from_trained_model_folder(str(model.parent), use_folds=(0,))
    assert nn.tile_step_size == 0.5 and nn.use_mirroring and nn.use_gaussian
    return nn


def _mobseg_backbone_predictor(ws: Workspace) -> Any:
    """mobseg's HeadPredictor of the backbone, built as ``mobseg predict`` builds it."""
    from mobseg.core.config import HeadConfig
    from mobseg.core.registry import build_head
    from mobseg.nnunet.context import pretrained_model
    from mobseg.nnunet.network import (
        StochasticUNet,
        build_backbone,
        feature_channels,
        load_backbone,
        load_checkpoint_file,
    )
    from mobseg.nnunet.predictor import HeadPredictor

    model = pretrained_model(Manifest(ws.manifest_path), "pancreas")
    pm, cm, dataset_json = model.load()
    backbone = build_backbone(pm, cm, 1, 2, deep_supervision=False)
    head = build_head(HeadConfig("deterministic", num_classes=2), feature_channels(backbone))
    network = StochasticUNet(backbone, head)
    ckpt = load_checkpoint_file(model.checkpoint)
    load_backbone(network, ckpt)
    predictor = HeadPredictor(device="cpu")
    mirror = ckpt.get("inference_allowed_mirroring_axes")
    predictor.setup(network.eval(), pm, cm, dataset_json, mirror, point_mass=True)
    return predictor


def _weight_sums(nn: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """nnU-Net's float16 sum of Gaussian tile weights per voxel of a preprocessed case."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(nn.configuration_manager.patch_size)
    assert all(s >= p for s, p in zip(shape, patch, strict=True))  # no padding here
    gaussian = compute_gaussian(patch, 1.0 / 8, 10, device=torch.device("cpu"))
    assert gaussian.dtype == torch.float16 and gaussian.min().item() == 2.0**-24
    total = torch.zeros(shape, dtype=torch.float16)
    for sl in nn._internal_get_sliding_window_slicers(shape):
        total[sl[1:]] += gaussian
    return total


def test_backbone_equals_nnunet_predictor_with_float32_accumulation(
    micro_ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    nn = _nnunet_predictor(micro_ws)
    ours = _mobseg_backbone_predictor(micro_ws)
    ct = next((_raw(micro_ws) / "imagesTs").glob("*_0000.nii.gz"))
    pm, cm = nn.plans_manager, nn.configuration_manager
    data, _, props = cm.preprocessor_class(verbose=False).run_case(
        [str(ct)], None, pm, cm, nn.dataset_json
    )
    # the same preprocessing, weights and mirror axes on both sides
    assert pm.plans == ours.plans_manager.plans
    mine, _, _ = ours.configuration_manager.preprocessor_class(verbose=False).run_case(
        [str(ct)], None, ours.plans_manager, ours.configuration_manager, ours.dataset_json
    )
    np.testing.assert_array_equal(mine, data)
    theirs_sd, mine_sd = nn.network.state_dict(), ours.network.backbone.state_dict()
    assert sorted(theirs_sd) == sorted(mine_sd)
    for k, v in theirs_sd.items():
        torch.testing.assert_close(mine_sd[k], v, rtol=0, atol=0)
    assert tuple(nn.allowed_mirroring_axes) == tuple(ours.allowed_mirroring_axes) == (0, 1, 2)

    x = torch.from_numpy(data).float()
    par = ours.predict_parameters(data)
    assert par.shape == (2, *data.shape[1:])
    assert torch.equal(par[1], torch.zeros_like(par[1]))  # a point mass: s^2 = 0
    stock = nn.predict_sliding_window_return_logits(x).float()
    with monkeypatch.context() as mp:
        mp.setattr(predict_from_raw_data, "torch", _TorchWithFloat32Half("torch"))
        exact = nn.predict_sliding_window_return_logits(x).float()
    # nnU-Net's logits accumulated in float32: mobseg's m = l1 - l0
    torch.testing.assert_close(par[0], exact[1] - exact[0], rtol=0, atol=1e-5)
    # nnU-Net's stock float16 logits: integers where the weight sum is 2**-24,
    # within float16 rounding where the sum is a normal float16
    w = _weight_sums(nn, tuple(data.shape[1:]))
    tiny, normal = w == 2.0**-24, w >= SMALLEST_NORMAL_HALF
    assert tiny.any() and normal.any()
    assert torch.equal(stock[:, tiny], stock[:, tiny].round())
    assert (stock[:, tiny] - exact[:, tiny]).abs().max() > 0.1  # the cause of the old xfail
    bound = 3 * 2.0**-11 * exact[:, normal].abs() + 2.0**-24 / w[normal].float()
    assert torch.all((stock[:, normal] - exact[:, normal]).abs() <= bound)

    # export: nnU-Net's (resample the logits, softmax, uncrop) of the float32
    # logits vs mobseg predict's maps from the CLI
    seg_nn, prob_nn = convert_predicted_logits_to_segmentation_with_correct_shape(
        exact, pm, cm, nn.label_manager, props, return_probabilities=True
    )
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(ct, src / ct.name)
    _cli_predict(micro_ws, "-i", str(src), "-o", str(tmp_path / "out"))
    case = ct.name.removesuffix("_0000.nii.gz")
    prob = _array(tmp_path / "out" / f"{case}_prob.nii.gz")
    assert prob.shape == prob_nn.shape[1:] == sitk.ReadImage(str(ct)).GetSize()[::-1]
    np.testing.assert_allclose(prob, prob_nn[1], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(_array(tmp_path / "out" / f"{case}_seg.nii.gz"), seg_nn)


@pytest.mark.slow
def test_nnunet_predicts_the_backbone_like_mobseg(
    micro_ws: Workspace, nnunet_prediction: Path, tmp_path: Path
) -> None:
    """``nnUNetv2_predict_from_modelfolder`` as shipped vs ``mobseg predict``: equal up to
    float16 rounding wherever nnU-Net's float16 weight sums are normal numbers at every
    voxel the export interpolates from (see the comment above the float32 test)."""
    from scipy import ndimage

    nn = _nnunet_predictor(micro_ws)
    pm, cm = nn.plans_manager, nn.configuration_manager
    images = _raw(micro_ws) / "imagesTs"
    out_mob = tmp_path / "mobseg"
    _cli_predict(micro_ws, "-i", str(images), "-o", str(out_mob))
    for ct in images.glob("*_0000.nii.gz"):
        c = ct.name.removesuffix("_0000.nii.gz")
        data, _, props = cm.preprocessor_class(verbose=False).run_case(
            [str(ct)], None, pm, cm, nn.dataset_json
        )
        # the micro geometry: no crop, no transpose, every axis resampled 2x (10 -> 20 mm)
        shape = tuple(data.shape[1:])
        full = tuple(props["shape_before_cropping"])
        assert [list(b) for b in props["bbox_used_for_cropping"]] == [[0, n] for n in full]
        assert list(pm.transpose_forward) == [0, 1, 2]
        assert full == tuple(2 * n for n in shape)
        # linear resampling reads the preprocessed voxels within one of i // 2
        normal = (_weight_sums(nn, shape) >= SMALLEST_NORMAL_HALF).numpy()
        trusted = ndimage.binary_erosion(normal, np.ones((3, 3, 3)), border_value=1)
        trusted = trusted.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        assert 0.2 < trusted.mean() < 0.9
        # nnU-Net's softmax foreground probability (reader's array order) vs mobseg's E[p]
        prob_nn = np.load(nnunet_prediction / f"{c}.npz")["probabilities"][1]
        prob = _array(out_mob / f"{c}_prob.nii.gz")
        assert prob.shape == prob_nn.shape == full
        np.testing.assert_allclose(prob_nn[trusted], prob[trusted], rtol=0, atol=5e-4)
        seg_nn, seg = _array(nnunet_prediction / f"{c}.nii.gz"), _array(out_mob / f"{c}_seg.nii.gz")
        decided = trusted & (np.abs(prob - 0.5) > 1e-3)
        np.testing.assert_array_equal(seg_nn[decided], seg[decided])
