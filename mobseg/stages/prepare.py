"""Stage ``prepare``: source data -> filtered cases, splits, nnU-Net raw dataset.

``mobseg prepare --organ NAME --source {zenodo|phantom|DIR|ZIP}`` (SPEC
sections 1 and 7). The steps, each restartable:

1. **Source.** ``zenodo`` downloads (resumably, md5-verified) the
   TotalSegmentator v2.0.1 archive to ``<workdir>/downloads`` (``--subset
   small``: the 102-scan record); ``phantom`` generates the synthetic phantom
   in ``<workdir>/sources/phantom``; otherwise the path of an extracted folder
   or of the zip itself. A zip is read member by member, never extracted.
2. **Scan.** For every case of ``meta.csv``: the organ is *visible* when its
   mask file exists and has at least ``--min-voxels`` voxels. Visible cases
   get their CT read and checked (complete gzip stream, finite values, the
   mask on the CT's grid: size, spacing, origin, direction), and are staged
   as ``<case>_0000.nii.gz`` (the CT's bytes unchanged, or resampled with
   ``--spacing``) and ``<case>.nii.gz`` (uint8 0/1 on the CT's grid). Every
   excluded case is recorded with its reason. A bad file is recorded and
   skipped (``--on-error skip``, default) or stops the stage (``fail``).
   Decisions are cached per case, so a rerun after an interruption goes on
   where it stopped.
3. **Split** the included cases (seeded; test fraction, then validation
   fraction of the rest; see :mod:`mobseg.data.splits`). The official
   ``split`` column is kept for reference.
4. **Write** the nnU-Net raw dataset ``<nnUNet_raw>/DatasetXXX_<organ>``
   (train+val in imagesTr/labelsTr, test in imagesTs/labelsTs, dataset.json),
   ``<nnUNet_preprocessed>/DatasetXXX_<organ>/splits_final.json`` (fold 0 = our
   train/val), ``<workdir>/data/<organ>/splits.json`` and ``cases.csv``.

Nothing crops or otherwise looks at the labels beyond counting voxels, so no
test label can leak into training. Every file is written under a temporary
name and renamed; nothing is written outside the workdir (unless the user
pointed the nnUNet_* variables elsewhere).

Dataset ids (stable): pancreas 501, gallbladder 502, duodenum 503,
adrenal_gland_left 504; any other structure 510 + its index in the sorted
list of 117 names; the phantom adds 300 (``Dataset801_pancreas_phantom``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from mobseg import progress
from mobseg.data import nifti
from mobseg.data.meta import MetaProblem, parse_meta
from mobseg.data.phantom import PhantomConfig, ensure_phantom
from mobseg.data.source import (
    DirSource,
    NnunetRawSource,
    Source,
    ct_relpath,
    mask_relpath,
    open_source,
)
from mobseg.data.splits import Splits, check_fractions, make_splits
from mobseg.data.structures import PAPER_ORGANS, STRUCTURES, resolve_organ
from mobseg.errors import ConfigurationError, InvalidInputError, MobsegError
from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import prepare_key
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "fail")
SUBSETS = ("full", "small")
#: Reasons that mean a broken input (``--on-error`` applies); others are filtering.
ERROR_REASONS = (
    "ct_missing",
    "corrupt_file",
    "non_finite",
    "geometry_mismatch",
    "non_binary",
    "duplicate_id",
    "malformed_meta_row",
    "unsafe_archive_entry",
)
FILTER_REASONS = ("absent", "too_small", "mask_missing")
#: The paper's Table 1 (train/val/test after filtering), for comparison.
PAPER_SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "pancreas": (648, 130, 163),
    "gallbladder": (524, 105, 131),
    "duodenum": (614, 154, 154),
    "adrenal_gland_left": (640, 128, 160),
}
_PAPER_IDS = {organ: 501 + i for i, organ in enumerate(PAPER_ORGANS)}
PHANTOM_ID_OFFSET = 300
CASES_CSV_COLUMNS = ("case", "status", "split", "official_split", "voxels", "reason", "detail")
_SCAN_VERSION = 1


@dataclass(frozen=True)
class PrepareParams:
    """Options of ``mobseg prepare`` (SPEC section 7).

    Attributes:
        organ: Target structure (one of the 117).
        source: ``zenodo``, ``phantom``, an extracted dataset folder or a zip file.
        subset: ``full`` (1228 scans) or ``small`` (102 scans), zenodo only.
        seed: Seed of the splits (and of the phantom).
        test_fraction: Share of visible cases held out for testing.
        val_fraction: Share of the rest used for validation.
        min_voxels: A case is visible when its mask has at least this many voxels.
        spacing: Optional isotropic resampling (mm) of images and masks.
        num_cases: Number of phantom cases.
        size: Edge length in voxels of the phantom volumes.
        annotators: Annotator masks per phantom case.
        on_error: ``skip`` (record the bad case and go on) or ``fail``.
        zenodo_url: Base URL of Zenodo (or of a mirror with the same API).
    """

    organ: str
    source: str = "zenodo"
    subset: str = "full"
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    min_voxels: int = 1
    spacing: float | None = None
    num_cases: int = 40
    size: int = 64
    annotators: int = 3
    on_error: str = "skip"
    zenodo_url: str = "https://zenodo.org"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- names and ids -----------------------------------------------------------------
def dataset_id(organ: str, phantom: bool = False) -> int:
    """The stable nnU-Net dataset id of an organ (see the module docstring)."""
    base = _PAPER_IDS.get(organ)
    if base is None:
        base = 510 + STRUCTURES.index(resolve_organ(organ))
    return base + (PHANTOM_ID_OFFSET if phantom else 0)


def dataset_name(organ: str, phantom: bool = False) -> str:
    """``Dataset501_pancreas``, ``Dataset801_pancreas_phantom``, ..."""
    return f"Dataset{dataset_id(organ, phantom):03d}_{organ}" + ("_phantom" if phantom else "")


def _validated(params: PrepareParams) -> PrepareParams:
    organ = resolve_organ(params.organ)
    check_fractions(params.test_fraction, params.val_fraction)
    if params.on_error not in ON_ERROR:
        raise ConfigurationError(f"--on-error must be skip or fail, not {params.on_error!r}.")
    if params.subset not in SUBSETS:
        raise ConfigurationError(f"--subset must be full or small, not {params.subset!r}.")
    if params.min_voxels < 0:
        raise ConfigurationError(f"--min-voxels must be >= 0, not {params.min_voxels}.")
    if params.spacing is not None and not params.spacing > 0:
        raise ConfigurationError(f"--spacing must be positive, not {params.spacing}.")
    if params.seed < 0:
        raise ConfigurationError(f"--seed must be >= 0, not {params.seed}.")
    if params.source == "phantom":
        _phantom_config(params)  # validates num_cases, size, annotators
    return replace(params, organ=organ)


def _phantom_config(params: PrepareParams) -> PhantomConfig:
    return PhantomConfig(
        num_cases=params.num_cases,
        size=params.size,
        seed=params.seed,
        annotators=params.annotators,
    )


# -- the stage ---------------------------------------------------------------------
def run(ws: Workspace, params: PrepareParams, force: bool = False) -> StageRecord:
    """Prepare ``params.organ`` from ``params.source`` and record it in the manifest.

    A finished ``prepare/<organ>`` is returned as it is unless ``force``; an
    interrupted one resumes (finished phantom cases, downloads and per-case
    decisions are kept).

    Returns:
        The finished record; its outputs are ``dataset_id``, ``dataset_name``,
        ``raw_dir``, ``splits_json``, ``cases_csv``, ``counts`` ({"train",
        "val", "test", "excluded"}), ``splits`` (the case lists and seed),
        ``source``, ``source_dir`` and more.

    Raises:
        UnknownNameError: unknown organ (the closest names are suggested).
        ConfigurationError: invalid options.
        InvalidInputError: unusable source, or a bad case with ``on_error=fail``.
        DownloadError: the Zenodo download failed or did not verify.
    """
    params = _validated(params)
    manifest = Manifest(ws.manifest_path)
    key = prepare_key(params.organ)
    old = manifest.get(key)
    if old is not None and old.done and not force:
        changed = {
            k: v for k, v in params.to_dict().items() if k in old.params and old.params[k] != v
        }
        if changed:
            log.warning(
                "%s is already done with other options (%s); keeping it. Use --force to redo it.",
                key,
                ", ".join(f"{k}={old.params[k]!r}" for k in sorted(changed)),
            )
        else:
            log.info("%s is already done; nothing to do (use --force to redo it).", key)
        return old
    ws.ensure()
    env = ws.configure_nnunet_env()
    inputs = {"source": params.source}
    with manifest.running("prepare", key, params.to_dict(), inputs) as outputs:
        outputs.update(_prepare(ws, params, env, force))
    rec = manifest.get(key)
    assert rec is not None  # written just above by Manifest.running
    return rec


def _acquire(ws: Workspace, params: PrepareParams, force: bool) -> tuple[str, Source]:
    """(source label, opened source) for ``params.source``."""
    if params.source == "phantom":
        root = ensure_phantom(ws.sources / "phantom", params.organ, _phantom_config(params), force)
        return "phantom", DirSource(root)
    if params.source == "zenodo":
        from mobseg.data.zenodo import fetch_dataset

        archive = fetch_dataset(params.subset, ws.downloads, params.zenodo_url)
        return "zenodo", open_source(archive)
    src = open_source(params.source)
    if isinstance(src, NnunetRawSource) and src.label_value(params.organ) is None:
        names = ", ".join(f"{n!r} ({v})" for n, v in src.labels.items())
        raise ConfigurationError(
            f"The nnU-Net dataset has no label named {params.organ!r} (its labels: {names}).",
            "Give the --organ whose name dataset.json uses for the label.",
        )
    return src.kind, src


def _check_dataset_id_free(env: dict[str, str], name: str) -> None:
    prefix = name.split("_", 1)[0] + "_"
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        folder = Path(env[var])
        if not folder.is_dir():
            continue
        for other in folder.iterdir():
            if other.name.startswith(prefix) and other.name != name:
                raise ConfigurationError(
                    f"{folder} already holds {other.name}, which has the id mobseg uses for "
                    f"{name}.",
                    "Move it away, or point nnUNet_raw/nnUNet_preprocessed elsewhere.",
                )


class _CaseFailure(Exception):
    """A broken input of one case: a reason code and the user-facing error."""

    def __init__(self, reason: str, error: MobsegError) -> None:
        super().__init__(str(error))
        self.reason = reason
        self.error = error


@contextmanager
def _as(reason: str) -> Iterator[None]:
    try:
        yield
    except InvalidInputError as exc:
        raise _CaseFailure(reason, exc) from exc


@dataclass
class _Context:
    ws: Workspace
    params: PrepareParams
    source: Source
    work: Path

    @property
    def staged(self) -> Path:
        return self.work / "staged"

    @property
    def decisions(self) -> Path:
        return self.work / "cases"

    @property
    def tmp(self) -> Path:
        return self.work / "tmp"


def _read_checked(path: Path, case: str, display: str) -> sitk.Image:
    with _as("corrupt_file"):
        info = nifti.verify_nifti_file(path, case, display)
        image = nifti.read_image(path, case, check_finite=False, verify=False, display=display)
    with _as("non_finite"):
        nifti.check_finite_file(info, case, display)
        nifti.check_finite_image(image, case, display)
    return image


def _scan_case(ctx: _Context, case: str, official: str) -> dict[str, Any]:
    """Decide one case and stage its files when included.

    Raises:
        _CaseFailure: a broken input.
    """
    src, organ, params = ctx.source, ctx.params.organ, ctx.params
    ct_rel, m_rel = ct_relpath(), mask_relpath(organ)
    decision: dict[str, Any] = {"case": case, "official_split": official, "voxels": None}
    if not src.exists(case, ct_rel):
        raise _CaseFailure(
            "ct_missing",
            InvalidInputError(
                "The CT is missing.",
                case=case,
                path=src.location(case, ct_rel),
                hint="Every case listed in meta.csv needs its ct.nii.gz.",
            ),
        )
    if not src.exists(case, m_rel):
        return {
            **decision,
            "status": "excluded",
            "reason": "mask_missing",
            "detail": f"no {m_rel} in the case folder",
        }
    m_loc, ct_loc = src.location(case, m_rel), src.location(case, ct_rel)
    with _as("corrupt_file"), src.local_file(case, m_rel, ctx.tmp) as mpath:
        mask_img = _read_checked(mpath, case, m_loc)
    with _as("non_binary"):
        mask = nifti.binary_mask_array(mask_img, case, m_loc)
    voxels = int(mask.sum(dtype=np.int64))
    decision["voxels"] = voxels
    if voxels < params.min_voxels:
        reason = "absent" if voxels == 0 else "too_small"
        return {
            **decision,
            "status": "excluded",
            "reason": reason,
            "detail": f"{voxels} {organ} voxels (need at least {params.min_voxels})",
        }
    ctx.staged.mkdir(parents=True, exist_ok=True)
    image_path = ctx.staged / f"{case}_0000.nii.gz"
    label_path = ctx.staged / f"{case}.nii.gz"
    with _as("corrupt_file"), src.local_file(case, ct_rel, ctx.tmp) as cpath:
        ct = _read_checked(cpath, case, ct_loc)
        with _as("geometry_mismatch"):
            nifti.check_same_geometry(ct, mask_img, case, m_loc, what=f"{organ} mask")
        label = nifti.array_to_image(mask, ct, np.uint8)
        if params.spacing is None:
            with nifti.atomic_path(image_path) as tmp:
                if src.kind == "zip":
                    os.replace(cpath, tmp)  # the member's bytes, already copied out
                else:
                    shutil.copyfile(cpath, tmp)
        else:
            ct_r = nifti.resample_to_spacing(ct, params.spacing)
            label = nifti.resample_to_spacing(label, params.spacing, is_mask=True)
            left = int(sitk.GetArrayViewFromImage(label).sum(dtype=np.int64))
            decision["voxels_resampled"] = left
            if left < max(params.min_voxels, 1):
                return {
                    **decision,
                    "status": "excluded",
                    "reason": "too_small",
                    "detail": f"{left} {organ} voxels after resampling to {params.spacing} mm",
                }
            nifti.write_image(ct_r, image_path)
    nifti.write_image(label, label_path)
    return {
        **decision,
        "status": "included",
        "reason": "",
        "detail": "",
        "geometry": nifti.Geometry.of(ct).to_dict(),
    }


def _placed_paths(raw_dir: Path, case: str) -> list[tuple[Path, Path]]:
    """(image, label) locations a case may be in: imagesTr/labelsTr, imagesTs/labelsTs."""
    return [
        (raw_dir / f"images{s}" / f"{case}_0000.nii.gz", raw_dir / f"labels{s}" / f"{case}.nii.gz")
        for s in ("Tr", "Ts")
    ]


def _files_available(ctx: _Context, raw_dir: Path, case: str) -> bool:
    staged = (ctx.staged / f"{case}_0000.nii.gz", ctx.staged / f"{case}.nii.gz")
    for img, lbl in [staged, *_placed_paths(raw_dir, case)]:
        if img.exists() and lbl.exists():
            return True
    # the pair may be split over places after an interruption between two renames
    imgs = [staged[0], *(p[0] for p in _placed_paths(raw_dir, case))]
    lbls = [staged[1], *(p[1] for p in _placed_paths(raw_dir, case))]
    return any(p.exists() for p in imgs) and any(p.exists() for p in lbls)


def _scan_signature(ctx: _Context, source_label: str) -> dict[str, Any]:
    src = ctx.source
    ident: dict[str, Any] = {"kind": src.kind, "path": str(src.path)}
    if src.kind == "zip":
        st = src.path.stat()
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return {
        "version": _SCAN_VERSION,
        "source": source_label,
        "source_id": ident,
        "organ": ctx.params.organ,
        "min_voxels": ctx.params.min_voxels,
        "spacing": ctx.params.spacing,
    }


def _problem_decision(problem: MetaProblem, official: str = "") -> dict[str, Any]:
    return {
        "case": problem.image_id or "",
        "status": "excluded",
        "split": "",
        "official_split": official,
        "voxels": None,
        "reason": problem.reason,
        "detail": problem.message,
    }


def _prepare(
    ws: Workspace, params: PrepareParams, env: dict[str, str], force: bool
) -> dict[str, Any]:
    source_label, source = _acquire(ws, params, force)
    try:
        return _prepare_from(ws, params, env, force, source_label, source)
    finally:
        source.close()


def _prepare_from(
    ws: Workspace,
    params: PrepareParams,
    env: dict[str, str],
    force: bool,
    source_label: str,
    source: Source,
) -> dict[str, Any]:
    organ = params.organ
    phantom = source_label == "phantom"
    ds_id, ds_name = dataset_id(organ, phantom), dataset_name(organ, phantom)
    raw_dir = Path(env["nnUNet_raw"]) / ds_name
    pre_dir = Path(env["nnUNet_preprocessed"]) / ds_name
    _check_dataset_id_free(env, ds_name)
    data_dir = ws.data_dir(organ)
    ctx = _Context(ws, params, source, data_dir / "work")

    # -- start afresh when asked, or when the cached work is for other inputs -------
    signature = _scan_signature(ctx, source_label)
    sig_path = ctx.work / "signature.json"
    cached_sig = json.loads(sig_path.read_text()) if sig_path.is_file() else None
    if force or cached_sig != signature:
        for stale in (ctx.work, raw_dir):
            if stale.exists():
                shutil.rmtree(stale)
        (pre_dir / "splits_final.json").unlink(missing_ok=True)
        nifti.atomic_write_json(sig_path, signature)
    if ctx.tmp.exists():
        shutil.rmtree(ctx.tmp)

    refused = source.refused
    if refused and params.on_error == "fail":
        raise InvalidInputError(
            f"The archive holds {len(refused)} entries with absolute paths or '..' "
            f"(e.g. {refused[0]!r}); they are refused.",
            path=str(source.path),
            hint="Use the original archive, or --on-error skip to ignore those entries.",
        )

    rows, problems = parse_meta(source.meta_bytes(), source.meta_location())
    for prob in problems:
        if params.on_error == "fail":
            raise InvalidInputError(prob.message, case=prob.image_id, path=source.meta_location())
        log.warning("Skipping: %s", prob.message)
    listed = {r.image_id for r in rows} | {p.image_id for p in problems if p.image_id}
    unlisted = sorted(source.case_folders() - listed)
    if unlisted:
        log.warning(
            "%d case folder(s) are not listed in meta.csv and are ignored (e.g. %s).",
            len(unlisted),
            unlisted[0],
        )

    # -- scan: per-case decisions, cached ------------------------------------------------
    decisions: dict[str, dict[str, Any]] = {}
    ctx.decisions.mkdir(parents=True, exist_ok=True)
    for row in progress.track(rows, f"Reading cases ({organ})"):
        case = row.image_id
        cache = ctx.decisions / f"{case}.json"
        dec = json.loads(cache.read_text()) if cache.is_file() else None
        if dec is not None and dec["status"] == "included":
            if not _files_available(ctx, raw_dir, case):
                dec = None
        if dec is None:
            try:
                dec = _scan_case(ctx, case, row.split)
            except _CaseFailure as failure:
                dec = {
                    "case": case,
                    "status": "excluded",
                    "official_split": row.split,
                    "voxels": None,
                    "reason": failure.reason,
                    "detail": str(failure.error),
                }
            nifti.atomic_write_json(cache, dec)
        if dec["reason"] in ERROR_REASONS:
            if params.on_error == "fail":
                raise InvalidInputError(dec["detail"])
            log.warning("Skipping: %s", dec["detail"])
        decisions[case] = dec
    if ctx.tmp.exists():
        shutil.rmtree(ctx.tmp)

    included = sorted(c for c, d in decisions.items() if d["status"] == "included")
    if not included:
        raise InvalidInputError(
            f"No case shows {organ} with at least {params.min_voxels} voxel(s) "
            f"({len(decisions)} case(s) read, {len(problems)} unusable meta.csv row(s)).",
            path=str(source.path),
            hint="Check --organ, --min-voxels and the source.",
        )
    splits = make_splits(
        included,
        params.seed,
        params.test_fraction,
        params.val_fraction,
        official={c: decisions[c]["official_split"] for c in included},
    )
    if not splits.val:
        log.warning("The validation split is empty (%d usable cases).", len(included))

    # -- place the staged files into the nnU-Net raw dataset ---------------------------
    _place(ctx, raw_dir, splits)
    _write_dataset_json(raw_dir, organ, ds_name, splits, source_label)
    nifti.atomic_write_json(pre_dir / "splits_final.json", splits.nnunet_folds())

    # -- the record of every case -------------------------------------------------------
    all_rows: list[dict[str, Any]] = []
    for case, dec in decisions.items():
        all_rows.append({**dec, "split": splits.of(case) or ""})
    dup_or_bad = [_problem_decision(p, "") for p in problems]
    all_rows.extend(dup_or_bad)
    for entry in refused:
        all_rows.append(
            {
                "case": "",
                "status": "excluded",
                "split": "",
                "official_split": "",
                "voxels": None,
                "reason": "unsafe_archive_entry",
                "detail": f"refused archive entry {entry!r} (absolute path or '..')",
            }
        )
    all_rows.sort(key=lambda r: (r["case"] == "", r["case"], r["reason"]))
    cases_csv = data_dir / "cases.csv"
    nifti.atomic_write_text(cases_csv, _cases_csv_text(all_rows))
    splits_json = data_dir / "splits.json"
    excluded_reasons: dict[str, int] = {}
    for r in all_rows:
        if r["status"] == "excluded":
            excluded_reasons[r["reason"]] = excluded_reasons.get(r["reason"], 0) + 1
    nifti.atomic_write_json(
        splits_json,
        {
            **splits.to_dict(),
            "organ": organ,
            "dataset_name": ds_name,
            "excluded": sorted(r["case"] for r in all_rows if r["status"] == "excluded"),
        },
    )
    shutil.rmtree(ctx.work)

    counts = {**splits.counts(), "excluded": sum(excluded_reasons.values())}
    log.info(
        "%s: train %d, val %d, test %d, excluded %d (%s)",
        organ,
        counts["train"],
        counts["val"],
        counts["test"],
        counts["excluded"],
        ", ".join(f"{k} {v}" for k, v in sorted(excluded_reasons.items())) or "none",
    )
    return {
        "dataset_id": ds_id,
        "dataset_name": ds_name,
        "raw_dir": str(raw_dir),
        "preprocessed_dir": str(pre_dir),
        "splits_final": str(pre_dir / "splits_final.json"),
        "splits_json": str(splits_json),
        "cases_csv": str(cases_csv),
        "counts": counts,
        "splits": {
            "train": splits.train,
            "val": splits.val,
            "test": splits.test,
            "seed": splits.seed,
        },
        "excluded_reasons": excluded_reasons,
        "source": source_label,
        "source_kind": source.kind,
        "source_dir": str(source.root if isinstance(source, DirSource) else source.path),
        "organ": organ,
        "spacing": params.spacing,
    }


def _place(ctx: _Context, raw_dir: Path, splits: Splits) -> None:
    """Move staged (or misplaced) files to their split's folder; drop stale files."""
    expected: set[Path] = set()
    for split_name in ("train", "val", "test"):
        sub = "Ts" if split_name == "test" else "Tr"
        for case in getattr(splits, split_name):
            targets = (
                raw_dir / f"images{sub}" / f"{case}_0000.nii.gz",
                raw_dir / f"labels{sub}" / f"{case}.nii.gz",
            )
            staged = (ctx.staged / f"{case}_0000.nii.gz", ctx.staged / f"{case}.nii.gz")
            places = _placed_paths(raw_dir, case)
            for k, target in enumerate(targets):
                expected.add(target)
                if target.exists():
                    continue
                candidates = [staged[k], *(p[k] for p in places)]
                found = next((c for c in candidates if c.exists()), None)
                if found is None:  # cannot happen: decisions are checked against the files
                    raise InvalidInputError(f"Staged file of {case} vanished.", case=case)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(found, target)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        folder = raw_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path not in expected:
                path.unlink() if path.is_file() else shutil.rmtree(path)


