"""A fake study workdir for the evaluate and report tests.

Writes, for one organ, a tiny nnU-Net raw dataset (CTs and test labels), the
``prepare`` record, and prediction folders with the ``predict`` records of
several methods and seeds, in the manifest layout of SPEC section 7. The
probabilities are smooth functions of the distance to the organ, shifted and
sharpened per run, so every run has a different, known-sensible quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mobseg.core.config import HeadConfig
from mobseg.data.phantom import P_TRUE_NAME, SIDE_DIR
from mobseg.manifest import Manifest
from mobseg.stages.keys import predict_key, prepare_key
from mobseg.workspace import Workspace

SHAPE = (12, 28, 32)  # z, y, x
SPACING = (1.5, 1.25, 2.5)  # x, y, z (SimpleITK order)
ORIGIN = (-20.0, 10.0, 5.0)


def _image(arr: np.ndarray, spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def write(arr: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_image(arr, **kw), str(path))
    return path


def signed_distance(case_index: int) -> np.ndarray:
    """Ellipsoid 'organ': negative inside, in voxel-ish units."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij")
    cz, cy, cx = 6 + 0.5 * case_index, 14 - case_index, 15 + 1.5 * case_index
    rz, ry, rx = 3.0 + 0.3 * case_index, 6.0 + case_index, 7.0
    r = np.sqrt(((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return (r - 1.0) * 5.0


def true_probability(case_index: int) -> np.ndarray:
    """The phantom's p*: a logistic ramp across the organ boundary."""
    return (1.0 / (1.0 + np.exp(signed_distance(case_index)))).astype(np.float32)


def gt_mask(case_index: int) -> np.ndarray:
    return (signed_distance(case_index) < 0).astype(np.uint8)


def ct_volume(case_index: int, rng: np.random.Generator) -> np.ndarray:
    d = signed_distance(case_index)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij")
    body = ((y - 14) / 13) ** 2 + ((x - 16) / 15) ** 2 < 1
    ct = np.where(body, 30.0, -1000.0) + np.where(d < 0, 70.0, 0.0)
    ct += rng.normal(0, 15, SHAPE)
    return ct.astype(np.int16)


def prediction(case_index: int, quality: float, shift: float) -> dict[str, np.ndarray]:
    """prob, var, entropy, mi for one case; higher quality = sharper, less shifted."""
    d = signed_distance(case_index) + shift
    prob = 1.0 / (1.0 + np.exp(d * quality))
    prob = prob.astype(np.float32)
    var = (prob * (1 - prob) * 0.3).astype(np.float32)
    p = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)
    ent = (-(p * np.log(p) + (1 - p) * np.log(1 - p))).astype(np.float32)
    # MI = H[E p] - E H[p] >= 0: a fraction of the entropy, largest on the border
    return {"prob": prob, "var": var, "entropy": ent, "mi": (0.4 * ent).astype(np.float32)}


#: Joint sample masks predict saves for stochastic runs: shifts of the organ border.
SAMPLE_SHIFTS = (-0.8, 0.0, 0.9)


CASES = ("s0000", "s0001", "s0002")

#: (tag, HeadConfig or None for the backbone, quality, shift) of the fake runs.
RUNS = {
    "diagonal": (HeadConfig("diagonal"), 0.8, 1.5),
    "mob-b3-r16": (HeadConfig("mob"), 1.5, 0.3),
}

#: A fine-tuned deterministic control (its variance map is zero, as predict writes it).
CONTROL = {"deterministic": (HeadConfig("deterministic"), 1.1, 1.0)}


def build_study(
    root: Path,
    organ: str = "pancreas",
    seeds: tuple[int, ...] = (0, 1),
    runs: dict | None = None,
    cases: tuple[str, ...] = CASES,
    source: str = "phantom",
) -> Workspace:
    """Write the fake workdir; returns its Workspace.

    ``source="phantom"`` writes two more annotators and p* per case (the
    metrics against the truth apply); ``"folder"`` only the one segmentation
    of a real source (no truth, no GED).
    """
    runs = RUNS if runs is None else runs
    ws = Workspace(root).ensure()
    rng = np.random.default_rng(0)
    raw = ws.nnunet_raw / f"Dataset501_{organ}"
    source_dir = ws.sources / source
    for i, case in enumerate(cases):
        write(ct_volume(i, rng), raw / "imagesTs" / f"{case}_0000.nii.gz")
        write(gt_mask(i), raw / "labelsTs" / f"{case}.nii.gz")
        # phantom-style raters and p*: annotator 0 = the label, two shifted raters
        write(gt_mask(i), source_dir / case / "segmentations" / f"{organ}.nii.gz")
        if source != "phantom":
            continue
        side = source_dir / case / SIDE_DIR / organ
        for k, shift in ((1, -1.0), (2, 1.5)):
            mask = (signed_distance(i) + shift < 0).astype(np.uint8)
            write(mask, side / f"annotator_{k}.nii.gz")
        write(true_probability(i), side / P_TRUE_NAME)
    splits = ws.data_dir(organ) / "splits.json"
    splits.parent.mkdir(parents=True, exist_ok=True)
    splits.write_text(json.dumps({"train": [], "val": [], "test": list(cases)}))
    man = Manifest(ws.manifest_path)
    with man.running("prepare", prepare_key(organ), {"organ": organ}) as out:
        out.update(
            source=source,
            source_dir=str(source_dir),
            raw_dir=str(raw.relative_to(ws.root)),
            splits_json=str(splits.relative_to(ws.root)),
            counts={"train": 20, "val": 5, "test": len(cases), "excluded": 2},
        )
    for tag, (head, quality, shift) in runs.items():
        for seed in seeds:
            pred_dir = ws.prediction_dir(organ, tag, seed)
            for i, case in enumerate(cases):
                pr = prediction(i, quality + 0.1 * seed, shift - 0.2 * seed)
                if head is not None and head.method == "deterministic":
                    pr["var"] = np.zeros_like(pr["var"])
                for name, arr in pr.items():
                    write(arr, pred_dir / f"{case}_{name}.nii.gz")
                write((pr["prob"] > 0.5).astype(np.uint8), pred_dir / f"{case}_seg.nii.gz")
                if head is not None and head.method == "mob":
                    for k, s in enumerate(SAMPLE_SHIFTS):
                        mask = (signed_distance(i) + shift + s < 0).astype(np.uint8)
                        write(mask, pred_dir / f"{case}_sample{k}.nii.gz")
            params = {
                "organ": organ,
                "seed": seed,
                "head": None if head is None else head.to_dict(),
            }
            with man.running("predict", predict_key(organ, tag, seed), params) as out:
                out["pred_dir"] = str(pred_dir)
    return ws
