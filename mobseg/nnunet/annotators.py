"""Fine-tuning on several annotators: a random annotator's mask per case per iteration.

SSN and PHiSeg train on LIDC by drawing, each time a case is sampled, the
mask of one of its annotators. mobseg does the same with nnU-Net's data
pipeline:

1. :func:`preprocess_annotators` runs nnU-Net's own preprocessing of the
   backbone (``configuration_manager.preprocessor_class().run_case``: transpose,
   crop to the image's non-zero region, resample) on the case's image with
   each extra annotator's mask (annotators 1..K-1), and stores the resulting
   segmentation as ``<case>_a<k>.npy`` (int16, the shape of the case's
   preprocessed data). Annotator 0 is the nnU-Net label itself, whose
   preprocessed segmentation nnU-Net stored already. A mask on another grid
   than the raw image (``prepare --spacing``) is first resampled onto the
   image's grid (nearest neighbour).
2. :class:`AnnotatorDataset` wraps the training dataset: each
   ``load_case`` draws k uniformly from 0..K-1 with numpy's global random
   stream (the one nnU-Net's loaders and augmentation use, seeded per run and
   per worker) and returns annotator k's segmentation in place of the label.
   Patch cropping, augmentation and the deep-supervision targets then apply
   to it unchanged. The foreground oversampling still centres patches on
   annotator 0's foreground (nnU-Net's stored ``class_locations``).

Validation (checkpoint selection) keeps annotator 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mobseg.errors import InvalidInputError
from mobseg.fsutil import describe_os_error, publish, storage_error


def _verify_npy(path: Path) -> None:
    try:
        np.load(path, mmap_mode="r")  # the header's shape must fit the file's size
    except (ValueError, OSError) as exc:
        raise InvalidInputError(f"The cached array is incomplete ({exc}).", path=str(path)) from exc


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary file, verify, fsync, umask mode, rename."""
    tmp = path.with_name(path.name + ".tmp.npy")
    try:
        np.save(tmp, arr)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, describe_os_error(exc)) from exc
    publish(tmp, path, _verify_npy)


def cache_dir(base: Path, plans_file: Path, configuration: str) -> Path:
    """Folder of the preprocessed annotator masks of one backbone's plans and configuration."""
    digest = hashlib.sha256(Path(plans_file).read_bytes()).hexdigest()[:10]
    return Path(base) / f"{configuration}_{digest}"


def preprocess_annotators(
    plans_manager: Any,
    configuration_manager: Any,
    dataset_json: dict[str, Any],
    images: Mapping[str, Sequence[Path]],
    masks: Mapping[str, Sequence[Path]],
    out_dir: Path,
) -> dict[str, list[Path | None]]:
    """Preprocess annotators 1..K-1 of every case like nnU-Net preprocesses its labels.

    Args:
        plans_manager, configuration_manager, dataset_json: The backbone's nnU-Net objects.
        images: Case -> its raw image files (one per channel, nnU-Net order).
        masks: Case -> its annotator masks, annotator 0 (the nnU-Net label) first.
        out_dir: Where ``<case>_a<k>.npy`` are written (existing files are kept).

    Returns:
        Case -> ``[None, path_1, ..., path_{K-1}]`` (None: annotator 0, nnU-Net's own
        preprocessed label).
    """
    import SimpleITK as sitk

    from mobseg.nnunet.env import quiet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    found: dict[str, list[Path | None]] = {}
    for case, case_masks in masks.items():
        files: list[Path | None] = [None]
        for k, mask in enumerate(case_masks[1:], start=1):
            out = out_dir / f"{case}_a{k}.npy"
            files.append(out)
            if out.exists():
                continue
            seg_file = Path(mask)
            image = sitk.ReadImage(str(images[case][0]))
            seg_img = sitk.ReadImage(str(seg_file))
            tmp = None
            if not _same_grid(seg_img, image):
                seg_img = sitk.Resample(
                    seg_img, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0
                )
                tmp = out_dir / f"{case}_a{k}.resampled.nii.gz"
                sitk.WriteImage(seg_img, str(tmp), True)
                seg_file = tmp
            with quiet():
                _, seg, _ = preprocessor.run_case(
                    [str(p) for p in images[case]],
                    str(seg_file),
                    plans_manager,
                    configuration_manager,
                    dataset_json,
                )
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            _atomic_save(out, np.asarray(seg).astype(np.int16, copy=False))
        found[case] = files
    return found


def _same_grid(a: Any, b: Any) -> bool:
    """Whether two SimpleITK images share size, spacing, origin and direction (1e-4 tolerance)."""
    if a.GetSize() != b.GetSize():
        return False
    return all(
        np.allclose(f(a), f(b), atol=1e-4)
        for f in (lambda i: i.GetSpacing(), lambda i: i.GetOrigin(), lambda i: i.GetDirection())
    )


class AnnotatorDataset:
    """A training dataset whose ``load_case`` returns a random annotator's segmentation.

    Args:
        base: nnU-Net's dataset (``identifiers`` and ``load_case``).
        segs: Case -> ``[None, path_1, ...]`` from :func:`preprocess_annotators`;
            cases not listed keep their label.

    Attributes:
        draws: (case, k) of every ``load_case``, in order (for inspection).
    """

    def __init__(self, base: Any, segs: Mapping[str, Sequence[Path | None]]) -> None:
        self._base = base
        self._segs = {c: list(v) for c, v in segs.items()}
        self.draws: list[tuple[str, int]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_base", "_segs", "draws"):
            raise AttributeError(name)  # not yet set (e.g. while unpickling in a worker)
        return getattr(self._base, name)

    def __getitem__(self, identifier: str) -> Any:
        return self.load_case(identifier)

    def load_case(self, identifier: str) -> tuple[Any, Any, Any, Any]:
        data, seg, seg_prev, properties = self._base.load_case(identifier)
        files = self._segs.get(identifier)
        if files:
            k = int(np.random.randint(len(files)))
            self.draws.append((identifier, k))
            path = files[k]
            if path is not None:
                other = np.load(path, mmap_mode="r")
                if tuple(other.shape) != tuple(seg.shape):
                    raise RuntimeError(
                        f"Annotator {k} of case {identifier} was preprocessed to shape "
                        f"{tuple(other.shape)}, the label to {tuple(seg.shape)}; delete "
                        f"{Path(path).parent} to preprocess the annotators again."
                    )
                seg = other
        return data, seg, seg_prev, properties
