"""nnU-Net planning and preprocessing, run programmatically.

The chain is nnU-Net's own: dataset fingerprint -> experiment planner ->
preprocessor, on the raw dataset that ``mobseg prepare`` wrote. Two things are
added:

- a *derived* plan for small machines (:class:`~mobseg.nnunet.presets.PlanSpec`
  with ``derived=True``): nnU-Net's default planner runs at a coarser target
  spacing, then its ``3d_fullres`` configuration is shrunk to a small plain
  U-Net and patch; every other setting (normalisation, resampling, transpose)
  stays nnU-Net's;
- an in-process path (``num_processes == 1``) for fingerprinting and
  preprocessing, because nnU-Net always starts a ``spawn`` pool, which costs
  several seconds per worker and needs a ``__main__`` guard.

The fold-0 split ``splits_final.json`` written by ``prepare`` is kept (nnU-Net
never deletes it); if it is missing it is rebuilt from the prepare record.
A marker file ``mobseg_<plans>_<configuration>.json`` records which cases were
preprocessed with which plans, so a rerun skips work that is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobseg.errors import InvalidInputError
from mobseg.nnunet.env import quiet
from mobseg.nnunet.presets import PlanSpec
from mobseg.progress import progress_bar

log = logging.getLogger(__name__)


#: Foreground intensity samples per case of the in-process fingerprint.
MAX_SAMPLES_PER_CASE = 200_000


@dataclass(frozen=True)
class PlanResult:
    """Where the plans and the preprocessed data are.

    Attributes:
        dataset_name: ``DatasetXXX_name``.
        plans_identifier: The plans file's name without ``.json``.
        configuration: The configuration that was preprocessed.
        plans_file: Path of the plans JSON.
        preprocessed_dir: Folder of the preprocessed cases.
        cases: Identifiers of the preprocessed (training + validation) cases.
    """

    dataset_name: str
    plans_identifier: str
    configuration: str
    plans_file: Path
    preprocessed_dir: Path
    cases: tuple[str, ...]


def _nnunet_dirs(dataset_name: str) -> tuple[Path, Path]:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    return Path(str(nnUNet_raw)) / dataset_name, Path(str(nnUNet_preprocessed)) / dataset_name


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# -- fingerprint -------------------------------------------------------------------
def _fingerprint_in_process(dataset_name: str, out_file: Path) -> dict[str, Any]:
    """nnU-Net's dataset fingerprint, computed case by case in this process.

    Uses nnU-Net's per-case analysis (``DatasetFingerprintExtractor.analyze_case``)
    and combines the cases into the same JSON structure that nnU-Net writes:
    spacings, shapes after cropping, foreground intensity statistics per
    channel (mean, median, std, min, max, 0.5 and 99.5 percentiles of the
    pooled foreground samples) and the median relative size after cropping.

    nnU-Net draws 1e8 / (number of cases) foreground samples per case (25
    million per case for 4 cases, seconds each); here at most
    :data:`MAX_SAMPLES_PER_CASE`, plenty for the intensity percentiles.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    fpe = DatasetFingerprintExtractor(dataset_name, 1)
    keys = list(fpe.dataset.keys())
    if not keys:
        raise InvalidInputError(f"The nnU-Net dataset {dataset_name} has no training cases.")
    rw_class = determine_reader_writer_from_dataset_json(
        fpe.dataset_json, fpe.dataset[keys[0]]["images"][0]
    )
    per_case = min(
        int(fpe.num_foreground_voxels_for_intensitystats // len(keys)), MAX_SAMPLES_PER_CASE
    )
    shapes, spacings, relative = [], [], []
    samples: list[list[np.ndarray]] | None = None
    with progress_bar("fingerprint", len(keys)) as advance:
        for k in keys:
            shape, spacing, fg, _stats, rel = fpe.analyze_case(
                fpe.dataset[k]["images"], fpe.dataset[k]["label"], rw_class, per_case
            )
            shapes.append([int(s) for s in shape])
            spacings.append([float(s) for s in spacing])
            relative.append(float(rel))
            if samples is None:
                samples = [[] for _ in fg]
            for c, values in enumerate(fg):
                samples[c].append(np.asarray(values, dtype=np.float64))
            advance()
    stats: dict[str, dict[str, float]] = {}
    for c, chunks in enumerate(samples or []):
        values = np.concatenate(chunks) if chunks else np.zeros(0)
        if values.size == 0:
            raise InvalidInputError(
                f"No training case of {dataset_name} has foreground voxels; nnU-Net cannot "
                "derive intensity statistics."
            )
        p005, med, p995 = np.percentile(values, (0.5, 50.0, 99.5))
        stats[str(c)] = {
            "mean": float(values.mean()),
            "median": float(med),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "percentile_99_5": float(p995),
            "percentile_00_5": float(p005),
        }
    fingerprint = {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": stats,
        "median_relative_size_after_cropping": float(np.median(relative)),
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(fingerprint, indent=1))
    return fingerprint


def extract_fingerprint(dataset_id: int, dataset_name: str, num_processes: int) -> None:
    """Write ``dataset_fingerprint.json`` (in-process when ``num_processes == 1``)."""
    _, pre = _nnunet_dirs(dataset_name)
    if num_processes <= 1:
        _fingerprint_in_process(dataset_name, pre / "dataset_fingerprint.json")
        return
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )

    with quiet():
        fpe = DatasetFingerprintExtractor(dataset_id, num_processes)
        fpe.show_progress_bar = False
        fpe.run(overwrite_existing=True)


