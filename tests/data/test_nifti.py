"""Verified NIfTI reading (nibabel + gzip), geometry comparison, atomic writing, resampling."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mobseg.data import nifti
from mobseg.errors import InvalidInputError

LPS_RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def image(arr: np.ndarray, spacing=(1.5, 1.5, 2.0), origin=(1.0, 2.0, 3.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(LPS_RAS)
    return img


def write(path: Path, img: sitk.Image) -> Path:
    sitk.WriteImage(img, str(path), useCompression=path.name.endswith(".gz"))
    return path


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    arr = np.random.default_rng(0).integers(-1000, 1000, size=(6, 7, 8)).astype(np.int16)
    return write(tmp_path / "ct.nii.gz", image(arr))


def test_valid_file_verifies_with_the_header_size(ct_file: Path) -> None:
    info = nifti.verify_nifti_file(ct_file, "s0000")
    # oracle: nibabel's own reading of the header
    hdr = nib.load(str(ct_file)).header
    assert info.nbytes >= int(hdr.get_data_offset()) + 6 * 7 * 8 * 2
    assert info.nbytes == len(gzip.decompress(ct_file.read_bytes()))
    assert info.datatype == 4 and info.n_nan == info.n_inf == 0


def test_truncated_gzip_is_caught_where_simpleitk_reads_zeros(ct_file: Path) -> None:
    data = ct_file.read_bytes()
    ct_file.write_bytes(data[: len(data) * 2 // 3])
    # the reason for the check: SimpleITK reads the truncated file without complaint
    sitk.ReadImage(str(ct_file))
    with pytest.raises(InvalidInputError) as info:
        nifti.read_image(ct_file, "s0042")
    msg = str(info.value)
    assert "Truncated or corrupt gzip stream" in msg
    assert "case s0042" in msg and str(ct_file) in msg


def test_crc_error_is_caught(ct_file: Path) -> None:
    data = bytearray(ct_file.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC32 trailer
    ct_file.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match="Truncated or corrupt gzip"):
        nifti.verify_nifti_file(ct_file)


def test_complete_gzip_of_a_cut_file_is_caught(ct_file: Path) -> None:
    raw = gzip.decompress(ct_file.read_bytes())
    ct_file.write_bytes(gzip.compress(raw[:-10]))
    # the data block the header declares and what is left of it (vox_offset: float32 at byte 108)
    block = 6 * 7 * 8 * 2
    left = len(raw) - 10 - int(struct.unpack("<f", raw[108:112])[0])
    with pytest.raises(InvalidInputError) as info:
        nifti.verify_nifti_file(ct_file, "s0001")
    msg = str(info.value)
    assert f"truncated or unreadable (Expected {block} bytes, got {left} bytes)" in msg
    assert "case s0001" in msg and str(ct_file) in msg


def test_gzip_without_its_trailer_is_caught(ct_file: Path) -> None:
    """The data decompress in full but the CRC and length trailer is missing."""
    data = ct_file.read_bytes()
    ct_file.write_bytes(data[:-4])
    np.asanyarray(nib.load(str(ct_file)).dataobj)  # nibabel alone reads it without complaint
    with pytest.raises(InvalidInputError, match="Truncated or corrupt gzip"):
        nifti.verify_nifti_file(ct_file)


def _header_variant(path: Path, **fields: float) -> Path:
    """A copy of a valid int16 image whose header fields are overwritten."""
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4))
    hdr = img.header.copy()
    raw = bytearray(img.to_bytes())
    for name, value in fields.items():
        hdr[name] = value
    raw[: hdr.sizeof_hdr] = hdr.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"datatype": 999}, "invalid header: data code 999 not recognized"),
        ({"vox_offset": 100}, "invalid header: vox offset 100 too low"),
        ({"dim": [3, 4, 0, 6, 1, 1, 1, 1]}, "the header declares (4, 0, 6) voxels"),
        ({"dim": [0, 4, 5, 6, 1, 1, 1, 1]}, "the header declares ("),
    ],
)
def test_a_header_nibabel_refuses_or_without_voxels_is_not_a_nifti(
    tmp_path: Path, fields: dict, problem: str
) -> None:
    path = _header_variant(tmp_path / "h.nii.gz", **fields)
    with pytest.raises(InvalidInputError) as info:
        nifti.verify_nifti_file(path, "s2")
    assert f"Not a NIfTI file ({problem}" in str(info.value)
    assert "case s2" in str(info.value)


def test_scaled_integer_data_and_extensions_verify(tmp_path: Path) -> None:
    """NaN is counted in the stored values; the data block starts at vox_offset."""
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_slope_inter(0.5, -3.0)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"x" * 100))
    path = tmp_path / "s.nii.gz"
    nib.save(img, str(path))
    raw = gzip.decompress(path.read_bytes())
    assert struct.unpack("<f", raw[108:112])[0] > 352  # the extension moved the data
    info = nifti.verify_nifti_file(path)
    assert info.datatype == 4 and info.n_nan == info.n_inf == 0
    assert info.nbytes == len(raw)


def test_uncompressed_nii_and_non_nifti(tmp_path: Path) -> None:
    arr = np.zeros((3, 4, 5), dtype=np.uint8)
    plain = write(tmp_path / "m.nii", image(arr))
    assert nifti.verify_nifti_file(plain).nbytes == plain.stat().st_size
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"hello" * 200))
    with pytest.raises(InvalidInputError, match="Not a NIfTI file"):
        nifti.verify_nifti_file(junk)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(b"not compressed")
    with pytest.raises(InvalidInputError, match="not gzip-compressed"):
        nifti.verify_nifti_file(fake)
    with pytest.raises(InvalidInputError, match="does not exist"):
        nifti.read_image(tmp_path / "absent.nii.gz", "s1")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_values_are_found_in_the_stored_bytes(tmp_path: Path, dtype: type) -> None:
    arr = np.ones((5, 6, 7), dtype=dtype)
    arr[1, 2, 3] = np.nan
    arr[4, 5, 6] = np.inf
    arr[0, 0, 0] = -np.inf
    path = write(tmp_path / "f.nii.gz", image(arr))
    info = nifti.verify_nifti_file(path)
    # oracle: nibabel reads the stored values faithfully
    stored = np.asarray(nib.load(str(path)).dataobj)
    assert (info.n_nan, info.n_inf) == (int(np.isnan(stored).sum()), int(np.isinf(stored).sum()))
    assert (info.n_nan, info.n_inf) == (1, 2)
    with pytest.raises(InvalidInputError, match="1 NaN and 2 infinite voxels"):
        nifti.read_image(path, "s0007")
    # without the check the image reads (SimpleITK maps the values to 0)
    assert nifti.read_image(path, check_finite=False).GetSize() == (7, 6, 5)


def test_check_finite_image_on_an_image() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.float32)
    arr[0, 1, 2] = np.nan
    with pytest.raises(InvalidInputError, match="1 NaN and 0 infinite"):
        nifti.check_finite_image(image(arr), "s1", "x.nii.gz")
    nifti.check_finite_image(image(np.zeros((2, 3, 4), np.int16)), "s1", None)


def test_binary_mask_array() -> None:
    arr = np.zeros((3, 4, 5), dtype=np.int16)
    arr[1, 1, 1] = 1
    out = nifti.binary_mask_array(image(arr), "s0", "m.nii.gz")
    assert out.dtype == np.uint8 and int(out.sum()) == 1
    arr[2, 2, 2] = 7
    with pytest.raises(InvalidInputError) as info:
        nifti.binary_mask_array(image(arr), "s0", "m.nii.gz")
    assert "not binary" in str(info.value) and "0, 1, 7" in str(info.value)
    assert "case s0" in str(info.value) and "m.nii.gz" in str(info.value)
    half = np.full((3, 4, 5), 0.5, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="0.5"):
        nifti.binary_mask_array(image(half), None, "m")


def test_geometry_differences_each_property_and_tolerance() -> None:
    base = image(np.zeros((3, 4, 5), np.uint8))
    assert nifti.geometry_differences(base, base) == []
    tiny = image(np.zeros((3, 4, 5), np.uint8), spacing=(1.5 + 1e-7, 1.5, 2.0))
    assert nifti.geometry_differences(base, tiny) == []
    cases = {
        "spacing": image(np.zeros((3, 4, 5), np.uint8), spacing=(1.5, 1.5, 2.5)),
        "origin": image(np.zeros((3, 4, 5), np.uint8), origin=(1.0, 2.0, 3.1)),
        "size": image(np.zeros((3, 4, 6), np.uint8)),
    }
    for name, other in cases.items():
        diffs = nifti.geometry_differences(other, base)
        assert len(diffs) == 1 and diffs[0].startswith(name)
    rotated = image(np.zeros((3, 4, 5), np.uint8))
    rotated.SetDirection((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    assert nifti.geometry_differences(rotated, base)[0].startswith("direction")
    with pytest.raises(InvalidInputError) as info:
        nifti.check_same_geometry(base, cases["origin"], "s3", "mask.nii.gz")
    assert "origin" in str(info.value) and "case s3" in str(info.value)


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.nii.gz"
    with pytest.raises(RuntimeError):
        with nifti.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(target.parent.iterdir()) == []
    nifti.atomic_write_json(tmp_path / "a.json", {"k": 1})
    assert (tmp_path / "a.json").read_text().strip().startswith("{")
    arr = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    written = nifti.write_array(arr, image(np.zeros((3, 4, 5), np.int16)), target)
    back = sitk.ReadImage(str(written))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    assert back.GetOrigin() == pytest.approx((1.0, 2.0, 3.0))
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.nii.gz"]
    with pytest.raises(ValueError, match="does not match the grid"):
        nifti.array_to_image(arr, image(np.zeros((3, 4, 6), np.int16)))


def test_resampling_keeps_origin_direction_and_interpolates_linearly() -> None:
    # a linear ramp along x: linear interpolation reproduces it exactly inside the grid
    z, y, x = 6, 8, 10
    ramp = np.broadcast_to(np.arange(x, dtype=np.float32) * 10.0, (z, y, x)).copy()
    img = image(ramp, spacing=(2.0, 2.0, 2.0))
    out = nifti.resample_to_spacing(img, 1.0)
    assert out.GetSize() == (20, 16, 12)
    assert out.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    assert out.GetOrigin() == pytest.approx(img.GetOrigin())
    assert out.GetDirection() == pytest.approx(img.GetDirection())
    arr = sitk.GetArrayFromImage(out)
    # output index i lies at input index i / 2 -> value 5 * i (inside the input extent)
    np.testing.assert_allclose(arr[0, 0, :19], 5.0 * np.arange(19), atol=1e-4)
    assert arr[0, 0, 19] == pytest.approx(90.0)  # past the last centre: nearest value


def test_resampling_integer_images_and_masks() -> None:
    ct = image(np.full((4, 4, 4), -3, dtype=np.int16), spacing=(1.0, 1.0, 1.0))
    out = nifti.resample_to_spacing(ct, 2.0)
    assert out.GetPixelID() == sitk.sitkInt16 and out.GetSize() == (2, 2, 2)
    assert set(np.unique(sitk.GetArrayFromImage(out))) == {-3}
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    m_out = nifti.resample_to_spacing(image(mask, spacing=(1.0, 1.0, 1.0)), 0.5, is_mask=True)
    m_arr = sitk.GetArrayFromImage(m_out)
    assert m_arr.dtype == np.uint8 and set(np.unique(m_arr)) == {0, 1}
    # the upsampled cube keeps its physical volume within a voxel layer
    assert m_arr.sum() * 0.125 == pytest.approx(mask.sum(), rel=0.35)


@pytest.mark.parametrize("kind", ["nifti2", "big-endian"])
def test_nifti2_and_big_endian_headers_verify(tmp_path: Path, kind: str) -> None:
    """The header is parsed by nibabel: NIfTI-2 and either byte order."""
    arr = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    arr[1, 2, 3] = np.nan
    path = tmp_path / "x.nii.gz"
    if kind == "nifti2":
        nib.save(nib.Nifti2Image(arr, np.eye(4)), str(path))
    else:  # nibabel writes native order: build the big-endian file by hand
        hdr = nib.Nifti1Image(arr, np.eye(4)).header.as_byteswapped(">")
        hdr.set_data_offset(352)
        body = hdr.binaryblock + b"\0" * 4 + arr.astype(">f4").tobytes(order="F")
        path.write_bytes(gzip.compress(body))
        assert nib.load(str(path)).header.endianness == ">"
    info = nifti.verify_nifti_file(path)
    assert info.datatype == 16 and info.n_nan == 1 and info.n_inf == 0
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-4]))
    with pytest.raises(InvalidInputError, match=r"truncated or unreadable \(Expected 240 bytes"):
        nifti.verify_nifti_file(path)
