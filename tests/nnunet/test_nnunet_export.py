"""Export of stitched parameters to the input CT's grid (real CT via ``totalseg_example``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_testlib import DATASET_JSON, managers, micro_plans

from mobseg.core.config import HeadConfig
from mobseg.data.nifti import Geometry
from mobseg.nnunet.export import derive_maps, export_parameters, parameters_to_original_grid
from mobseg.nnunet.network import build_backbone
from mobseg.stages.predict import PredictParams, predict_files


def test_derive_maps_from_parameters() -> None:
    """Two voxels: (m, s^2) = (0.8, 0) and (-1, 4); maps against scipy's quadrature."""
    from scipy import integrate, special, stats

    params = np.array([[0.8, -1.0], [0.0, 4.0]], dtype=np.float32).reshape(2, 2, 1, 1)
    out = derive_maps(params, 2)
    assert out["seg"].dtype == np.uint8 and out["seg"].ravel().tolist() == [1, 0]
    p0 = special.expit(0.8)
    assert out["prob"][0, 0, 0] == pytest.approx(p0, abs=1e-6)
    assert out["var"][0, 0, 0] == 0.0 and out["mi"][0, 0, 0] == 0.0
    e = [
        integrate.quad(lambda x, f=f: f(-1 + 2 * x) * stats.norm.pdf(x), -12, 12)[0]
        for f in (special.expit, lambda d: special.expit(d) ** 2)
    ]
    assert out["prob"][1, 0, 0] == pytest.approx(e[0], abs=1e-6)
    assert out["var"][1, 0, 0] == pytest.approx(e[1] - e[0] ** 2, abs=1e-6)
    assert out["var"][1, 0, 0] <= 4 / 16
    np.testing.assert_array_equal(out["logit_mean"], params[0])
    np.testing.assert_array_equal(out["logit_var"], params[1])


def test_derive_maps_multiclass_gives_vectors() -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(3, 2, 2, 2)).astype(np.float32) * 3
    cov = np.zeros((6, 2, 2, 2), np.float32)  # a point mass: upper triangle of zeros
    out = derive_maps(np.concatenate([mu, cov]), 3, samples=5)
    assert out["prob"].shape == (2, 2, 2, 2) and out["var"].shape == (2, 2, 2, 2)
    np.testing.assert_array_equal(out["seg"], mu.argmax(0))
    assert (out["var"] == 0).all() and "logit_mean" not in out


_PROPS = {
    "spacing": [3.0, 3.0, 3.0],
    "shape_before_cropping": (8, 6, 7),
    "bbox_used_for_cropping": [[0, 8], [1, 5], [2, 7]],
    "shape_after_cropping_and_before_resampling": (8, 4, 5),
}


def test_uncrop_and_untranspose_on_synthetic_properties() -> None:
    pm, cm = managers(micro_plans(transpose_forward=(2, 0, 1)))
    # nnU-Net transposes first, then crops: shape and bbox are in the transposed
    # frame (x, z, y). Original array (z, y, x) = (6, 7, 8); crop z 1:5, y 2:7, x 0:8.
    crop = np.zeros((2, 8, 4, 5), np.float32)
    crop[0] = np.arange(8 * 4 * 5, dtype=np.float32).reshape(8, 4, 5) / 10 - 8
    crop[1] = 0.5
    full = parameters_to_original_grid(crop, _PROPS, pm, cm, 2)
    assert full.shape == (2, 6, 7, 8)
    # inside the crop: the transposed-back values; outside: certain background
    np.testing.assert_array_equal(full[0, 1:5, 2:7, :], crop[0].transpose(1, 2, 0))
    assert (full[0, 0] == -100).all() and (full[1, 0] == 0).all() and (full[1, 5] == 0).all()
    with pytest.raises(ValueError, match=r"shape \(2, x, y, z\)"):
        parameters_to_original_grid(crop[:1], _PROPS, pm, cm, 2)


