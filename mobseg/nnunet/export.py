"""Export of stitched Monte-Carlo moments to the CT's original grid (SPEC sections 5, 7).

nnU-Net's own exporter averages logits and applies softmax; the moments here
are already probabilities, so they get their own export that undoes nnU-Net's
preprocessing in the same order as nnU-Net's export does:

1. resample the 2C+1 moment channels from the preprocessed grid to the shape
   after cropping, with the configuration's probability resampling (linear,
   order 1; nearest along a separated anisotropic axis). Linear interpolation
   is a convex combination, so the resampled moments are the moments of a
   mixture and Var[p] >= 0 and MI >= 0 still hold;
2. put the crop back into the full volume (``bbox_used_for_cropping``);
   voxels outside nnU-Net's non-zero crop get p(background) = 1 and zero
   variance and entropy;
3. undo nnU-Net's axis transpose (``transpose_backward``).

Then, per voxel, with p = E[p] and s = E[p^2]:

- segmentation = argmax_c p_c (uint8);
- foreground probability p_1 (float32; C > 2: a vector image of p_1..p_{C-1});
- Var[p_1] = s_1 - p_1^2, clipped at 0 (C > 2: a vector image);
- predictive entropy H(p) = -sum_c p_c ln p_c (nats);
- mutual information H(p) - E[H(p)], clipped at 0 (nats).

For a point-mass model (``deterministic``, the backbone) Var and MI are 0 by
definition: the spread between overlapping tiles of one deterministic
network is not sampling variance.

Sample label maps (``<case>_sample<k>.nii.gz``, uint8, k = 0..S-1) go through
the same three steps with nnU-Net's segmentation resampling (each label
resampled as a mask, order 1, threshold 0.5); outside the crop they are
background.

Files are written atomically on the grid (size, spacing, origin, direction)
of the input CT, read from the input file's header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from mobseg.data.nifti import Geometry, atomic_path, write_array

#: Suffixes of the files written per case.
OUTPUT_SUFFIXES: tuple[str, ...] = ("seg", "prob", "var", "entropy", "mi")


def output_paths(out_dir: Path, case: str, samples: int = 0) -> dict[str, Path]:
    """``{suffix: <out_dir>/<case>_<suffix>.nii.gz}`` for every output.

    Args:
        out_dir: Output folder.
        case: Case id.
        samples: S sample label maps, named ``sample0`` .. ``sample<S-1>``.
    """
    suffixes = (*OUTPUT_SUFFIXES, *(f"sample{i}" for i in range(samples)))
    return {s: out_dir / f"{case}_{s}.nii.gz" for s in suffixes}


def _restore_geometry_args(
    properties: dict[str, Any], plans_manager: Any, configuration_manager: Any
) -> tuple[list[int], list[float], list[float]]:
    """Shape after cropping, the preprocessed spacing and the cropped spacing (transposed)."""
    tf = plans_manager.transpose_forward
    spacing_t = [properties["spacing"][i] for i in tf]
    shape_crop = list(properties["shape_after_cropping_and_before_resampling"])
    current = (
        configuration_manager.spacing
        if len(configuration_manager.spacing) == len(shape_crop)
        else [spacing_t[0], *configuration_manager.spacing]
    )
    return shape_crop, list(current), spacing_t


def _uncrop_untranspose(
    cropped: np.ndarray, properties: dict[str, Any], plans_manager: Any, fill: np.ndarray
) -> np.ndarray:
    """Put (K, *crop) into the full volume (``fill`` per channel outside) and transpose back."""
    full = np.empty((cropped.shape[0], *properties["shape_before_cropping"]), dtype=cropped.dtype)
    full[...] = fill.reshape((-1,) + (1,) * (full.ndim - 1))
    bbox = properties["bbox_used_for_cropping"]
    region = (slice(None), *[slice(int(lo), int(hi)) for lo, hi in bbox])
    full[region] = cropped
    back = [0] + [i + 1 for i in plans_manager.transpose_backward]
    return np.ascontiguousarray(full.transpose(back))


def read_geometry(path: str | Path) -> Geometry:
    """The grid of an image file, from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return Geometry(
        size=tuple(int(s) for s in reader.GetSize()),
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(s) for s in reader.GetOrigin()),
        direction=tuple(float(s) for s in reader.GetDirection()),
    )


