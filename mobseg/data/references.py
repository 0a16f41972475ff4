"""Reference masks of a case: every "rater", and the phantom's true probability.

Used by evaluation for GED / sample diversity (several reference masks) and
for the error against the known p* of the phantom. All masks are on the
case's own grid (the source CT's), whatever ``--spacing`` prepare used.

Where the raters come from, by source (the ``prepare/<organ>`` record's
``source`` and ``source_dir``):

- **phantom**: annotator 0 is ``sXXXX/segmentations/<organ>.nii.gz``, the
  others ``sXXXX/phantom/<organ>/annotator_<k>.nii.gz``; p* is
  ``sXXXX/phantom/<organ>/p_true.nii.gz``.
- **folder / zip** (TotalSegmentator layout): annotator 0 is
  ``sXXXX/segmentations/<organ>.nii.gz``. When the source also has
  ``reference/sXXXX_total_multilabel.nii.gz`` with its ``.labels.json``
  (label value -> structure name), as the shared example does, that volume's
  organ label is a second rater, extracted to
  ``<workdir>/data/<organ>/references/sXXXX/rater1.nii.gz``. Masks inside a zip
  are extracted (verified) to ``.../rater0.nii.gz`` on first use.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mobseg.data import phantom as phantom_mod
from mobseg.data.nifti import (
    geometry_differences,
    read_image,
    write_array,
)
from mobseg.data.source import DirSource, mask_relpath, open_source
from mobseg.errors import InvalidInputError
from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import prepare_command, prepare_key
from mobseg.workspace import Workspace

REFERENCE_DIR = "reference"


def _record(ws: Workspace, organ: str) -> StageRecord:
    return Manifest(ws.manifest_path).require(prepare_key(organ), prepare_command(organ))


def multilabel_names(case: str) -> tuple[str, str]:
    """File names (volume, label table) of a case's multi-label reference in ``reference/``."""
    return f"{case}_total_multilabel.nii.gz", f"{case}_total_multilabel.labels.json"


def label_value(labels_json: str | os.PathLike[str], organ: str) -> int:
    """The label value of ``organ`` in a ``{"<value>": "<name>"}`` JSON file.

    Raises:
        InvalidInputError: unreadable file, or the organ is not listed.
    """
    path = Path(labels_json)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        values = [int(k) for k, v in mapping.items() if v == organ]
    except (OSError, ValueError, AttributeError) as exc:
        raise InvalidInputError(f"Unreadable label table ({exc}).", path=str(path)) from exc
    if not values:
        raise InvalidInputError(f"The label table does not list {organ!r}.", path=str(path))
    return values[0]


def extract_organ_mask(
    labelled: str | os.PathLike[str],
    labels_json: str | os.PathLike[str],
    organ: str,
    out: str | os.PathLike[str],
    like: sitk.Image | None = None,
    case: str | None = None,
) -> Path:
    """Write the binary mask (uint8 0/1) of one organ of a multi-label volume.

    Args:
        labelled: The multi-label volume (integer labels).
        labels_json: Its label table, ``{"<value>": "<structure name>"}``.
        organ: The structure to extract.
        out: Output ``.nii.gz`` (written atomically).
        like: The case's grid; when the volume lies on another grid it is
            resampled onto it with nearest-neighbour interpolation of the
            binary mask.
        case: Case id, for messages.

    Returns:
        ``out``.
    """
    value = label_value(labels_json, organ)
    image = read_image(labelled, case)
    mask = sitk.Cast(sitk.BinaryThreshold(image, value, value, 1, 0), sitk.sitkUInt8)
    if like is not None and geometry_differences(mask, like):
        mask = sitk.Resample(mask, like, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    arr = sitk.GetArrayFromImage(mask).astype(np.uint8)
    return write_array(arr, mask, out)


def reference_masks(ws: Workspace, organ: str, case: str) -> list[Path]:
    """All annotator masks of a case, annotator 0 first, on the case's grid.

    For real data with one segmentation this is a one-element list; the shared
    example's ``reference/`` volume adds a second rater; the phantom gives K.

    Raises:
        MissingStageError: ``prepare/<organ>`` has not finished.
        InvalidInputError: the case has no mask in the source.
    """
    rec = _record(ws, organ)
    root = Path(rec.outputs["source_dir"])
    cache = ws.data_dir(organ) / "references" / case
    if rec.outputs.get("source") == "phantom":
        paths = phantom_mod.annotator_paths(root, organ, case)
        if not paths:
            raise InvalidInputError(
                "The phantom has no mask of this case.", case=case, path=str(root / case)
            )
        return paths
    source = open_source(root)
    try:
        if not source.exists(case, mask_relpath(organ)):
            raise InvalidInputError(
                f"The source has no {organ} mask for this case.",
                case=case,
                path=source.location(case, mask_relpath(organ)),
            )
        if not isinstance(source, DirSource):  # zip members, nnU-Net multi-label files
            first = cache / "rater0.nii.gz"
            if not first.exists():
                with source.local_file(case, mask_relpath(organ), cache / ".tmp") as tmp:
                    img = read_image(tmp, case, display=source.location(case, mask_relpath(organ)))
                    write_array(sitk.GetArrayFromImage(img), img, first)
            found = [first]
        else:
            found = [Path(source.location(case, mask_relpath(organ)))]
        vol_name, labels_name = multilabel_names(case)
        if source.exists(REFERENCE_DIR, vol_name) and source.exists(REFERENCE_DIR, labels_name):
            second = cache / "rater1.nii.gz"
            if not second.exists():
                like = read_image(found[0], case)
                tmp_dir = cache / ".tmp"
                with (
                    source.local_file(REFERENCE_DIR, vol_name, tmp_dir) as vol,
                    source.local_file(REFERENCE_DIR, labels_name, tmp_dir) as labels,
                ):
                    extract_organ_mask(vol, labels, organ, second, like=like, case=case)
            found.append(second)
        shutil.rmtree(cache / ".tmp", ignore_errors=True)
        return found
    finally:
        source.close()


def true_probability(ws: Workspace, organ: str, case: str) -> Path | None:
    """The phantom's true per-voxel probability p* of a case (float32 NIfTI), else None.

    Raises:
        MissingStageError: ``prepare/<organ>`` has not finished.
    """
    rec = _record(ws, organ)
    if rec.outputs.get("source") != "phantom":
        return None
    return phantom_mod.p_true_path(rec.outputs["source_dir"], organ, case)