def test_parameters_are_resampled_not_the_moments() -> None:
    """The invariant of issue 11: on a finer grid, between a certain organ voxel and a
    certain background voxel, Var[p] stays <= s^2 / 16 (here 0), never 0.25."""
    pm, cm = managers(micro_plans(spacing=(2.0, 2.0, 2.0)))
    params = np.zeros((2, 6, 6, 6), np.float32)
    params[0] = np.where(np.arange(6)[:, None, None] < 3, 12.0, -12.0)  # a sharp edge
    props = {
        "spacing": [1.0, 1.0, 1.0],
        "shape_before_cropping": (12, 12, 12),
        "bbox_used_for_cropping": [[0, 12], [0, 12], [0, 12]],
        "shape_after_cropping_and_before_resampling": (12, 12, 12),
    }
    full = parameters_to_original_grid(params, props, pm, cm, 2)
    maps = derive_maps(full, 2)
    assert maps["var"].max() == 0.0 and maps["mi"].max() == 0.0
    # E[p] is the sigmoid of the interpolated logit difference, like nnU-Net's softmax
    np.testing.assert_allclose(
        maps["prob"], 1 / (1 + np.exp(-full[0].astype(np.float64))), atol=1e-6
    )
    assert 0.5 < maps["prob"][5].min() < 0.999 and 0.001 < maps["prob"][6].max() < 0.5


def test_sample_labels_go_back_like_the_moments() -> None:
    """Same crop and transpose as the moments; background outside the crop."""
    from mobseg.nnunet.export import labels_to_original_grid

    pm, cm = managers(micro_plans(transpose_forward=(2, 0, 1)))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(3, 8, 4, 5)).astype(np.uint8)
    props = {
        "spacing": [3.0, 3.0, 3.0],
        "shape_before_cropping": (8, 6, 7),
        "bbox_used_for_cropping": [[0, 8], [1, 5], [2, 7]],
        "shape_after_cropping_and_before_resampling": (8, 4, 5),
    }
    full = labels_to_original_grid(labels, props, pm, cm)
    assert full.shape == (3, 6, 7, 8) and full.dtype == np.uint8
    params = np.zeros((2, 8, 4, 5), np.float32)
    for i in range(3):
        params[0] = labels[i]
        ref = parameters_to_original_grid(params, props, pm, cm, 2)[0]
        np.testing.assert_array_equal(full[i], np.maximum(ref, 0).astype(np.uint8))
    assert full[:, 0].sum() == 0 and full[:, :, :2].sum() == 0
    with pytest.raises(ValueError, match="labels must have shape"):
        labels_to_original_grid(labels[0], props, pm, cm)