def moments_to_original_grid(
    moments: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    plans_manager: Any,
    configuration_manager: Any,
    num_classes: int,
) -> np.ndarray:
    """Undo resampling, cropping and transpose on the stitched moments.

    Args:
        moments: (2C+1, *preprocessed_shape): E[p], E[p^2], E[H(p)].
        properties: nnU-Net's case properties from preprocessing.
        plans_manager: nnU-Net's PlansManager.
        configuration_manager: nnU-Net's ConfigurationManager.
        num_classes: C.

    Returns:
        (2C+1, *original_shape) float32 in the image file's array order
        (z, y, x for SimpleITK).
    """
    m = moments.detach().cpu().numpy() if isinstance(moments, torch.Tensor) else moments
    m = np.asarray(m, dtype=np.float32)
    if m.ndim != 4 or m.shape[0] != 2 * num_classes + 1:
        raise ValueError(
            f"moments must have shape (2C+1, x, y, z) with C = {num_classes}, got {m.shape}"
        )
    shape_crop, current, spacing_t = _restore_geometry_args(
        properties, plans_manager, configuration_manager
    )
    if tuple(m.shape[1:]) != tuple(shape_crop):
        m = configuration_manager.resampling_fn_probabilities(m, shape_crop, current, spacing_t)
        m = np.asarray(m, dtype=np.float32)
    fill = np.zeros(m.shape[0], dtype=np.float32)
    fill[0] = 1.0  # E[p_background] outside the crop
    fill[num_classes] = 1.0  # E[p_background^2]
    return _uncrop_untranspose(m, properties, plans_manager, fill)


def labels_to_original_grid(
    labels: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    plans_manager: Any,
    configuration_manager: Any,
) -> np.ndarray:
    """Undo resampling, cropping and transpose on label maps (sample masks).

    Args:
        labels: (S, *preprocessed_shape) integer labels.
        properties: nnU-Net's case properties from preprocessing.
        plans_manager: nnU-Net's PlansManager.
        configuration_manager: nnU-Net's ConfigurationManager.

    Returns:
        (S, *original_shape) uint8 in the image file's array order.
    """
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    lab = np.asarray(lab)
    if lab.ndim != 4:
        raise ValueError(f"labels must have shape (S, x, y, z), got {lab.shape}")
    shape_crop, current, spacing_t = _restore_geometry_args(
        properties, plans_manager, configuration_manager
    )
    out = np.empty((lab.shape[0], *shape_crop), dtype=np.uint8)
    for i in range(lab.shape[0]):  # one sample at a time
        one = lab[i : i + 1]
        if tuple(one.shape[1:]) != tuple(shape_crop):
            one = configuration_manager.resampling_fn_seg(one, shape_crop, current, spacing_t)
        out[i] = np.asarray(one)[0].astype(np.uint8)
    return _uncrop_untranspose(out, properties, plans_manager, np.zeros(len(out), np.uint8))


