"""A full disk never publishes a corrupt file, and the manifest stays truthful.

SimpleITK's writer does not raise on ENOSPC (it prints "wrote only ..."), so
the tests make it write a short file the same way, and (where mounting works)
fill a real 1 MiB tmpfs.
"""

from __future__ import annotations

import errno
import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from reliability_helpers import small_tmpfs

from mobseg import fsutil
from mobseg.data import nifti
from mobseg.errors import StorageError
from mobseg.manifest import Manifest
from mobseg.stages import prepare
from mobseg.workspace import Workspace

_real_write = sitk.WriteImage


def _image(shape=(8, 9, 10), seed=0) -> sitk.Image:
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return sitk.GetImageFromArray(arr)


def short_writer(keep: float):
    """A sitk.WriteImage that, like SimpleITK on a full disk, leaves a short file silently."""

    def write(image, path, *args, **kwargs):
        _real_write(image, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: int(len(data) * keep)])

    return write


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_a_short_write_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: float
) -> None:
    target = tmp_path / "out" / "s0004_seg.nii.gz"
    monkeypatch.setattr(sitk, "WriteImage", short_writer(keep))
    with pytest.raises(StorageError) as info:
        nifti.write_image(_image(), target)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(target) in msg and "free" in msg  # names the file and the free space
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the temporary file is gone too
    monkeypatch.undo()
    nifti.write_image(_image(), target)  # space freed: the same write works
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(target)))
    np.testing.assert_array_equal(back, sitk.GetArrayFromImage(_image()))


def test_a_gzip_that_decompresses_but_lacks_data_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cut_then_recompress(image, path, *args, **kwargs):
        _real_write(image, path, *args, **kwargs)
        raw = gzip.decompress(Path(path).read_bytes())
        Path(path).write_bytes(gzip.compress(raw[: len(raw) // 2]))

    monkeypatch.setattr(sitk, "WriteImage", cut_then_recompress)
    with pytest.raises(StorageError, match="does not read back"):
        nifti.write_image(_image(), tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_real_full_tmpfs(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        noise = _image(shape=(64, 96, 96))  # 2.3 MiB of float32 noise, > 1 MiB compressed
        with pytest.raises(StorageError, match="free"):
            nifti.write_image(noise, disk / "big.nii.gz")
        assert [p.name for p in disk.iterdir()] == []
        with pytest.raises(StorageError, match="No space left"):
            fsutil.atomic_write_bytes(disk / "big.bin", b"\0" * (2 << 20))
        assert [p.name for p in disk.iterdir()] == []


def test_the_record_stays_resumable_when_even_the_failure_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = Manifest(tmp_path / "manifest.json")
    with pytest.raises(StorageError, match="no space in the block"):
        with manifest.running("predict", "predict/pancreas/mob/seed0"):

            def full(*_a, **_k):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(Manifest, "_write_unlocked", full)
            raise StorageError("no space in the block")
    monkeypatch.undo()
    rec = manifest.get("predict/pancreas/mob/seed0")
    assert rec is not None and rec.status == "running"  # a rerun resumes it
    assert "stays 'running'" in caplog.text


def test_prepare_on_a_full_disk_fails_and_a_rerun_splits_every_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = Workspace(tmp_path / "w").ensure()
    params = prepare.PrepareParams(organ="pancreas", source="phantom", num_cases=9, size=16, seed=0)
    monkeypatch.setattr(sitk, "WriteImage", short_writer(0.0))
    with pytest.raises(StorageError):
        prepare.run(ws, params)
    monkeypatch.undo()
    rec = Manifest(ws.manifest_path).get("prepare/pancreas")
    assert rec is not None and rec.status == "failed" and "StorageError" in (rec.error or "")
    # no 0-byte source was left under a final name
    sources = list((ws.sources / "phantom").rglob("*.nii.gz"))
    assert all(p.stat().st_size > 0 for p in sources)
    logging.getLogger("mobseg").setLevel(logging.WARNING)
    done = prepare.run(ws, params)
    # the same split as a run on a healthy disk: no case was recorded as corrupt
    clean = prepare.run(Workspace(tmp_path / "clean").ensure(), params)
    assert done.status == "done"
    assert done.outputs["counts"] == clean.outputs["counts"]
    assert done.outputs["splits"] == clean.outputs["splits"]
    assert "corrupt" not in done.outputs["excluded_reasons"]


def test_a_rerun_never_trusts_a_file_that_does_not_verify(tmp_path: Path) -> None:
    img = _image()
    paths = {s: tmp_path / f"c_{s}.nii.gz" for s in ("prob", "seg")}
    for p in paths.values():
        nifti.write_image(img, p)
    assert nifti.files_complete(paths.values(), last=paths["seg"])
    data = paths["seg"].read_bytes()
    paths["seg"].write_bytes(data[: len(data) // 2])  # left by an old, unverified writer
    assert not nifti.files_complete(paths.values(), last=paths["seg"])
    paths["seg"].write_bytes(b"")
    assert not nifti.files_complete(paths.values(), last=paths["seg"])