def test_resampled_sample_labels_agree_with_nnunet_segmentation_resampling() -> None:
    """A coarser preprocessed grid: labels are upsampled with nnU-Net's own seg resampling."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        resample_data_or_seg_to_shape,
    )

    from mobseg.nnunet.export import labels_to_original_grid

    pm, cm = managers(micro_plans(spacing=(2.0, 2.0, 2.0)))
    g = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"))
    ball = (((g - 2.5) ** 2).sum(0) < 5).astype(np.uint8)
    props = {
        "spacing": [1.0, 1.0, 1.0],
        "shape_before_cropping": (12, 12, 12),
        "bbox_used_for_cropping": [[0, 12], [0, 12], [0, 12]],
        "shape_after_cropping_and_before_resampling": (12, 12, 12),
    }
    full = labels_to_original_grid(ball[None], props, pm, cm)
    ref = resample_data_or_seg_to_shape(
        ball[None], (12, 12, 12), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), is_seg=True, order=1
    )
    np.testing.assert_array_equal(full[0], np.asarray(ref)[0].astype(np.uint8))
    assert 0 < full.sum() < full.size and abs(int(full.sum()) - 8 * int(ball.sum())) < 0.3 * (
        8 * int(ball.sum())
    )


def _ct(example: Path) -> Path:
    return example / "s0000" / "ct.nii.gz"


def _expected_prob(ct: np.ndarray) -> np.ndarray:
    """sigmoid of nnU-Net's CT normalisation with micro_plans' intensity statistics."""
    x = (np.clip(ct.astype(np.float64), -1000.0, 1200.0) - 40.0) / 300.0
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
def test_export_restores_the_real_ct_voxel_for_voxel(
    totalseg_example: Path, tmp_path: Path, transpose: tuple[int, int, int]
) -> None:
    """A point-mass 'model' with logit difference = normalised CT, exported, is sigmoid of it
    on the CT grid."""
    ct_path = _ct(totalseg_example)
    pm, cm = managers(micro_plans(spacing=(3.0, 3.0, 3.0), transpose_forward=transpose))
    pre = cm.preprocessor_class(verbose=False)
    data, _, props = pre.run_case([str(ct_path)], None, pm, cm, DATASET_JSON)
    x = torch.from_numpy(np.asarray(data[0], dtype=np.float32))
    params = torch.stack([x, torch.zeros_like(x)])
    paths = export_parameters(params, props, pm, cm, 2, ct_path, tmp_path, "s0000")
    ref = sitk.ReadImage(str(ct_path))
    ct = sitk.GetArrayFromImage(ref)
    got = sitk.ReadImage(str(paths["prob"]))
    assert Geometry.of(got) == Geometry.of(ref)
    arr = sitk.GetArrayFromImage(got)
    # nnU-Net's crop box lives in the transposed frame: map it back
    inside_t = np.zeros(props["shape_before_cropping"], dtype=bool)
    inside_t[tuple(slice(lo, hi) for lo, hi in props["bbox_used_for_cropping"])] = True
    inside = inside_t.transpose(pm.transpose_backward)
    expected = np.where(inside, _expected_prob(ct), 0.0)
    np.testing.assert_allclose(arr, expected, atol=2e-6)
    assert sitk.ReadImage(str(paths["seg"])).GetPixelID() == sitk.sitkUInt8


@dataclass
class _Model:
    plans: dict
    checkpoint: Path

    def load(self) -> tuple[Any, Any, dict]:
        pm, cm = managers(self.plans)
        return pm, cm, dict(DATASET_JSON)


def _write_micro_checkpoint(path: Path, plans: dict, head: HeadConfig | None = None) -> None:
    pm, cm = managers(plans)
    torch.manual_seed(0)
    if head is None:
        weights = build_backbone(pm, cm, 1, 2, False).state_dict()
    else:
        from mobseg.nnunet.network import build_network

        weights = build_network(pm, cm, 1, 2, head, False).state_dict()
    torch.save({"network_weights": weights, "inference_allowed_mirroring_axes": (0, 1, 2)}, path)


@pytest.mark.parametrize("method", ["backbone", "mob"])
def test_prediction_on_the_real_ct_keeps_its_geometry(
    totalseg_example: Path, tmp_path: Path, method: str
) -> None:
    """Untrained micro network, 6 mm plans with a transpose: outputs on the CT's exact grid."""
    ct_path = _ct(totalseg_example)
    plans = micro_plans(spacing=(6.0, 6.0, 6.0), transpose_forward=(2, 0, 1))
    ckpt = tmp_path / "model.pth"
    head = HeadConfig("mob", rank=4, bases=2, partitions=2)
    _write_micro_checkpoint(ckpt, plans, None if method == "backbone" else head)
    params = PredictParams(
        "pancreas",
        head=head,
        backbone=method == "backbone",
        device="cpu",
        save_samples=2,
    )
    out = tmp_path / "pred"
    result = predict_files(_Model(plans, ckpt), ckpt, params, {"s0000": ct_path}, out, "cpu")
    assert result["cases"] == ["s0000"] and result["point_mass"] == (method == "backbone")
    n_saved = 0 if method == "backbone" else 2
    assert result["saved_samples"] == n_saved
    assert sorted(out.glob("s0000_sample*.nii.gz")) == [
        out / f"s0000_sample{i}.nii.gz" for i in range(n_saved)
    ]
    ref = sitk.ReadImage(str(ct_path))
    for suffix in ("seg", "prob", "var", "entropy", "mi", *(f"sample{i}" for i in range(n_saved))):
        img = sitk.ReadImage(str(out / f"s0000_{suffix}.nii.gz"))
        assert img.GetSize() == ref.GetSize()
        assert img.GetSpacing() == ref.GetSpacing()
        assert img.GetOrigin() == ref.GetOrigin()
        assert img.GetDirection() == ref.GetDirection()
        arr = sitk.GetArrayFromImage(img)
        if suffix == "seg" or suffix.startswith("sample"):
            assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 1}
        else:
            assert arr.dtype == np.float32 and np.isfinite(arr).all() and (arr >= 0).all()
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "s0000_prob.nii.gz")))
    var = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "s0000_var.nii.gz")))
    assert prob.max() <= 1.0
    assert (var <= prob * (1 - prob) + 1e-6).all()  # Var of a [0, 1] variable is bounded
    if method == "backbone":
        assert (var == 0).all()
    else:
        assert (var > 0).any()
