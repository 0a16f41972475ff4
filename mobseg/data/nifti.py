"""Safe NIfTI input and output, shared by every stage.

SimpleITK is the geometry authority of mobseg, because nnU-Net's default
reader (``SimpleITKIO``) is SimpleITK too: size, spacing, origin and direction
are always those SimpleITK reports (LPS world coordinates; a RAS NIfTI file
therefore reads with direction ``diag(-1, -1, 1)``).

Reading first verifies, with nibabel and Python's ``gzip``, what SimpleITK
does not (it fills a truncated ``.nii.gz`` with zeros and reads NaN and
infinity as 0): the header is one nibabel accepts, the data block is complete,
the gzip stream's CRC and length are right, and floating-point data are finite.

Writing is atomic and verified: a temporary file in the destination folder is
read back in full (a full disk makes SimpleITK write a short file without
raising), fsynced, given the umask's mode and only then renamed into place, so
nothing under a final name is ever half-written (:mod:`mobseg.fsutil`).

Every failure raises :class:`~mobseg.errors.InvalidInputError` naming the case
and the file.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.arrayproxy import ArrayProxy
from nibabel.spatialimages import HeaderDataError

from mobseg.errors import InvalidInputError
from mobseg.fsutil import atomic_path as _atomic_path
from mobseg.fsutil import atomic_write_text

log = logging.getLogger(__name__)

_CHUNK = 1 << 22  # 4 MiB
_HEADERS = (nib.Nifti1Header, nib.Nifti2Header)


# -- geometry ----------------------------------------------------------------------
@dataclass(frozen=True)
class GeometryTolerance:
    """Tolerances of :func:`geometry_differences`.

    Attributes:
        spacing_mm: Absolute tolerance on each spacing component (mm).
        origin_mm: Absolute tolerance on each origin component (mm).
        direction: Absolute tolerance on each direction-matrix entry.
        rtol: Relative tolerance added to the spacing and origin checks
            (``|a - b| <= atol + rtol * |b|``, as ``numpy.allclose``).
    """

    spacing_mm: float = 1e-4
    origin_mm: float = 1e-3
    direction: float = 1e-5
    rtol: float = 1e-5


DEFAULT_TOLERANCE = GeometryTolerance()


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of an image, as SimpleITK reports it.

    Attributes:
        size: Voxels per axis (x, y, z), SimpleITK order (the numpy array of
            the image has the reversed shape (z, y, x)).
        spacing: Voxel size in mm per axis.
        origin: World position (LPS, mm) of the first voxel's centre.
        direction: Row-major direction cosines (9 numbers for 3-D).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """The geometry of a SimpleITK image."""
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(s) for s in image.GetOrigin()),
            direction=tuple(float(s) for s in image.GetDirection()),
        )

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def geometry_differences(
    a: Geometry | sitk.Image,
    b: Geometry | sitk.Image,
    tol: GeometryTolerance = DEFAULT_TOLERANCE,
) -> list[str]:
    """How two grids differ, one phrase per differing property (empty if equal).

    Size must match exactly; spacing, origin and direction within ``tol``.
    """
    ga = a if isinstance(a, Geometry) else Geometry.of(a)
    gb = b if isinstance(b, Geometry) else Geometry.of(b)
    diffs: list[str] = []
    if ga.size != gb.size:
        return [f"size {ga.size} != {gb.size}"]
    checks = (
        ("spacing", ga.spacing, gb.spacing, tol.spacing_mm, tol.rtol),
        ("origin", ga.origin, gb.origin, tol.origin_mm, tol.rtol),
        ("direction", ga.direction, gb.direction, tol.direction, 0.0),
    )
    for name, va, vb, atol, rtol in checks:
        if len(va) != len(vb) or not np.allclose(va, vb, rtol=rtol, atol=atol):
            diffs.append(f"{name} {_fmt(va)} != {_fmt(vb)}")
    return diffs


def check_same_geometry(
    reference: Geometry | sitk.Image,
    other: Geometry | sitk.Image,
    case: str | None,
    path: str | os.PathLike[str],
    what: str = "mask",
    tol: GeometryTolerance = DEFAULT_TOLERANCE,
) -> None:
    """Raise unless ``other`` (read from ``path``) lies on ``reference``'s grid.

    Raises:
        InvalidInputError: naming the case, the file and every differing
            property (size, spacing, origin, direction).
    """
    diffs = geometry_differences(other, reference, tol)
    if diffs:
        raise InvalidInputError(
            f"The {what} does not lie on the CT's grid: {'; '.join(diffs)}.",
            case=case,
            path=str(path),
            hint="Image and mask must share size, spacing, origin and direction.",
        )


# -- verified reading --------------------------------------------------------------
@dataclass(frozen=True)
class NiftiFileInfo:
    """The result of :func:`verify_nifti_file`.

    Attributes:
        nbytes: Decompressed size of the file.
        datatype: NIfTI datatype code (4 = int16, 16 = float32, ...).
        n_nan: NaN voxels in the stored data (floating-point types only).
        n_inf: Infinite voxels in the stored data (floating-point types only).
    """

    nbytes: int
    datatype: int
    n_nan: int = 0
    n_inf: int = 0


def verify_nifti_file(
    path: str | os.PathLike[str], case: str | None = None, display: str | None = None
) -> NiftiFileInfo:
    """Check a ``.nii`` / ``.nii.gz`` file completely, without trusting SimpleITK.

    nibabel reads the header (NIfTI-1 or NIfTI-2, either byte order; a header
    it refuses is not a NIfTI file) and the stored data block, which must be
    present in full. The gzip stream is then read to its end, so that Python's
    ``gzip`` checks its CRC and length. Floating-point data are counted for NaN
    and infinite values, because SimpleITK's NIfTI reader silently turns them
    into 0; the counts are returned, not raised.

    Args:
        path: The file.
        case: The case id, for messages.
        display: How to name the file in messages (default: ``path``), e.g.
            ``archive.zip!s0001/ct.nii.gz`` for a member copied out of a zip.

    Returns:
        Size, datatype and non-finite counts of the file.

    Raises:
        InvalidInputError: missing file, truncated or corrupt gzip stream, not a
            NIfTI file (or one of no voxels), or data shorter than the header
            declares.
    """
    p = Path(path)
    shown = display or str(p)
    if not p.is_file():
        raise InvalidInputError("The file does not exist.", case=case, path=shown)
    with open(p, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if not gzipped and p.name.endswith(".gz"):
        raise InvalidInputError(
            "The file ends in .gz but is not gzip-compressed (corrupt file).", case=case, path=shown
        )
    try:
        with gzip.open(p, "rb") if gzipped else open(p, "rb") as fh:
            head = fh.read(nib.Nifti2Header.sizeof_hdr)
            fh.seek(0)
            header = _nifti_header(fh, head, case, shown)
            stored = ArrayProxy(fh, header).get_unscaled()  # the stored values, unscaled
            while gzipped and fh.read(_CHUNK):  # to the end: gzip checks CRC and length
                pass
            nbytes = fh.tell() if gzipped else p.stat().st_size
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InvalidInputError(
            f"Truncated or corrupt gzip stream ({exc}).",
            case=case,
            path=shown,
            hint="Download or extract the file again.",
        ) from exc
    except OSError as exc:  # nibabel: "Expected N bytes, got M bytes from <file>"
        first = str(exc).splitlines()[0].split(" from ")[0]
        raise InvalidInputError(
            f"The image data is truncated or unreadable ({first}).",
            case=case,
            path=shown,
            hint="Download or extract the file again.",
        ) from exc
    n_nan = n_inf = 0
    if stored.dtype.kind == "f":
        n_nan = int(np.isnan(stored).sum())
        n_inf = int(np.isinf(stored).sum())
    return NiftiFileInfo(nbytes, int(header["datatype"]), n_nan, n_inf)


def _nifti_header(fh: Any, head: bytes, case: str | None, shown: str) -> nib.Nifti1Header:
    """The header of an open single-file NIfTI stream, read and checked by nibabel."""
    klass = next((k for k in _HEADERS if k.may_contain_header(head)), None)
    problem = "no NIfTI-1 or NIfTI-2 header"
    if klass is not None:
        try:
            header = klass.from_fileobj(fh)
            shape = header.get_data_shape()
            if shape and min(shape) >= 1:
                return header
            problem = f"the header declares {shape} voxels"
        except (HeaderDataError, ValueError) as exc:
            problem = f"invalid header: {exc}"
    raise InvalidInputError(f"Not a NIfTI file ({problem}).", case=case, path=shown)


def _raise_non_finite(n_nan: int, n_inf: int, case: str | None, path: str | None) -> None:
    raise InvalidInputError(
        f"The image holds {n_nan} NaN and {n_inf} infinite voxels.",
        case=case,
        path=path,
        hint="Replace non-finite values or exclude the case.",
    )


def check_finite_file(info: NiftiFileInfo, case: str | None, path: str | None) -> None:
    """Raise if :func:`verify_nifti_file` found NaN or infinite voxels."""
    if info.n_nan or info.n_inf:
        _raise_non_finite(info.n_nan, info.n_inf, case, path)


def read_image(
    path: str | os.PathLike[str],
    case: str | None = None,
    *,
    check_finite: bool = True,
    verify: bool = True,
    display: str | None = None,
) -> sitk.Image:
    """Read a NIfTI image with SimpleITK after verifying the file.

    Args:
        path: A ``.nii.gz`` or ``.nii`` file.
        case: The case id, for messages.
        check_finite: Refuse NaN or infinite voxels (floating-point images),
            both in the stored data (found by verification; SimpleITK would
            read them as 0) and in the image as read.
        verify: Run :func:`verify_nifti_file` first (always, unless the caller
            has just done it).
        display: How to name the file in messages (default: ``path``).

    Returns:
        The image (its array via ``sitk.GetArrayFromImage`` has shape (z, y, x)).

    Raises:
        InvalidInputError: the file is missing, corrupt, truncated, unreadable
            or holds non-finite values.
    """
    shown = display or str(path)
    if verify:
        info = verify_nifti_file(path, case, shown)
        if check_finite:
            check_finite_file(info, case, shown)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise InvalidInputError(
            f"SimpleITK cannot read the file ({first}).", case=case, path=shown
        ) from exc
    if check_finite:
        check_finite_image(image, case, shown)
    return image


def check_finite_image(
    image: sitk.Image, case: str | None, path: str | os.PathLike[str] | None
) -> None:
    """Raise if a floating-point image holds NaN or infinite voxels."""
    arr = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(arr.dtype, np.floating):
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(arr.size - finite.sum() - n_nan)
    _raise_non_finite(n_nan, n_inf, case, None if path is None else str(path))


def binary_mask_array(
    image: sitk.Image, case: str | None, path: str | os.PathLike[str]
) -> np.ndarray:
    """The 0/1 array (uint8, shape (z, y, x)) of a mask image.

    Raises:
        InvalidInputError: the mask holds values other than 0 and 1.
    """
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    is_one = arr == 1
    if not np.logical_or(is_one, arr == 0).all():
        values = np.unique(arr)
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise InvalidInputError(
            f"The mask is not binary: it holds the values {shown} (expected 0 and 1).",
            case=case,
            path=str(path),
            hint="Give one 0/1 mask per structure.",
        )
    return is_one.astype(np.uint8)


# -- atomic writing ----------------------------------------------------------------
def _verify_written(path: Path) -> None:
    """Full read-back of a just-written file: NIfTI data and header (others: size only)."""
    if path.name.endswith((".nii", ".nii.gz")):
        verify_nifti_file(path)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; publish it as ``path`` on success.

    The temporary name keeps the extension (so writers that choose a format by
    extension still work) and starts with a dot. Before the rename the file is
    verified (not empty; a ``.nii``/``.nii.gz`` file is read back completely,
    because SimpleITK's writer does not raise on a full disk), fsynced and
    given the umask's mode (:func:`mobseg.fsutil.publish`). On an exception or
    a failed verification the temporary file is removed, ``path`` is left
    untouched, and a storage failure raises
    :class:`~mobseg.errors.StorageError` naming the file and the free space.
    """
    with _atomic_path(path, verify=_verify_written) as tmp:
        yield tmp


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def write_image(image: sitk.Image, path: str | os.PathLike[str], compress: bool = True) -> Path:
    """Write a SimpleITK image atomically (``.nii.gz`` compressed by default), verified."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return Path(path)


def files_complete(paths: Iterable[Path], last: Path) -> bool:
    """All ``paths`` exist and are not empty, and ``last`` (written last) verifies.

    The cheap check of a rerun that skips finished work: a set of files is
    trusted only if the one written last reads back completely.
    """
    for p in paths:
        try:
            if p.stat().st_size == 0:
                return False
        except OSError:
            return False
    try:
        verify_nifti_file(last)
    except InvalidInputError:
        log.warning("%s does not verify; its case is done again.", last)
        return False
    return True


def array_to_image(
    array: np.ndarray, like: sitk.Image | Geometry, dtype: type | np.dtype | None = None
) -> sitk.Image:
    """An image from a (z, y, x) array on the grid of ``like``.

    Raises:
        ValueError: the array's shape is not the reversed size of ``like``.
    """
    geo = like if isinstance(like, Geometry) else Geometry.of(like)
    arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype, copy=False))
    if arr.shape != tuple(reversed(geo.size)):
        raise ValueError(
            f"array shape {arr.shape} does not match the grid (z, y, x) = "
            f"{tuple(reversed(geo.size))}"
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    image.SetSpacing(geo.spacing)
    image.SetOrigin(geo.origin)
    image.SetDirection(geo.direction)
    return image


def write_array(
    array: np.ndarray,
    like: sitk.Image | Geometry,
    path: str | os.PathLike[str],
    dtype: type | np.dtype | None = None,
) -> Path:
    """Write a (z, y, x) array on ``like``'s grid to ``path`` atomically."""
    return write_image(array_to_image(array, like, dtype), path)


