"""Export of stitched distribution parameters to the CT's original grid (SPEC sections 5, 7).

nnU-Net's own exporter resamples the stitched logits to the CT's grid and
only then applies softmax. mobseg does the same with the per-voxel
parameters of the logit distribution (for C = 2 the mean m and variance s^2
of d = eta_1 - eta_0; see :mod:`mobseg.core.inference`), undoing nnU-Net's
preprocessing in the order of nnU-Net's export:

1. resample the P parameter channels from the preprocessed grid to the shape
   after cropping with the configuration's probability resampling (the one
   nnU-Net applies to logits: linear, order 1; nearest along a separated
   anisotropic axis). Each resampled value is a convex combination of its
   neighbours' values, so a variance stays >= 0 (a covariance PSD);
2. put the crop back into the full volume (``bbox_used_for_cropping``);
   outside nnU-Net's non-zero crop the organ is certainly absent: m = -100,
   s^2 = 0 (p = sigmoid(-100) = 4e-44);
3. undo nnU-Net's axis transpose (``transpose_backward``);
4. compute the maps there, voxel by voxel, from each voxel's own
   distribution: exactly by quadrature for C = 2, by Monte Carlo for C > 2
   (:func:`mobseg.core.inference.voxel_maps`). Moments are never
   interpolated between voxels: between a voxel with p = 0 and one with
   p = 1 that would give Var[p] = 0.25 and MI = ln 2 that no model predicted.

Per voxel: segmentation = argmax E[p] (uint8; for C = 2, E[p] > 1/2); foreground
E[p] (float32; C > 2: a vector image of classes 1..C-1); Var[p] of the
foreground; predictive entropy H(E[p]) and mutual information
H(E[p]) - E[H(p)] (nats). With ``logits`` in the saved maps and C = 2, also
``<case>_logit_mean.nii.gz`` (m) and ``<case>_logit_var.nii.gz`` (s^2) on the
CT's grid, from which every map can be recomputed. A mixture of passes (MC
dropout, ``--tta-mixture``; :mod:`mobseg.core.mixture`) carries a third
channel, the between-pass variance Var_t(m_t) of d, resampled like the
others and written as ``<case>_logit_var_between.nii.gz`` (``between``).

Sample label maps (``<case>_sample<k>.nii.gz``, uint8, k = 0..S-1) go through
steps 1-3 with nnU-Net's segmentation resampling (each label resampled as a
mask, order 1, threshold 0.5); outside the crop they are background.

Files are written atomically on the grid (size, spacing, origin, direction)
of the input CT, read from the input file's header. The float maps are
float32, or with ``dtype="uint16"`` scaled 16-bit integers
(:mod:`mobseg.data.quantized`: half the bytes before compression, an
absolute error of at most (max - min) / 131070 per file); vector images
(C > 2) stay float32. With ``nnunet_names`` the segmentation is
``<case>.nii.gz`` (nnU-Net's naming) and every other file goes to the
subfolder ``maps/``, because nnU-Net's evaluation takes every ``.nii.gz`` of
its prediction folder for a case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from mobseg.core.inference import num_parameter_channels, voxel_maps
from mobseg.data.nifti import Geometry, atomic_path, write_array
from mobseg.data.quantized import write_uint16

#: Maps written per case by default (``seg`` is always written, last).
OUTPUT_SUFFIXES: tuple[str, ...] = ("seg", "prob", "var", "entropy", "mi")
#: Names ``--save`` accepts: the default maps, and ``logits`` (C = 2: m and s^2).
SAVE_CHOICES: tuple[str, ...] = (*OUTPUT_SUFFIXES, "logits", "between")
#: The files of ``logits``.
LOGIT_SUFFIXES: tuple[str, ...] = ("logit_mean", "logit_var")
#: The file of ``between``: the between-pass variance of d of a mixture of passes.
BETWEEN_SUFFIX = "logit_var_between"
#: m outside nnU-Net's crop (certain background).
OUTSIDE_LOGIT = -100.0
#: Storage of the float maps: float32, or scaled 16-bit integers.
DTYPES: tuple[str, ...] = ("float32", "uint16")
#: Subfolder of every file but the segmentation with ``nnunet_names``.
MAPS_SUBDIR = "maps"


def file_suffixes(save: tuple[str, ...] = OUTPUT_SUFFIXES) -> tuple[str, ...]:
    """The file suffixes of the maps ``save`` (``logits`` gives two files), ``seg`` last."""
    out: list[str] = []
    names = {"logits": LOGIT_SUFFIXES, "between": (BETWEEN_SUFFIX,)}
    for name in save:
        out.extend(names.get(name, [name]))
    return (*[s for s in out if s != "seg"], "seg")


def output_paths(
    out_dir: Path,
    case: str,
    samples: int = 0,
    save: tuple[str, ...] = OUTPUT_SUFFIXES,
    nnunet_names: bool = False,
) -> dict[str, Path]:
    """``{suffix: <out_dir>/<case>_<suffix>.nii.gz}`` for every output.

    Args:
        out_dir: Output folder.
        case: Case id.
        samples: S sample label maps, named ``sample0`` .. ``sample<S-1>``.
        save: The maps written (see :data:`SAVE_CHOICES`).
        nnunet_names: The segmentation is ``<out_dir>/<case>.nii.gz`` and
            the other files are in ``<out_dir>/maps/``.
    """
    suffixes = (*file_suffixes(save), *(f"sample{i}" for i in range(samples)))
    maps_dir = maps_folder(out_dir, nnunet_names)
    paths = {s: maps_dir / f"{case}_{s}.nii.gz" for s in suffixes}
    if nnunet_names:
        paths["seg"] = out_dir / f"{case}.nii.gz"
    return paths


def maps_folder(out_dir: Path, nnunet_names: bool = False) -> Path:
    """The folder of every file but the segmentation (see :func:`output_paths`)."""
    return out_dir / MAPS_SUBDIR if nnunet_names else out_dir


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


def parameters_to_original_grid(
    params: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    plans_manager: Any,
    configuration_manager: Any,
    num_classes: int,
    mixture: bool = False,
) -> np.ndarray:
    """Undo resampling, cropping and transpose on stitched distribution parameters.

    Args:
        params: (P, *preprocessed_shape), see :func:`mobseg.core.inference.marginal_parameters`.
        properties: nnU-Net's case properties from preprocessing.
        plans_manager: nnU-Net's PlansManager.
        configuration_manager: nnU-Net's ConfigurationManager.
        num_classes: C.
        mixture: ``params`` has the extra between-pass channel of a mixture
            of passes (C = 2; zero outside the crop).

    Returns:
        (P, *original_shape) float32 in the image file's array order
        (z, y, x for SimpleITK).
    """
    p = params.detach().cpu().numpy() if isinstance(params, torch.Tensor) else params
    p = np.asarray(p, dtype=np.float32)
    channels = num_parameter_channels(num_classes) + (1 if mixture else 0)
    if p.ndim != 4 or p.shape[0] != channels:
        raise ValueError(
            f"parameters must have shape ({channels}, x, y, z) for C = {num_classes}, got {p.shape}"
        )
    shape_crop, current, spacing_t = _restore_geometry_args(
        properties, plans_manager, configuration_manager
    )
    if tuple(p.shape[1:]) != tuple(shape_crop):
        p = configuration_manager.resampling_fn_probabilities(p, shape_crop, current, spacing_t)
        p = np.asarray(p, dtype=np.float32)
    fill = np.zeros(channels, dtype=np.float32)  # zero (co)variance outside the crop
    if num_classes == 2:
        fill[0] = OUTSIDE_LOGIT
    else:
        fill[1:num_classes] = OUTSIDE_LOGIT  # background logit 0, the others -100
    return _uncrop_untranspose(p, properties, plans_manager, fill)


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


def derive_maps(
    params: np.ndarray | torch.Tensor,
    num_classes: int,
    samples: int = 30,
    generator: torch.Generator | None = None,
    mixture: bool = False,
) -> dict[str, np.ndarray]:
    """The maps of every :data:`SAVE_CHOICES` file from parameters on one grid.

    Args:
        params: (P, *shape) distribution parameters.
        num_classes: C.
        samples: Monte-Carlo samples per voxel for C > 2.
        generator: Random generator for C > 2.
        mixture: ``params`` ends with the between-pass variance channel.

    Returns:
        ``seg`` (uint8), ``prob``, ``var`` ((C-1, *shape) float32 for C > 2,
        else (*shape)), ``entropy``, ``mi`` (float32), for C = 2
        ``logit_mean`` and ``logit_var``, and with ``mixture``
        ``logit_var_between``.
    """
    t = torch.as_tensor(np.asarray(params, dtype=np.float32))
    between = None
    if mixture:
        t, between = t[:-1], t[-1]
    maps = voxel_maps(t, num_classes, samples=samples, generator=generator)
    out = {
        "seg": maps.seg.numpy(),
        "prob": maps.prob.float().numpy(),
        "var": maps.var.float().numpy(),
        "entropy": maps.entropy.float().numpy(),
        "mi": maps.mi.float().numpy(),
    }
    if num_classes == 2:
        out["logit_mean"] = t[0].numpy()
        out["logit_var"] = t[1].clamp_min(0).numpy()
    if between is not None:
        out[BETWEEN_SUFFIX] = between.clamp_min(0).numpy()
    return out


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
    maps: dict[str, np.ndarray],
    geometry: Geometry,
    out_dir: Path,
    case: str,
    save: tuple[str, ...] = OUTPUT_SUFFIXES,
    dtype: str = "float32",
    nnunet_names: bool = False,
) -> dict[str, Path]:
    """Write the maps ``save`` of one case on ``geometry`` (atomically); returns the paths.

    The segmentation is written last, so its presence marks a complete case.
    ``dtype`` (:data:`DTYPES`) stores the float maps; ``nnunet_names`` names
    the files as :func:`output_paths` does.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    paths = output_paths(out_dir, case, save=save, nnunet_names=nnunet_names)
    for name in file_suffixes(save):
        if name not in maps:
            raise ValueError(f"no {name!r} map for case {case!r} (two classes only?)")
        arr = maps[name]
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        if name == "seg":
            write_array(arr, geometry, paths[name], dtype=np.uint8)
        elif arr.ndim == 4:
            _write_vector(arr.astype(np.float32), geometry, paths[name])
        elif dtype == "uint16":
            write_uint16(arr, geometry, paths[name])
        else:
            write_array(arr, geometry, paths[name], dtype=np.float32)
    return paths


