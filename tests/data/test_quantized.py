"""16-bit map files (scaled uint16): error bound, geometry, readers, size, and evaluate."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mobseg.data.nifti import Geometry, check_same_geometry, write_array
from mobseg.data.quantized import DESCRIPTION, LEVELS, max_error, quantize, write_uint16
from mobseg.metrics.case import evaluate_case
from mobseg.metrics.io import evaluate_files, prediction_files
from mobseg.metrics.probabilistic import ProbabilisticAccumulator

C, S = math.cos(0.3), math.sin(0.3)
GEO = Geometry((40, 36, 24), (0.7, 0.8, 2.5), (10.0, -20.0, 33.0), (C, -S, 0, S, C, 0, 0, 0, 1))


def _maps(seed: int = 0) -> dict[str, np.ndarray]:
    """A smooth blob with noise: E[p], Var[p] (values down to ~1e-20) and entropy."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 36, 40)], indexing="ij")
    m = (0.4 - (x**2 + y**2 + z**2)) * 40 + rng.normal(0, 1.0, x.shape)
    p = 1 / (1 + np.exp(-m))
    h = -(p * np.log(np.clip(p, 1e-30, 1)) + (1 - p) * np.log(np.clip(1 - p, 1e-30, 1)))
    return {
        "prob": p.astype(np.float32),
        "var": (0.3 * p * (1 - p)).astype(np.float32),
        "entropy": h.astype(np.float32),
    }


@pytest.mark.parametrize("name", ["prob", "var", "entropy"])
def test_reads_back_within_the_documented_bound_and_halves_the_file(
    tmp_path: Path, name: str
) -> None:
    a = _maps()[name]
    f32, u16 = tmp_path / "f32.nii.gz", tmp_path / "u16.nii.gz"
    write_array(a, GEO, f32, np.float32)
    write_uint16(a, GEO, u16)
    img = sitk.ReadImage(str(u16))
    assert img.GetPixelID() == sitk.sitkFloat32  # SimpleITK applies the scaling
    back = sitk.GetArrayFromImage(img).astype(np.float64)
    err = np.abs(back - a).max()
    # the bound of the module docstring: half a level of (max - min) / 65535
    span = float(a.max() - a.min())
    assert err <= span / (2 * LEVELS) * 1.01 + 1e-9
    assert err <= max_error(a)
    assert err > 0  # not stored losslessly: the test sees the quantization
    documented = {"prob": 7.7e-6, "var": 1.9e-6, "entropy": 5.4e-6}[name]
    assert err <= documented
    # nibabel reads the same values
    via_nib = np.asarray(nib.load(str(u16)).get_fdata()).transpose(2, 1, 0)
    np.testing.assert_allclose(via_nib, back, rtol=0, atol=1e-6)
    # same grid as SimpleITK's own float32 file
    ref = sitk.ReadImage(str(f32))
    check_same_geometry(ref, img, "c", u16)
    assert img.GetSize() == ref.GetSize() and img.GetSpacing() == ref.GetSpacing()
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    # the header says what is stored
    hdr = nib.load(str(u16)).header
    assert hdr.get_data_dtype() == np.uint16
    assert bytes(hdr["descrip"]).rstrip(b"\x00").decode() == DESCRIPTION
    # the same map takes at most half the bytes on disk
    assert u16.stat().st_size <= 0.5 * f32.stat().st_size


def test_small_variances_are_absolute_not_relative(tmp_path: Path) -> None:
    """Var[p] of 1e-6 beside a maximum of 0.25: the error is absolute (<= 1.9e-6)."""
    a = np.zeros(tuple(reversed(GEO.size)), np.float32)
    a[0, 0, :4] = [1e-6, 3e-6, 1e-7, 0.25]
    write_uint16(a, GEO, tmp_path / "v.nii.gz")
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v.nii.gz")))
    step = 0.25 / LEVELS
    np.testing.assert_allclose(back[0, 0, :4], np.rint(a[0, 0, :4] / step) * step, atol=1e-9)
    assert back[0, 0, 2] == 0.0  # 1e-7 is below half a level
    assert abs(back[0, 0, 3] - 0.25) < 1e-7


def test_constant_maps_still_read_as_float(tmp_path: Path) -> None:
    for value in (0.0, 1.0, 0.3):
        a = np.full(tuple(reversed(GEO.size)), value, np.float32)
        write_uint16(a, GEO, tmp_path / "c.nii.gz")
        img = sitk.ReadImage(str(tmp_path / "c.nii.gz"))
        assert img.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(sitk.GetArrayFromImage(img), value, atol=1e-7)


def test_refuses_non_finite_and_wrong_shapes(tmp_path: Path) -> None:
    a = np.zeros(tuple(reversed(GEO.size)), np.float32)
    a[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize(a)
    with pytest.raises(ValueError, match="does not match the grid"):
        write_uint16(np.zeros((3, 3, 3), np.float32), GEO, tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


def test_evaluate_reads_16_bit_maps_like_float32(tmp_path: Path) -> None:
    """mobseg evaluate scores a uint16 folder within the storage error of float32."""
    maps = _maps(1)
    gt = (maps["prob"] > 0.5).astype(np.uint8)
    gt[10, 10:20, 10:20] ^= 1  # some errors to detect
    (tmp_path / "gt").mkdir()
    write_array(gt, GEO, tmp_path / "gt" / "c.nii.gz", np.uint8)
    rows = {}
    for kind in ("f32", "u16"):
        d = tmp_path / kind
        d.mkdir()
        for name, a in maps.items():
            path = d / f"c_{name}.nii.gz"
            write_array(a, GEO, path, np.float32) if kind == "f32" else write_uint16(a, GEO, path)
        files = prediction_files(d, "c", tmp_path / "gt" / "c.nii.gz")
        rows[kind] = evaluate_files(files).row
    f32, u16 = rows["f32"], rows["u16"]
    # evaluate reads exactly the values the scaling stores (oracle: numpy's q * slope + inter)
    stored = {}
    for name, a in maps.items():
        q, slope, inter = quantize(a)
        stored[name] = (q * slope + inter).astype(np.float32)
    direct = evaluate_case(
        stored["prob"], gt, case="c", variance=stored["var"], entropy=stored["entropy"]
    ).row
    for key in ("dice", "nll", "brier", "auroc_var", "auroc_entropy", "mean_var_pred"):
        assert u16[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), key
    assert u16["dice"] == f32["dice"]
    for key in ("brier", "ece", "mean_var_pred", "mean_entropy_pred", "mean_var_boundary"):
        assert u16[key] == pytest.approx(f32[key], abs=1e-5), key
    # error detection ranks voxels by tiny scores (this case's confident errors have
    # Var[p] ~ 1e-5), which 16 linear bits tie: AUROC(var) 0.788 -> 0.706 (documented)
    assert f32["auroc_var"] - u16["auroc_var"] > 0.05
    # NLL reads the tails of p: values below half a level (3.8e-6) become 0 and
    # are floored (1e-8), so confident errors cost more; float16 (were NIfTI to
    # store it) loses more, its spacing near p = 1 being 4.9e-4
    p16 = np.clip(maps["prob"].astype(np.float16).astype(np.float32), 0, 1)
    nll16 = ProbabilisticAccumulator().update(p16, gt).nll()
    nll32 = ProbabilisticAccumulator().update(maps["prob"], gt).nll()
    assert f32["nll"] == pytest.approx(nll32, rel=1e-9)
    assert 0 < u16["nll"] - f32["nll"] < nll16 - f32["nll"]
    assert u16["nll"] == pytest.approx(f32["nll"], rel=0.15)  # 0.0463 -> 0.0512
