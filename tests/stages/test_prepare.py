"""The prepare stage: filtering, splits, nnU-Net dataset, bad inputs, resumption."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunet_testlib import nnunet_raw_dataset
from typer.testing import CliRunner

from mobseg.cli import app
from mobseg.data.source import write_case, write_meta
from mobseg.errors import ConfigurationError, InvalidInputError, UnknownNameError
from mobseg.manifest import Manifest
from mobseg.stages import prepare
from mobseg.stages.prepare import PrepareParams, read_cases_csv, run
from mobseg.workspace import Workspace

ORGAN = "pancreas"
SHAPE = (8, 12, 10)  # (z, y, x)
#: organ voxels per case (None: no mask file)
VOXELS: dict[str, int | None] = {
    "s0000": 30,
    "s0001": 0,
    "s0002": 25,
    "s0003": 40,
    "s0004": 2,
    "s0005": 33,
    "s0006": 27,
    "s0007": 0,
    "s0008": 50,
    "s0009": 31,
    "s0010": None,
    "s0011": 36,
}
VISIBLE = sorted(c for c, v in VOXELS.items() if v)
OFFICIAL = ("train", "val", "test")


def make_ct(
    seed: int,
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    origin: tuple[float, float, float] = (10.0, -20.0, 5.0),
    dtype: type = np.int16,
) -> sitk.Image:
    arr = np.random.default_rng(seed).integers(-1000, 400, size=SHAPE).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def make_mask(voxels: int, seed: int = 0) -> np.ndarray:
    flat = np.zeros(int(np.prod(SHAPE)), dtype=np.uint8)
    flat[np.random.default_rng(seed).choice(flat.size, voxels, replace=False)] = 1
    return flat.reshape(SHAPE)


def build_dataset(root: Path, voxels: dict[str, int | None] = VOXELS) -> Path:
    """A small TotalSegmentator-layout folder; every case also has a liver mask."""
    rows = []
    for i, (case, n) in enumerate(voxels.items()):
        masks: dict[str, np.ndarray] = {"liver": make_mask(5, seed=100 + i)}
        if n is not None:
            masks[ORGAN] = make_mask(n, seed=i)
        write_case(root, case, make_ct(i), masks)
        rows.append({"image_id": case, "split": OFFICIAL[i % 3], "study_type": " CT abdomen "})
    write_meta(root, rows)
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "Totalsegmentator_dataset_v201/") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return build_dataset(tmp_path / "src")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "work")


def params(source: Path | str, **kw: object) -> PrepareParams:
    return PrepareParams(organ=ORGAN, source=str(source), **kw)  # type: ignore[arg-type]


def cases_by_id(rec_outputs: dict) -> dict[str, dict[str, str]]:
    return {r["case"]: r for r in read_cases_csv(rec_outputs["cases_csv"]) if r["case"]}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    }


# -- the happy path ---------------------------------------------------------------------
def test_folder_source_filters_splits_and_writes_the_nnunet_dataset(
    dataset: Path, ws: Workspace
) -> None:
    rec = run(ws, params(dataset))
    out = rec.outputs
    assert rec.done and out["dataset_id"] == 501 and out["dataset_name"] == "Dataset501_pancreas"
    raw = Path(out["raw_dir"])
    assert raw == ws.nnunet_raw / "Dataset501_pancreas" and raw.is_absolute()
    assert out["source"] == "dir" and Path(out["source_dir"]) == dataset.resolve()

    rows = cases_by_id(out)
    assert set(rows) == set(VOXELS)
    assert {c for c, r in rows.items() if r["status"] == "included"} == set(VISIBLE)
    assert rows["s0001"]["reason"] == "absent" and rows["s0007"]["reason"] == "absent"
    assert rows["s0010"]["reason"] == "mask_missing"
    assert rows["s0000"]["official_split"] == "train" and rows["s0001"]["official_split"] == "val"
    assert rows["s0003"]["voxels"] == "40"

    splits = json.loads(Path(out["splits_json"]).read_text())
    n = len(VISIBLE)
    n_test = round(0.2 * n)
    n_val = round(0.2 * (n - n_test))
    assert (len(splits["test"]), len(splits["val"])) == (n_test, n_val)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == VISIBLE
    assert out["counts"] == {
        "train": n - n_test - n_val,
        "val": n_val,
        "test": n_test,
        "excluded": len(VOXELS) - n,
    }
    assert out["splits"] == {k: splits[k] for k in ("train", "val", "test", "seed")}
    for case in VISIBLE:
        assert rows[case]["split"] in splits and case in splits[rows[case]["split"]]
    assert sorted(sum(splits["official"].values(), [])) == VISIBLE

    folds = json.loads(
        (ws.nnunet_preprocessed / out["dataset_name"] / "splits_final.json").read_text()
    )
    assert folds == [{"train": splits["train"], "val": splits["val"]}]
    assert (
        Path(out["splits_final"])
        == ws.nnunet_preprocessed / out["dataset_name"] / "splits_final.json"
    )

    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"}
    assert ds["labels"] == {"background": 0, ORGAN: 1}
    assert ds["file_ending"] == ".nii.gz"
    assert ds["numTraining"] == len(splits["train"]) + len(splits["val"])
    tr = sorted(p.name for p in (raw / "imagesTr").iterdir())
    ts = sorted(p.name for p in (raw / "imagesTs").iterdir())
    assert tr == sorted(f"{c}_0000.nii.gz" for c in splits["train"] + splits["val"])
    assert ts == sorted(f"{c}_0000.nii.gz" for c in splits["test"])
    for case in VISIBLE:
        sub = "Ts" if case in splits["test"] else "Tr"
        image = raw / f"images{sub}" / f"{case}_0000.nii.gz"
        # the CT is the source's own file, byte for byte
        assert image.read_bytes() == (dataset / case / "ct.nii.gz").read_bytes()
        label = sitk.ReadImage(str(raw / f"labels{sub}" / f"{case}.nii.gz"))
        assert label.GetPixelID() == sitk.sitkUInt8
        arr = sitk.GetArrayFromImage(label)
        assert set(np.unique(arr)) <= {0, 1} and int(arr.sum()) == VOXELS[case]
        src_mask = sitk.GetArrayFromImage(
            sitk.ReadImage(str(dataset / case / "segmentations" / f"{ORGAN}.nii.gz"))
        )
        np.testing.assert_array_equal(arr, src_mask)
        ct = sitk.ReadImage(str(image))
        assert label.GetSize() == ct.GetSize()
        np.testing.assert_allclose(label.GetSpacing(), ct.GetSpacing())
        np.testing.assert_allclose(label.GetOrigin(), ct.GetOrigin())
        np.testing.assert_allclose(label.GetDirection(), ct.GetDirection())
    # the work area is gone, no temporary file is left anywhere
    assert not (ws.data_dir(ORGAN) / "work").exists()
    assert not [p for p in ws.root.rglob(".*") if "lock" not in p.name]


def test_splits_are_seeded_and_min_voxels_filters(dataset: Path, tmp_path: Path) -> None:
    a = run(Workspace(tmp_path / "a"), params(dataset, seed=3)).outputs
    b = run(Workspace(tmp_path / "b"), params(dataset, seed=3)).outputs
    c = run(Workspace(tmp_path / "c"), params(dataset, seed=4, min_voxels=26)).outputs
    sa, sb, sc = (json.loads(Path(o["splits_json"]).read_text()) for o in (a, b, c))
    assert (sa["train"], sa["val"], sa["test"]) == (sb["train"], sb["val"], sb["test"])
    assert sa["seed"] == 3 and sc["seed"] == 4
    rows = cases_by_id(c)
    assert rows["s0002"]["reason"] == "too_small" and rows["s0004"]["reason"] == "too_small"
    assert "25 pancreas voxels (need at least 26)" in rows["s0002"]["detail"]
    kept = sorted(sc["train"] + sc["val"] + sc["test"])
    assert kept == [v for v in VISIBLE if VOXELS[v] >= 26]


def test_zip_source_reads_only_what_is_needed_and_matches_the_folder(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = zip_folder(dataset, tmp_path / "ts.zip")
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: object, *a: object, **kw: object):  # type: ignore[no-untyped-def]
        opened.append(getattr(name, "filename", name))  # type: ignore[arg-type]
        return real_open(self, name, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    z = run(Workspace(tmp_path / "z"), params(archive)).outputs
    monkeypatch.undo()
    d = run(Workspace(tmp_path / "d"), params(dataset)).outputs
    assert z["source"] == "zip" and Path(z["source_dir"]) == archive.resolve()
    assert (
        json.loads(Path(z["splits_json"]).read_text())["train"]
        == json.loads(Path(d["splits_json"]).read_text())["train"]
    )
    strip = {c: {k: v for k, v in r.items() if k != "detail"} for c, r in cases_by_id(z).items()}
    assert strip == {
        c: {k: v for k, v in r.items() if k != "detail"} for c, r in cases_by_id(d).items()
    }
    prefix = "Totalsegmentator_dataset_v201/"
    expected = {prefix + "meta.csv"}
    expected |= {
        f"{prefix}{c}/segmentations/{ORGAN}.nii.gz" for c, v in VOXELS.items() if v is not None
    }
    expected |= {f"{prefix}{c}/ct.nii.gz" for c in VISIBLE}
    assert set(opened) == expected  # never the liver masks, never an absent case's CT
    raw = Path(z["raw_dir"])
    img = next((raw / "imagesTr").iterdir())
    case = img.name.removesuffix("_0000.nii.gz")
    assert img.read_bytes() == (dataset / case / "ct.nii.gz").read_bytes()


def test_rerun_does_nothing_and_changed_options_need_force(
    dataset: Path, ws: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    first = run(ws, params(dataset))
    before = snapshot(ws.root)
    second = run(ws, params(dataset))
    assert second.to_dict() == first.to_dict()
    assert snapshot(ws.root) == before
    with caplog.at_level(logging.WARNING, logger="mobseg"):
        third = run(ws, params(dataset, seed=7))
    assert third.to_dict() == first.to_dict() and "--force" in caplog.text
    forced = run(ws, params(dataset, seed=7), force=True)
    assert forced.attempts == 2 and forced.params["seed"] == 7
    splits = json.loads(Path(forced.outputs["splits_json"]).read_text())
    raw = Path(forced.outputs["raw_dir"])
    got_tr = sorted(p.name.removesuffix(".nii.gz") for p in (raw / "labelsTr").iterdir())
    got_ts = sorted(p.name.removesuffix(".nii.gz") for p in (raw / "labelsTs").iterdir())
    assert got_tr == sorted(splits["train"] + splits["val"]) and got_ts == splits["test"]


def test_interrupted_run_resumes_without_redoing_cases(
    dataset: Path, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = prepare._scan_case
    calls: list[str] = []

    def interrupt_at_fifth(ctx, case, official):  # type: ignore[no-untyped-def]
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(case)
        return real(ctx, case, official)

    monkeypatch.setattr(prepare, "_scan_case", interrupt_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        run(ws, params(dataset))
    assert Manifest(ws.manifest_path).get("prepare/pancreas").status == "running"  # type: ignore[union-attr]
    done_before = list(calls)
    calls.clear()

    def counting(ctx, case, official):  # type: ignore[no-untyped-def]
        calls.append(case)
        return real(ctx, case, official)

    monkeypatch.setattr(prepare, "_scan_case", counting)
    rec = run(ws, params(dataset))
    assert rec.done and rec.attempts == 2
    assert sorted(calls) == sorted(set(VOXELS) - set(done_before))
    assert {c for c, r in cases_by_id(rec.outputs).items() if r["status"] == "included"} == set(
        VISIBLE
    )


def test_interruption_after_placing_files_resumes(
    dataset: Path, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = prepare._write_dataset_json

    def boom(*a, **kw):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_write_dataset_json", boom)
    with pytest.raises(KeyboardInterrupt):
        run(ws, params(dataset))
    monkeypatch.setattr(prepare, "_write_dataset_json", real)
    scanned: list[str] = []
    real_scan = prepare._scan_case
    monkeypatch.setattr(
        prepare, "_scan_case", lambda ctx, c, o: scanned.append(c) or real_scan(ctx, c, o)
    )
    rec = run(ws, params(dataset))
    assert rec.done and scanned == []
    raw = Path(rec.outputs["raw_dir"])
    assert len(list((raw / "imagesTr").iterdir())) + len(list((raw / "imagesTs").iterdir())) == len(
        VISIBLE
    )


def test_spacing_resamples_image_and_mask_on_one_grid(dataset: Path, ws: Workspace) -> None:
    rec = run(ws, params(dataset, spacing=3.0))
    raw = Path(rec.outputs["raw_dir"])
    for image in (raw / "imagesTr").iterdir():
        case = image.name.removesuffix("_0000.nii.gz")
        img = sitk.ReadImage(str(image))
        lbl = sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))
        src = sitk.ReadImage(str(dataset / case / "ct.nii.gz"))
        assert img.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))
        assert img.GetSize() == tuple(int(round(s / 2)) for s in src.GetSize())
        assert img.GetOrigin() == pytest.approx(src.GetOrigin())
        assert img.GetDirection() == pytest.approx(src.GetDirection())
        assert img.GetPixelID() == src.GetPixelID()
        assert lbl.GetSize() == img.GetSize() and lbl.GetSpacing() == pytest.approx(
            img.GetSpacing()
        )
        assert set(np.unique(sitk.GetArrayFromImage(lbl))) <= {0, 1}


def test_phantom_source_end_to_end_passes_nnunet_integrity(ws: Workspace) -> None:
    p = PrepareParams(organ=ORGAN, source="phantom", num_cases=12, size=24, seed=1)
    rec = run(ws, p)
    out = rec.outputs
    assert out["dataset_name"] == "Dataset801_pancreas_phantom" and out["dataset_id"] == 801
    assert out["source"] == "phantom" and Path(out["source_dir"]) == ws.sources / "phantom"
    rows = cases_by_id(out)
    assert len(rows) == 12
    absent = [c for c, r in rows.items() if r["status"] == "excluded"]
    assert absent and all(rows[c]["reason"] == "absent" for c in absent)
    ws.configure_nnunet_env()
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(out["raw_dir"], num_processes=1)  # raises on any problem
    before = snapshot(ws.root)
    again = run(ws, p)
    assert again.to_dict() == rec.to_dict() and snapshot(ws.root) == before


def test_dataset_id_collision_is_refused(dataset: Path, ws: Workspace) -> None:
    (ws.nnunet_raw / "Dataset501_somethingelse").mkdir(parents=True)
    with pytest.raises(ConfigurationError, match="Dataset501_somethingelse"):
        run(ws, params(dataset))


def test_unknown_organ_suggests_the_closest(dataset: Path, ws: Workspace) -> None:
    with pytest.raises(UnknownNameError, match="pancreas"):
        run(ws, PrepareParams(organ="pancraes", source=str(dataset)))
    assert not ws.manifest_path.exists()


def test_invalid_options_are_refused(dataset: Path, ws: Workspace) -> None:
    for kw in ({"on_error": "ignore"}, {"test_fraction": 1.0}, {"spacing": 0.0}, {"seed": -1}):
        with pytest.raises(ConfigurationError):
            run(ws, params(dataset, **kw))


def test_missing_source_names_the_path(ws: Workspace, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        run(ws, params(tmp_path / "nowhere"))


# -- bad inputs ------------------------------------------------------------------------
BAD = "s0003"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _short_data(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 100]))


def _float_ct(root: Path, value: float) -> None:
    ct = make_ct(3, dtype=np.float32)
    arr = sitk.GetArrayFromImage(ct)
    arr[1, 2, 3] = value
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ct)
    sitk.WriteImage(img, str(root / BAD / "ct.nii.gz"), useCompression=True)


def _mask_with(root: Path, image: sitk.Image) -> None:
    sitk.WriteImage(image, str(root / BAD / "segmentations" / f"{ORGAN}.nii.gz"), True)


def _geometry(root: Path, **change: object) -> None:
    mask = sitk.ReadImage(str(root / BAD / "segmentations" / f"{ORGAN}.nii.gz"))
    for key, value in change.items():
        getattr(mask, f"Set{key}")(value)
    _mask_with(root, mask)


def _other_size(root: Path) -> None:
    ct = sitk.ReadImage(str(root / BAD / "ct.nii.gz"))
    arr = np.zeros((SHAPE[0] - 1, *SHAPE[1:]), dtype=np.uint8)
    arr[2, 2, 2] = 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(ct.GetSpacing())
    img.SetOrigin(ct.GetOrigin())
    img.SetDirection(ct.GetDirection())
    _mask_with(root, img)


def _non_binary(root: Path) -> None:
    mask = sitk.ReadImage(str(root / BAD / "segmentations" / f"{ORGAN}.nii.gz"))
    arr = sitk.GetArrayFromImage(mask)
    arr[0, 0, 0] = 2
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(mask)
    _mask_with(root, img)


def _nan_mask(root: Path) -> None:
    mask = sitk.ReadImage(str(root / BAD / "segmentations" / f"{ORGAN}.nii.gz"))
    arr = sitk.GetArrayFromImage(mask).astype(np.float32)
    arr[0, 0, 0] = np.nan
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(mask)
    _mask_with(root, img)


def _rewrite_meta(root: Path, transform: Callable[[list[str]], list[str]]) -> None:
    path = root / "meta.csv"
    lines = path.read_bytes().decode("utf-8-sig").splitlines()
    path.write_bytes(("\n".join(transform(lines)) + "\n").encode("utf-8-sig"))


def _duplicate(lines: list[str]) -> list[str]:
    row = next(line for line in lines if line.startswith(BAD + ";"))
    return [*lines, row.replace(";train;", ";test;").replace(";val;", ";test;")]


def _malformed_row(lines: list[str]) -> list[str]:
    return [line if not line.startswith(BAD + ";") else f"{BAD};1;2" for line in lines]


CT = f"{BAD}/ct.nii.gz"
MASK = f"{BAD}/segmentations/{ORGAN}.nii.gz"
# name -> (corrupt the folder, reason code, text in the message, file named in the message)
BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str, str, str]] = {
    "truncated_ct": (lambda r: _truncate(r / CT), "corrupt_file", "Truncated or corrupt gzip", CT),
    "truncated_mask": (
        lambda r: _truncate(r / MASK),
        "corrupt_file",
        "Truncated or corrupt gzip",
        MASK,
    ),
    "corrupt_ct": (lambda r: _flip_byte(r / CT), "corrupt_file", "corrupt gzip", CT),
    "short_image_data": (lambda r: _short_data(r / CT), "corrupt_file", "data is truncated", CT),
    "not_gzip": (lambda r: (r / CT).write_bytes(b"plain text"), "corrupt_file", "not gzip", CT),
    "nan_ct": (lambda r: _float_ct(r, np.nan), "non_finite", "1 NaN and 0 infinite", CT),
    "inf_ct": (lambda r: _float_ct(r, np.inf), "non_finite", "0 NaN and 1 infinite", CT),
    "nan_mask": (_nan_mask, "non_finite", "1 NaN", MASK),
    "spacing": (
        lambda r: _geometry(r, Spacing=(1.5, 1.5, 2.0)),
        "geometry_mismatch",
        "spacing",
        MASK,
    ),
    "origin": (
        lambda r: _geometry(r, Origin=(10.0, -20.0, 9.0)),
        "geometry_mismatch",
        "origin",
        MASK,
    ),
    "direction": (
        lambda r: _geometry(r, Direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)),
        "geometry_mismatch",
        "direction",
        MASK,
    ),
    "size": (_other_size, "geometry_mismatch", "size", MASK),
    "non_binary": (_non_binary, "non_binary", "not binary", MASK),
    "missing_ct": (lambda r: (r / CT).unlink(), "ct_missing", "The CT is missing", CT),
    "duplicate_id": (
        lambda r: _rewrite_meta(r, _duplicate),
        "duplicate_id",
        f"lists {BAD} 2 times",
        "meta.csv",
    ),
    "malformed_row": (
        lambda r: _rewrite_meta(r, _malformed_row),
        "malformed_meta_row",
        "has 3 fields",
        "meta.csv",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_skipped_with_its_reason_and_no_other_case_is_lost(
    name: str, dataset: Path, ws: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, reason, text, where = BAD_INPUTS[name]
    corrupt(dataset)
    with caplog.at_level(logging.WARNING, logger="mobseg"):
        rec = run(ws, params(dataset))
    rows = cases_by_id(rec.outputs)
    assert rows[BAD]["status"] == "excluded" and rows[BAD]["reason"] == reason
    detail = rows[BAD]["detail"]
    assert text in detail and where in detail
    if reason not in ("duplicate_id", "malformed_meta_row"):
        assert f"case {BAD}" in detail
    assert text in caplog.text
    included = {c for c, r in rows.items() if r["status"] == "included"}
    assert included == set(VISIBLE) - {BAD}
    assert rec.outputs["excluded_reasons"][reason] == 1


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_stops_the_stage_with_on_error_fail(
    name: str, dataset: Path, ws: Workspace
) -> None:
    corrupt, _reason, text, where = BAD_INPUTS[name]
    corrupt(dataset)
    with pytest.raises(InvalidInputError) as info:
        run(ws, params(dataset, on_error="fail"))
    assert text in str(info.value) and where in str(info.value)
    rec = Manifest(ws.manifest_path).get("prepare/pancreas")
    assert rec is not None and rec.status == "failed" and text in (rec.error or "")


def test_bad_member_inside_a_zip_is_named_by_archive_and_entry(
    dataset: Path, tmp_path: Path, ws: Workspace
) -> None:
    _truncate(dataset / CT)
    archive = zip_folder(dataset, tmp_path / "bad.zip", prefix="")
    rec = run(ws, params(archive))
    detail = cases_by_id(rec.outputs)[BAD]["detail"]
    assert f"{archive.resolve()}!{CT}" in detail and "Truncated or corrupt gzip" in detail


def test_corrupt_zip_member_crc_is_caught(dataset: Path, tmp_path: Path, ws: Workspace) -> None:
    archive = zip_folder(dataset, tmp_path / "crc.zip", prefix="")
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(CT)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(archive.read_bytes())
    data[start + info.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    rec = run(ws, params(archive))
    row = cases_by_id(rec.outputs)[BAD]
    assert row["reason"] == "corrupt_file" and f"case {BAD}" in row["detail"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "meta.csv is empty"),
        ("\ufeff   \n".encode(), "meta.csv is empty"),
        ("\ufeffname;age\ns0000;3\n".encode(), "lacks the column(s) image_id, split"),
        ("\ufeffimage_id;split\n".encode(), "no cases"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
    ],
)
@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_empty_or_malformed_meta_csv_stops_with_a_clear_message(
    content: bytes, message: str, on_error: str, dataset: Path, ws: Workspace
) -> None:
    (dataset / "meta.csv").write_bytes(content)
    with pytest.raises(InvalidInputError, match="meta.csv") as info:
        run(ws, params(dataset, on_error=on_error))
    assert message in str(info.value) and str(dataset / "meta.csv") in str(info.value)


def test_unsafe_archive_entries_are_refused(dataset: Path, tmp_path: Path) -> None:
    archive = zip_folder(dataset, tmp_path / "evil.zip", prefix="")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../escaped.txt", b"x")
        zf.writestr("/abs/s0099/ct.nii.gz", b"x")
        zf.writestr("s0000/../../up.nii.gz", b"x")
    outside = snapshot(tmp_path.parent)
    rec = run(Workspace(tmp_path / "w1"), params(archive)).outputs
    refused = [r for r in read_cases_csv(rec["cases_csv"]) if r["reason"] == "unsafe_archive_entry"]
    assert len(refused) == 3 and any("../escaped.txt" in r["detail"] for r in refused)
    included = {c for c, r in cases_by_id(rec).items() if r["status"] == "included"}
    assert included == set(VISIBLE)
    assert (
        not (tmp_path.parent / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    )
    with pytest.raises(InvalidInputError, match="absolute paths or '..'"):
        run(Workspace(tmp_path / "w2"), params(archive, on_error="fail"))
    new = set(snapshot(tmp_path.parent)) - set(outside)
    assert all(
        p.startswith(f"{tmp_path.name}/w1/") or p.startswith(f"{tmp_path.name}/w2/") for p in new
    )


def test_nothing_is_written_outside_the_workdir(dataset: Path, tmp_path: Path) -> None:
    archive = zip_folder(dataset, tmp_path / "ts.zip")
    before = snapshot(tmp_path)
    ws = Workspace(tmp_path / "work")
    run(ws, params(dataset))
    run(Workspace(tmp_path / "work2"), params(archive))
    changed = {p for p, v in snapshot(tmp_path).items() if before.get(p) != v}
    assert changed and all(p.startswith(("work/", "work2/")) for p in changed)


# -- the real example ------------------------------------------------------------------
TARGETS = ("pancreas", "gallbladder", "duodenum", "adrenal_gland_left")


def _crop_case(src: Path, dst: Path, z0: int, z1: int) -> None:
    ct = sitk.ReadImage(str(src / "ct.nii.gz"))
    masks = {
        t: sitk.ReadImage(str(src / "segmentations" / f"{t}.nii.gz"))[:, :, z0:z1] for t in TARGETS
    }
    write_case(dst.parent, dst.name, ct[:, :, z0:z1], masks)


@pytest.fixture
def real_dataset(totalseg_example: Path, tmp_path: Path) -> Path:
    root = tmp_path / "real"
    root.mkdir()
    shutil.copytree(totalseg_example / "s0000", root / "s0000")
    _crop_case(totalseg_example / "s0000", root / "s0001", 0, 12)
    _crop_case(totalseg_example / "s0000", root / "s0002", 19, 30)
    write_meta(
        root,
        [
            {"image_id": c, "split": s}
            for c, s in (("s0000", "test"), ("s0001", "train"), ("s0002", "val"))
        ],
    )
    return root


@pytest.mark.parametrize(
    ("organ", "visible"),
    [
        ("adrenal_gland_left", {"s0000", "s0002"}),
        ("pancreas", {"s0000", "s0001"}),
        ("gallbladder", {"s0000", "s0001"}),
    ],
)
def test_real_ct_visible_and_absent_decisions_and_geometry_survive(
    organ: str, visible: set[str], real_dataset: Path, tmp_path: Path
) -> None:
    ws = Workspace(tmp_path / "w")
    rec = run(ws, PrepareParams(organ=organ, source=str(real_dataset)))
    rows = cases_by_id(rec.outputs)
    assert {c for c, r in rows.items() if r["status"] == "included"} == visible
    for case in set(rows) - visible:
        assert rows[case]["reason"] == "absent"
    raw = Path(rec.outputs["raw_dir"])
    for case in visible:
        image = next(raw.glob(f"images*/{case}_0000.nii.gz"))
        label = next(raw.glob(f"labels*/{case}.nii.gz"))
        src_ct = sitk.ReadImage(str(real_dataset / case / "ct.nii.gz"))
        src_mask = sitk.ReadImage(str(real_dataset / case / "segmentations" / f"{organ}.nii.gz"))
        for out in (sitk.ReadImage(str(image)), sitk.ReadImage(str(label))):
            assert out.GetSize() == src_ct.GetSize()
            assert out.GetSpacing() == pytest.approx(src_ct.GetSpacing(), abs=1e-6)
            assert out.GetOrigin() == pytest.approx(src_ct.GetOrigin(), abs=1e-4)
            assert out.GetDirection() == pytest.approx(src_ct.GetDirection(), abs=1e-6)
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(image))), sitk.GetArrayFromImage(src_ct)
        )
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(label))), sitk.GetArrayFromImage(src_mask)
        )
    if organ == "pancreas":
        assert rows["s0000"]["voxels"] == "548"  # SOURCE.md


def test_shared_example_folder_prepares_directly(totalseg_example: Path, ws: Workspace) -> None:
    before = snapshot(totalseg_example)
    rec = run(ws, PrepareParams(organ="liver", source=str(totalseg_example)))
    assert rec.outputs["counts"] == {"train": 1, "val": 0, "test": 0, "excluded": 0}
    assert cases_by_id(rec.outputs)["s0000"]["voxels"] == "39350"
    assert rec.outputs["dataset_id"] == 510 + 43  # liver is structure 43 of the sorted 117
    assert snapshot(totalseg_example) == before


# -- the command -------------------------------------------------------------------------
def test_cli_prepare_prints_the_split_table_and_rerun_is_a_no_op(tmp_path: Path) -> None:
    cli = CliRunner()
    args = [
        "--workdir",
        str(tmp_path / "w"),
        "prepare",
        "--organ",
        "pancreas",
        "--source",
        "phantom",
        "--num-cases",
        "8",
        "--size",
        "16",
    ]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Table 1" in result.output and "pancreas" in result.output and "phantom" in result.output
    status = cli.invoke(app, ["--workdir", str(tmp_path / "w"), "status"])
    assert status.exit_code == 0 and "prepare" in status.output
    manifest = tmp_path / "w" / "manifest.json"
    mtime = os.stat(manifest).st_mtime_ns
    assert cli.invoke(app, args).exit_code == 0
    assert os.stat(manifest).st_mtime_ns == mtime


def test_cli_unknown_organ_exits_1_with_a_suggestion(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "--workdir",
            str(tmp_path / "w"),
            "prepare",
            "--organ",
            "gallblader",
            "--source",
            "phantom",
        ],
    )
    assert result.exit_code == 1
    assert "Unknown organ 'gallblader'" in result.output and "gallbladder" in result.output


def test_zenodo_source_downloads_into_the_workdir_and_prepares(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "served"
    name = "Totalsegmentator_dataset_small_v201.zip"
    (served / "files").mkdir(parents=True)
    archive = zip_folder(dataset, served / "files" / name)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    # this fake archive is the "published" one: the known md5 is verified (issue 14)
    from mobseg.data import zenodo

    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(
        zenodo.DATASETS, "small", zenodo.ZenodoDataset("10047263", name, None, digest)
    )
    (served / "api" / "records").mkdir(parents=True)
    (served / "api" / "records" / "10047263").write_text(
        json.dumps(
            {
                "files": [
                    {
                        "key": name,
                        "size": archive.stat().st_size,
                        "checksum": "md5:" + hashlib.md5(archive.read_bytes()).hexdigest(),
                        "links": {"self": f"{url}/files/{name}"},
                    }
                ]
            }
        )
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        ws = Workspace(tmp_path / "w")
        rec = run(ws, params("zenodo", subset="small", zenodo_url=url))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert rec.outputs["source"] == "zenodo" and rec.outputs["source_kind"] == "zip"
    assert Path(rec.outputs["source_dir"]) == ws.downloads / name
    assert (ws.downloads / name).read_bytes() == archive.read_bytes()
    included = {c for c, r in cases_by_id(rec.outputs).items() if r["status"] == "included"}
    assert included == set(VISIBLE)


# -- an nnU-Net raw dataset as the source (issue 15) -----------------------------------
def test_prepare_from_an_nnunet_raw_dataset(tmp_path: Path) -> None:
    ds, labels = nnunet_raw_dataset(tmp_path)
    ws = Workspace(tmp_path / "work")
    rec = run(ws, PrepareParams(organ="pancreas", source=str(ds), test_fraction=0.2))
    out = rec.outputs
    assert out["source"] == "nnunet" and out["source_dir"] == str(ds.resolve())
    raw = Path(out["raw_dir"])
    splits = json.loads(Path(out["splits_json"]).read_text())
    cases = splits["train"] + splits["val"] + splits["test"]
    assert sorted(cases) == sorted(labels)  # nnU-Net's case names are kept
    for case in cases:
        where = "Tr" if case not in splits["test"] else "Ts"
        label = sitk.ReadImage(str(raw / f"labels{where}" / f"{case}.nii.gz"))
        # the organ's label only, as 0/1, on the CT's grid
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(label), (labels[case] == 2).astype(np.uint8)
        )
        image = sitk.ReadImage(str(raw / f"images{where}" / f"{case}_0000.nii.gz"))
        src = sitk.ReadImage(str(ds / "imagesTr" / f"{case}_0000.nii.gz"))
        assert image.GetOrigin() == src.GetOrigin() == label.GetOrigin()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(src))
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "pancreas": 1}
    assert "nnU-Net raw dataset" in dataset_json["description"]


def test_prepare_from_nnunet_raw_needs_the_organs_label(tmp_path: Path) -> None:
    ds, _ = nnunet_raw_dataset(tmp_path, n=2)
    with pytest.raises(ConfigurationError, match=r"no label named 'spleen'.*'liver' \(1\)"):
        run(Workspace(tmp_path / "work"), PrepareParams(organ="spleen", source=str(ds)))