def export_parameters(
    params: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    plans_manager: Any,
    configuration_manager: Any,
    num_classes: int,
    reference: str | Path,
    out_dir: Path,
    case: str,
    samples: torch.Tensor | np.ndarray | None = None,
    save: tuple[str, ...] = OUTPUT_SUFFIXES,
    mc_samples: int = 30,
    mixture: bool = False,
    dtype: str = "float32",
    nnunet_names: bool = False,
) -> dict[str, Path]:
    """Resample, uncrop, untranspose, compute the maps and write them for one case.

    Args:
        params: (P, *preprocessed_shape) stitched distribution parameters.
        properties: nnU-Net's case properties from preprocessing.
        plans_manager: nnU-Net's PlansManager.
        configuration_manager: nnU-Net's ConfigurationManager.
        num_classes: C.
        reference: The input CT; the outputs get its exact grid.
        out_dir: Output folder.
        case: Case identifier (file prefix).
        samples: (S, *preprocessed_shape) sample label maps, written as
            ``<case>_sample<k>.nii.gz`` before the segmentation; None = none.
        save: The maps to write (:data:`SAVE_CHOICES`); the segmentation always.
        mc_samples: Monte-Carlo samples per voxel for C > 2.
        mixture: ``params`` has the between-pass channel of a mixture of passes.
        dtype: Storage of the float maps (:data:`DTYPES`).
        nnunet_names: Name the files as :func:`output_paths` does.

    Returns:
        The written files by suffix.

    Raises:
        ValueError: the restored array does not match the reference grid.
    """
    geo = read_geometry(reference)
    full = parameters_to_original_grid(
        params, properties, plans_manager, configuration_manager, num_classes, mixture
    )
    if tuple(full.shape[1:]) != tuple(reversed(geo.size)):
        raise ValueError(
            f"restored prediction {full.shape[1:]} does not match the input grid "
            f"{tuple(reversed(geo.size))} (z, y, x)"
        )
    maps = derive_maps(full, num_classes, samples=mc_samples, mixture=mixture)
    written: dict[str, Path] = {}
    if samples is not None and len(samples):
        restored = labels_to_original_grid(
            samples, properties, plans_manager, configuration_manager
        )
        paths = output_paths(out_dir, case, len(restored), save, nnunet_names)
        for i, lab in enumerate(restored):
            path = paths[f"sample{i}"]
            path.parent.mkdir(parents=True, exist_ok=True)
            write_array(lab, geo, path, dtype=np.uint8)
            written[f"sample{i}"] = path
    # the segmentation is written last (write_case), so it marks a complete case
    return {**written, **write_case(maps, geo, out_dir, case, save, dtype, nnunet_names)}