# -- planning ----------------------------------------------------------------------
def _planner_class(name: str) -> type:
    """nnU-Net planner class by name (imported directly, no recursive search)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import (
        residual_encoder_unet_planners as resenc,
    )

    known = {
        "ExperimentPlanner": ExperimentPlanner,
        "nnUNetPlannerResEncM": resenc.nnUNetPlannerResEncM,
        "nnUNetPlannerResEncL": resenc.nnUNetPlannerResEncL,
        "nnUNetPlannerResEncXL": resenc.nnUNetPlannerResEncXL,
    }
    if name not in known:
        raise ValueError(f"unknown nnU-Net planner {name!r}; known: {sorted(known)}")
    return known[name]


def derive_small_configuration(config: dict[str, Any], spec: PlanSpec) -> dict[str, Any]:
    """Shrink an nnU-Net ``3d_fullres`` configuration to ``spec``'s small plain U-Net.

    The patch is ``spec.patch_size`` per axis, capped by the median image size
    rounded up to a multiple of the total stride 2^(S-1) (S stages), and never
    below 2 x the total stride.

    Args:
        config: The configuration dict from nnU-Net's planner (not modified).
        spec: The derived plan's sizes.

    Returns:
        A new configuration dict.
    """
    n = len(spec.features_per_stage)
    if n < 2:
        raise ValueError(f"a derived plan needs >= 2 stages, got {spec.features_per_stage}")
    stride = 2 ** (n - 1)
    median = [float(s) for s in config["median_image_size_in_voxels"]]
    patch = []
    for m in median:
        cap = int(math.ceil(m / stride) * stride)
        patch.append(max(2 * stride, min(spec.patch_size, cap)))
    out = json.loads(json.dumps(config))
    arch = out["architecture"]
    kwargs = arch["arch_kwargs"]
    kwargs.pop("n_blocks_per_stage", None)
    kwargs.update(
        {
            "n_stages": n,
            "features_per_stage": list(spec.features_per_stage),
            "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [spec.conv_per_stage] * n,
            "n_conv_per_stage_decoder": [spec.conv_per_stage_decoder] * (n - 1),
        }
    )
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    out["patch_size"] = patch
    out["batch_size"] = spec.batch_size
    return out


def plan(dataset_id: int, dataset_name: str, spec: PlanSpec) -> Path:
    """Run nnU-Net's planner (and shrink the plan if ``spec.derived``).

    Returns:
        The plans file. It holds only ``spec.configuration``, so that nothing
        else is preprocessed or trained by accident.
    """
    _, pre = _nnunet_dirs(dataset_name)
    planner_cls = _planner_class(spec.planner)
    with quiet(), _threads_for_planning():
        planner = planner_cls(dataset_id, plans_name=spec.plans_name)
        if spec.spacing_factor != 1.0:
            target = np.asarray(planner.determine_fullres_target_spacing(), dtype=float)
            planner.overwrite_target_spacing = [float(s) for s in target * spec.spacing_factor]
        plans = planner.plan_experiment()
    plans = json.loads(json.dumps(plans, default=_json_default))
    if spec.configuration not in plans["configurations"]:
        raise InvalidInputError(
            f"nnU-Net made no {spec.configuration} configuration for {dataset_name} "
            f"(it made {sorted(plans['configurations'])}); are the images 3-D?"
        )
    config = plans["configurations"][spec.configuration]
    if spec.derived:
        config = derive_small_configuration(config, spec)
    plans["configurations"] = {spec.configuration: config}
    plans_file = pre / f"{spec.plans_name}.json"
    plans_file.write_text(json.dumps(plans, indent=1))
    return plans_file


@contextlib.contextmanager
def _threads_for_planning() -> Iterator[None]:
    """nnU-Net's planner sets torch's threads to ``nnUNet_n_proc_DA``; 0 would fail."""
    old = os.environ.get("nnUNet_n_proc_DA")
    if old is not None and int(old) < 1:
        os.environ["nnUNet_n_proc_DA"] = str(os.cpu_count() or 1)
    try:
        yield
    finally:
        if old is not None:
            os.environ["nnUNet_n_proc_DA"] = old


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


# -- preprocessing -----------------------------------------------------------------
def preprocess(
    dataset_id: int,
    dataset_name: str,
    plans_identifier: str,
    configuration: str,
    num_processes: int,
) -> tuple[Path, tuple[str, ...]]:
    """Preprocess every training case for ``configuration``.

    Returns:
        The preprocessed folder and the case identifiers.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw, pre = _nnunet_dirs(dataset_name)
    pm = PlansManager(str(pre / f"{plans_identifier}.json"))
    cm = pm.get_configuration(configuration)
    dataset_json = json.loads((pre / "dataset.json").read_text())
    dataset = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    out_dir = pre / cm.data_identifier
    cases = tuple(sorted(str(k) for k in dataset))
    if num_processes > 1:
        preprocessor = cm.preprocessor_class(verbose=False)
        preprocessor.show_progress_bar = False
        with quiet():
            preprocessor.run(dataset_id, configuration, plans_identifier, num_processes)
        return out_dir, cases
    import shutil

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    preprocessor = cm.preprocessor_class(verbose=False)
    with progress_bar("preprocess", len(cases)) as advance, quiet():
        for k in cases:
            preprocessor.run_case_save(
                str(out_dir / k),
                dataset[k]["images"],
                dataset[k]["label"],
                pm,
                cm,
                dataset_json,
            )
            advance()
    return out_dir, cases


