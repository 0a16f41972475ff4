"""16-bit map files: floats stored as scaled uint16 with NIfTI's ``scl_slope``/``scl_inter``.

NIfTI-1 has no float16 data type (nibabel refuses ``float16`` with
``HeaderDataError: data dtype "float16" not supported`` and SimpleITK with
``dtype: float16 is not supported``), so half-size float maps are stored the
way the format provides: unsigned 16-bit integers q and a linear scaling
x = q * scl_slope + scl_inter, chosen per file so that q = 0 is the map's
minimum and q = 65535 its maximum. Every NIfTI reader applies the scaling:
SimpleITK returns a 32-bit float image, nibabel's ``get_fdata`` floats.

Error: each value is rounded to the nearest of 65536 evenly spaced levels
between the file's minimum and maximum, so |x' - x| <= (max - min) / 131070
(half a level, plus float32 rounding of slope and intercept). For the maps of
``mobseg predict``: E[p] in [0, 1] -> <= 7.7e-6; Var[p] in [0, 1/4] ->
<= 1.9e-6 (absolute: a variance of 1e-6 may read back as 0 or 1.9e-6);
entropy and MI in [0, ln 2] -> <= 5.3e-6 nats; the logit maps -> range / 131070.

The grid (size, spacing, origin, direction) is written as SimpleITK writes it
(LPS converted to NIfTI's RAS, qform and sform with code 1, millimetres), so
SimpleITK reads back the same geometry.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobseg.data.nifti import Geometry, atomic_path

#: Largest stored integer.
LEVELS = 65535
#: ``descrip`` of the header (at most 80 bytes): what the integers mean.
DESCRIPTION = "mobseg map: uint16 * scl_slope + scl_inter"


def quantize(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Scaled uint16 of a finite float array.

    Returns:
        (q, slope, inter), q uint16 with ``q * slope + inter`` ~ ``array``;
        slope and inter are float32 values (the header's precision). The
        slope is never exactly 1 with intercept 0, so readers always apply
        the scaling and return floats (SimpleITK returns uint16 otherwise).

    Raises:
        ValueError: empty array or NaN / infinite values.
    """
    a = np.asarray(array, dtype=np.float64)
    if a.size == 0:
        raise ValueError("cannot quantize an empty array")
    if not np.isfinite(a).all():
        raise ValueError("cannot quantize NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    inter = float(np.float32(lo))
    span = hi - inter
    slope = float(np.float32(span / LEVELS)) if span > 0 else 0.0
    if slope == 0.0:  # a constant map: every q is 0
        slope = float(np.float32((abs(inter) or 1.0) / LEVELS))
    if slope == 1.0 and inter == 0.0:
        slope = float(np.float32(span / (LEVELS - 1)))
    q = np.clip(np.rint((a - inter) / slope), 0, LEVELS).astype(np.uint16)
    return q, slope, inter


def max_error(array: np.ndarray) -> float:
    """The bound on |read - written| for ``array`` stored by :func:`write_uint16`."""
    a = np.asarray(array, dtype=np.float64)
    span = float(a.max() - a.min())
    return span / (2 * LEVELS) + 1e-7 * max(abs(float(a.max())), abs(float(a.min())), span)


def _affine(geo: Geometry) -> np.ndarray:
    """NIfTI's voxel-to-RAS affine of a SimpleITK (LPS) grid."""
    if len(geo.size) != 3:
        raise ValueError(f"16-bit maps are written for 3-D grids, got {len(geo.size)}-D")
    direction = np.asarray(geo.direction, dtype=np.float64).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(geo.spacing)
    affine[:3, 3] = lps_to_ras @ np.asarray(geo.origin, dtype=np.float64)
    return affine


def write_uint16(array: np.ndarray, geo: Geometry, path: str | os.PathLike[str]) -> Path:
    """Write a float map as scaled uint16 on ``geo`` (atomically).

    Vector images (K values per voxel) are not written this way: SimpleITK
    2.5.7 crashes reading a scaled vector NIfTI (``malloc(): unaligned tcache
    chunk detected``), so they stay float32.

    Args:
        array: (z, y, x) in SimpleITK's array order.
        geo: The grid.
        path: A ``.nii.gz`` file.

    Returns:
        ``path``.

    Raises:
        ValueError: the array does not match the grid, or is not finite.
    """
    import nibabel as nib

    a = np.asarray(array)
    grid = tuple(reversed(geo.size))
    if a.shape != grid:
        raise ValueError(f"array shape {a.shape} does not match the grid (z, y, x) = {grid}")
    q, slope, inter = quantize(a)
    data = q.transpose(2, 1, 0)  # NIfTI's (x, y, z)
    affine = _affine(geo)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_slope_inter(slope, inter)
    hdr["descrip"] = DESCRIPTION.encode()
    out = Path(path)
    with atomic_path(out) as tmp:
        nib.save(img, str(tmp))
    return out