# -- resampling --------------------------------------------------------------------
def resample_to_spacing(image: sitk.Image, spacing_mm: float, is_mask: bool = False) -> sitk.Image:
    """Resample an image to isotropic ``spacing_mm`` over the same physical extent.

    The new grid keeps the origin (centre of the first voxel) and the
    direction; its size per axis is ``max(1, round(size * spacing / spacing_mm))``.
    Points past the last input voxel centre take the nearest voxel's value
    (SimpleITK's nearest-neighbour extrapolator), so no artificial border appears.

    Args:
        image: The image.
        spacing_mm: The new isotropic spacing (> 0).
        is_mask: Treat as a 0/1 mask: the mask is resampled as float32 with
            linear interpolation and thresholded at 0.5 (uint8 result), which
            keeps thin structures better than nearest-neighbour. Otherwise
            linear interpolation in float32, rounded back to integer pixel types.

    Returns:
        The resampled image.
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    old_size = np.array(image.GetSize(), dtype=np.float64)
    old_spacing = np.array(image.GetSpacing(), dtype=np.float64)
    new_size = [max(1, int(round(s))) for s in old_size * old_spacing / spacing_mm]
    source = sitk.Cast(image, sitk.sitkFloat32)
    out = sitk.Resample(
        source,
        new_size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        (float(spacing_mm),) * image.GetDimension(),
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
        True,
    )
    arr = sitk.GetArrayFromImage(out)
    if is_mask:
        result = (arr >= 0.5).astype(np.uint8)
    else:
        dtype = sitk.GetArrayViewFromImage(image).dtype
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            result = np.clip(np.rint(arr), info.min, info.max).astype(dtype)
        else:
            result = arr.astype(dtype, copy=False)
    return array_to_image(result, out)