def ensure_splits(dataset_name: str, splits: dict[str, list[str]] | None) -> Path:
    """Make sure ``splits_final.json`` holds fold 0 = ``splits`` train/val.

    Raises:
        InvalidInputError: the file is missing and no split is known, or it
            disagrees with ``splits``.
    """
    _, pre = _nnunet_dirs(dataset_name)
    path = pre / "splits_final.json"
    if path.exists():
        folds = json.loads(path.read_text())
        if splits is not None and (
            set(folds[0]["train"]) != set(splits["train"])
            or set(folds[0]["val"]) != set(splits["val"])
        ):
            raise InvalidInputError(
                "splits_final.json disagrees with the split recorded by prepare.",
                path=str(path),
                hint="Rerun `mobseg prepare --force` for this organ.",
            )
        return path
    if splits is None:
        raise InvalidInputError(
            "splits_final.json is missing and no split is recorded.",
            path=str(path),
            hint="Rerun `mobseg prepare --force` for this organ.",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"train": splits["train"], "val": splits["val"]}], indent=1))
    return path


def plan_and_preprocess(
    dataset_id: int,
    dataset_name: str,
    spec: PlanSpec,
    num_processes: int,
    splits: dict[str, list[str]] | None = None,
    force: bool = False,
) -> PlanResult:
    """Fingerprint, plan and preprocess, skipping what is complete.

    Args:
        dataset_id: nnU-Net dataset id.
        dataset_name: ``DatasetXXX_name``.
        spec: How to plan.
        num_processes: 1 = in-process, else nnU-Net's worker pools.
        splits: The prepare stage's split (``train``, ``val``), to check or
            rebuild ``splits_final.json``.
        force: Redo everything.

    Returns:
        Where the plans and preprocessed cases are.
    """
    raw, pre = _nnunet_dirs(dataset_name)
    if not (raw / "dataset.json").exists():
        raise InvalidInputError(
            f"The nnU-Net raw dataset {raw} is missing.",
            hint="Run `mobseg prepare` for this organ (with the same workdir) first.",
        )
    pre.mkdir(parents=True, exist_ok=True)
    plans_file = pre / f"{spec.plans_name}.json"
    marker = pre / f"mobseg_{spec.plans_name}_{spec.configuration}.json"
    raw_digest = _file_digest(raw / "dataset.json")
    if not force and marker.exists() and plans_file.exists():
        info = json.loads(marker.read_text())
        data_dir = Path(info["preprocessed_dir"])
        if (
            info.get("plans_digest") == _file_digest(plans_file)
            and info.get("raw_digest") == raw_digest
            and info.get("spec") == _spec_dict(spec)
            and data_dir.is_dir()
        ):
            ensure_splits(dataset_name, splits)
            log.info("plans and preprocessed data of %s are complete", dataset_name)
            return PlanResult(
                dataset_name,
                spec.plans_name,
                spec.configuration,
                plans_file,
                data_dir,
                tuple(info["cases"]),
            )
    marker.unlink(missing_ok=True)
    extract_fingerprint(dataset_id, dataset_name, num_processes)
    plans_file = plan(dataset_id, dataset_name, spec)
    ensure_splits(dataset_name, splits)
    data_dir, cases = preprocess(
        dataset_id, dataset_name, spec.plans_name, spec.configuration, num_processes
    )
    marker.write_text(
        json.dumps(
            {
                "plans_digest": _file_digest(plans_file),
                "raw_digest": raw_digest,
                "spec": _spec_dict(spec),
                "preprocessed_dir": str(data_dir),
                "cases": list(cases),
            },
            indent=1,
        )
    )
    return PlanResult(
        dataset_name, spec.plans_name, spec.configuration, plans_file, data_dir, cases
    )


def _spec_dict(spec: PlanSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(spec)))
