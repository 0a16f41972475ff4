"""The phantom: its label law is known exactly, and it is laid out like the real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import stats

from mobseg.data.meta import parse_meta
from mobseg.data.phantom import (
    CONFIG_NAME,
    PhantomConfig,
    annotator_paths,
    ensure_phantom,
    gaussian_random_field,
    generate_case,
    p_true_path,
)
from mobseg.errors import ConfigurationError


def test_gaussian_random_field_has_unit_variance_and_gaussian_correlation() -> None:
    corr = 2.0
    fields = gaussian_random_field((16, 16, 16), corr, np.random.default_rng(0), n=300)
    assert fields.shape == (300, 16, 16, 16)
    assert fields.var() == pytest.approx(1.0, abs=0.03)
    assert fields.mean() == pytest.approx(0.0, abs=0.03)
    for axis in (1, 2, 3):
        for lag in (1, 2, 3):
            shifted = np.roll(fields, lag, axis=axis)
            rho = float((fields * shifted).mean() / fields.var())
            assert rho == pytest.approx(np.exp(-(lag**2) / (2 * corr**2)), abs=0.03)
    # Gaussian marginals: Kolmogorov-Smirnov on voxels far apart (nearly independent)
    sample = fields[:, ::8, ::8, ::8].ravel()
    assert stats.kstest(sample, "norm").pvalue > 1e-3


def test_annotators_are_independent_draws_with_probability_p_star() -> None:
    cfg = PhantomConfig(num_cases=3, size=20, fov_mm=100.0, annotators=400, seed=3)
    case = next(c for c in (generate_case(cfg, i) for i in range(3)) if c.present)
    # p* is the normal CDF of the latent field over sigma (oracle: scipy.stats.norm)
    np.testing.assert_allclose(
        case.p_true, stats.norm.cdf(case.latent / cfg.boundary_sigma_mm), atol=1e-6
    )
    freq = case.masks.mean(axis=0)
    p = case.p_true.astype(np.float64)
    band = (p > 0.02) & (p < 0.98)
    assert band.sum() > 100  # real boundary ambiguity
    # per voxel: the annotators' frequency is Binomial(400, p*) / 400
    bound = 5.0 * np.sqrt(p * (1 - p) / 400) + 1e-3
    assert np.mean(np.abs(freq - p) <= bound) > 0.999
    # calibration of p* against the annotators, bin by bin
    edges = np.linspace(0, 1, 11)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (p >= lo) & (p < hi) & band
        if sel.sum() > 30:
            assert freq[sel].mean() == pytest.approx(p[sel].mean(), abs=0.02)
    # independence: two annotators disagree where p* is ambiguous
    assert (case.masks[0] != case.masks[1])[band].mean() > 0.1
    assert (case.masks[0] != case.masks[1])[~band].mean() < 0.01


def test_deterministic_per_seed_and_absent_cases() -> None:
    cfg = PhantomConfig(num_cases=20, size=24, seed=5)
    a, b = generate_case(cfg, 4), generate_case(cfg, 4)
    np.testing.assert_array_equal(a.ct, b.ct)
    np.testing.assert_array_equal(a.masks, b.masks)
    other = generate_case(PhantomConfig(num_cases=20, size=24, seed=6), 4)
    assert not np.array_equal(a.ct, other.ct)
    cases = [generate_case(cfg, i) for i in range(20)]
    absent = [c for c in cases if not c.present]
    assert len(absent) == 2  # round(0.1 * 20)
    for c in absent:
        assert c.masks.sum() == 0 and c.p_true.max() == 0.0
    for c in cases:
        if c.present:
            assert c.masks[0].sum() > 0


def test_hounsfield_units_are_plausible() -> None:
    cfg = PhantomConfig(num_cases=4, size=48, seed=0)
    case = next(c for c in (generate_case(cfg, i) for i in range(4)) if c.present)
    ct = case.ct
    assert ct.dtype == np.int16 and ct.min() >= -1024 and ct.max() <= 3071
    assert ct[:, :3, :3].mean() < -900  # air in the corners
    core = case.p_true > 0.97
    assert 80 < ct[core].mean() < 140  # the enhancing organ
    assert (ct < -60).mean() > 0.02 and (ct > 200).mean() > 0.001  # fat and bone exist
    ring = (case.p_true > 0.3) & (case.p_true < 0.7)
    sigma = cfg.boundary_sigma_mm
    bed = (case.latent < -3 * sigma) & (case.latent > -cfg.fat_bed_mm)
    # the organ lies in fat; partial volume puts its boundary between the two
    assert -110 < ct[bed].mean() < -40
    assert ct[bed].mean() < ct[ring].mean() < ct[core].mean()
    # noise: neighbouring voxels inside the organ differ by about the noise level
    diffs = np.diff(ct.astype(float), axis=2)[core[:, :, 1:] & core[:, :, :-1]]
    assert 3 < diffs.std() < 40


def test_layout_on_disk_and_reuse(tmp_path: Path) -> None:
    cfg = PhantomConfig(num_cases=6, size=16, seed=2, annotators=3)
    root = ensure_phantom(tmp_path / "phantom", "pancreas", cfg)
    rows, problems = parse_meta((root / "meta.csv").read_bytes(), "meta.csv")
    assert [r.image_id for r in rows] == [f"s{i:04d}" for i in range(6)] and not problems
    config = json.loads((root / CONFIG_NAME).read_text())
    assert config["organs"] == ["pancreas"] and config["config"]["size"] == 16
    for i, row in enumerate(rows):
        case = generate_case(cfg, i)
        ct_path = root / row.image_id / "ct.nii.gz"
        assert nib.aff2axcodes(nib.load(str(ct_path)).affine) == ("R", "A", "S")
        ct = sitk.ReadImage(str(ct_path))
        assert ct.GetSpacing() == pytest.approx((20.0, 20.0, 20.0))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), case.ct)
        paths = annotator_paths(root, "pancreas", row.image_id)
        assert len(paths) == 3 and paths[0].parent.name == "segmentations"
        for k, p in enumerate(paths):
            img = sitk.ReadImage(str(p))
            assert img.GetPixelID() == sitk.sitkUInt8 and img.GetSize() == ct.GetSize()
            assert img.GetOrigin() == pytest.approx(ct.GetOrigin())
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), case.masks[k])
        pt = sitk.ReadImage(str(p_true_path(root, "pancreas", row.image_id)))
        assert pt.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(sitk.GetArrayFromImage(pt), case.p_true)
    # a finished phantom is reused as it is
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    ensure_phantom(root, "pancreas", cfg)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")} == before
    # another organ name gets copies of the same masks
    ensure_phantom(root, "gallbladder", cfg)
    assert json.loads((root / CONFIG_NAME).read_text())["organs"] == ["pancreas", "gallbladder"]
    a = annotator_paths(root, "gallbladder", "s0001")
    b = annotator_paths(root, "pancreas", "s0001")
    assert [x.read_bytes() for x in a] == [x.read_bytes() for x in b]
    assert p_true_path(root, "gallbladder", "s0001") is not None
    assert p_true_path(root, "liver", "s0001") is None
    # other settings need force
    with pytest.raises(ConfigurationError, match="num_cases: 6 -> 7"):
        ensure_phantom(root, "pancreas", PhantomConfig(num_cases=7, size=16, seed=2))
    ensure_phantom(root, "pancreas", PhantomConfig(num_cases=7, size=16, seed=2), force=True)
    assert len([p for p in root.iterdir() if p.name.startswith("s0")]) == 7


def test_interrupted_generation_resumes(tmp_path: Path) -> None:
    cfg = PhantomConfig(num_cases=5, size=16, seed=0)
    root = ensure_phantom(tmp_path / "phantom", "pancreas", cfg)
    # simulate a run stopped after three cases
    (root / CONFIG_NAME).unlink()
    (root / "meta.csv").unlink()
    for case in ("s0003", "s0004"):
        shutil.rmtree(root / case)
    from mobseg.data.nifti import atomic_write_json
    from mobseg.data.phantom import PHANTOM_VERSION

    atomic_write_json(
        root / "partial.json",
        {"config": {"version": PHANTOM_VERSION, **cfg.to_dict()}, "organ": "pancreas"},
    )
    kept = {p: p.stat().st_mtime_ns for p in (root / "s0000").rglob("*")}
    ensure_phantom(root, "pancreas", cfg)
    assert {p: p.stat().st_mtime_ns for p in (root / "s0000").rglob("*")} == kept
    assert (root / "s0004" / "ct.nii.gz").exists() and (root / CONFIG_NAME).exists()
    assert not (root / "partial.json").exists()


def test_invalid_configurations() -> None:
    for kw in ({"num_cases": 0}, {"size": 8}, {"annotators": 0}, {"absent_fraction": 1.0}):
        with pytest.raises(ConfigurationError):
            PhantomConfig(**kw)  # type: ignore[arg-type]