def _write_dataset_json(
    raw_dir: Path, organ: str, name: str, splits: Splits, source_label: str
) -> None:
    phantom = source_label == "phantom"
    nifti.atomic_write_json(
        raw_dir / "dataset.json",
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, organ: 1},
            "numTraining": len(splits.train) + len(splits.val),
            "file_ending": ".nii.gz",
            "name": name,
            "description": (
                f"{organ} (binary) from the mobseg phantom (synthetic CT, known label law)"
                if phantom
                else f"{organ} (binary) from an nnU-Net raw dataset, cases without it dropped"
                if source_label == "nnunet"
                else f"{organ} (binary) from TotalSegmentator v2.0.1 CT, cases without it dropped"
            ),
            "reference": "Wasserthal et al., TotalSegmentator, Radiology: AI 2023"
            if not phantom
            else "mobseg",
            "licence": "CC BY 4.0" if not phantom else "Apache-2.0",
            "numTest": len(splits.test),
            "mobseg_splits": "fold 0 of splits_final.json = data/<organ>/splits.json train/val",
        },
    )


def _cases_csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CASES_CSV_COLUMNS)
    for r in rows:
        voxels = r.get("voxels")
        writer.writerow(
            [
                r["case"],
                r["status"],
                r.get("split", ""),
                r.get("official_split", ""),
                "" if voxels is None else voxels,
                r.get("reason", ""),
                r.get("detail", ""),
            ]
        )
    return buf.getvalue()


def read_cases_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a ``cases.csv`` written by prepare."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def summary_rows(ws: Workspace) -> list[dict[str, Any]]:
    """One row per finished ``prepare/<organ>``: the paper's Table 1, plus exclusions.

    Each row has ``organ``, ``source``, ``train``, ``val``, ``test``,
    ``excluded`` and ``paper`` (the published train/val/test, or None).
    """
    out = []
    for rec in Manifest(ws.manifest_path).find("prepare", "prepare/"):
        if not rec.done:
            continue
        organ = rec.key.split("/", 1)[1]
        counts = rec.outputs.get("counts", {})
        out.append(
            {
                "organ": organ,
                "source": rec.outputs.get("source", ""),
                "dataset": rec.outputs.get("dataset_name", ""),
                **{k: counts.get(k, 0) for k in ("train", "val", "test", "excluded")},
                "paper": PAPER_SPLIT_SIZES.get(organ),
            }
        )
    return out