def derive_maps(moments: np.ndarray, num_classes: int, point_mass: bool) -> dict[str, np.ndarray]:
    """Segmentation, probability, variance, entropy and MI from moments.

    Args:
        moments: (2C+1, *shape): E[p], E[p^2], E[H(p)].
        num_classes: C.
        point_mass: The model has no logit variance (Var and MI are 0).

    Returns:
        ``seg`` (uint8), ``prob``, ``var`` ((C-1, *shape) float32 for C > 2,
        else (*shape)), ``entropy``, ``mi`` (float32).
    """
    c = num_classes
    p = np.clip(moments[:c], 0.0, 1.0)
    s = moments[c : 2 * c]
    expected_h = moments[2 * c]
    seg = np.argmax(p, axis=0).astype(np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = np.maximum(-plogp.sum(axis=0), 0.0).astype(np.float32)
    if point_mass:
        var = np.zeros_like(p[1:])
        mi = np.zeros_like(entropy)
    else:
        var = np.maximum(s[1:] - p[1:] ** 2, 0.0).astype(np.float32)
        mi = np.maximum(entropy - expected_h, 0.0).astype(np.float32)
    fg = p[1:].astype(np.float32)
    if c == 2:
        fg, var = fg[0], var[0]
    return {"seg": seg, "prob": fg, "var": var, "entropy": entropy, "mi": mi}


def _write_vector(array: np.ndarray, geo: Geometry, path: Path) -> None:
    """Write (K, z, y, x) as a K-component vector image on ``geo``."""
    vec = np.moveaxis(array, 0, -1)
    if vec.shape[:-1] != tuple(reversed(geo.size)):
        raise ValueError(f"array shape {array.shape} does not match the grid {geo.size}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(vec), isVector=True)
    img.SetSpacing(geo.spacing)
    img.SetOrigin(geo.origin)
    img.SetDirection(geo.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def write_case(
    maps: dict[str, np.ndarray], geometry: Geometry, out_dir: Path, case: str
) -> dict[str, Path]:
    """Write the maps of one case on ``geometry`` (atomically); returns the paths.

    The segmentation is written last, so its presence marks a complete case.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, case)
    dtypes = {"seg": np.uint8}
    for name in (*[s for s in OUTPUT_SUFFIXES if s != "seg"], "seg"):
        arr = maps[name]
        if arr.ndim == 4:
            _write_vector(arr.astype(np.float32), geometry, paths[name])
        else:
            write_array(arr, geometry, paths[name], dtype=dtypes.get(name, np.float32))
    return paths


def export_moments(
    moments: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    plans_manager: Any,
    configuration_manager: Any,
    num_classes: int,
    point_mass: bool,
    reference: str | Path,
    out_dir: Path,
    case: str,
    samples: torch.Tensor | np.ndarray | None = None,
) -> dict[str, Path]:
    """Resample, uncrop, untranspose, derive the maps and write them for one case.

    Args:
        moments: (2C+1, *preprocessed_shape) stitched moments.
        properties: nnU-Net's case properties from preprocessing.
        plans_manager: nnU-Net's PlansManager.
        configuration_manager: nnU-Net's ConfigurationManager.
        num_classes: C.
        point_mass: The model has no logit variance.
        reference: The input CT; the outputs get its exact grid.
        out_dir: Output folder.
        case: Case identifier (file prefix).
        samples: (S, *preprocessed_shape) sample label maps, written as
            ``<case>_sample<k>.nii.gz`` before the segmentation; None = none.

    Returns:
        The written files by suffix.

    Raises:
        ValueError: the restored array does not match the reference grid.
    """
    geo = read_geometry(reference)
    full = moments_to_original_grid(
        moments, properties, plans_manager, configuration_manager, num_classes
    )
    if tuple(full.shape[1:]) != tuple(reversed(geo.size)):
        raise ValueError(
            f"restored prediction {full.shape[1:]} does not match the input grid "
            f"{tuple(reversed(geo.size))} (z, y, x)"
        )
    maps = derive_maps(full, num_classes, point_mass)
    written: dict[str, Path] = {}
    if samples is not None and len(samples):
        restored = labels_to_original_grid(
            samples, properties, plans_manager, configuration_manager
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, lab in enumerate(restored):
            path = out_dir / f"{case}_sample{i}.nii.gz"
            write_array(lab, geo, path, dtype=np.uint8)
            written[f"sample{i}"] = path
    # the segmentation is written last (write_case), so it marks a complete case
    return {**written, **write_case(maps, geo, out_dir, case)}
