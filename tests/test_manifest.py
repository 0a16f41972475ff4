"""The manifest: atomic writes, concurrent writers, stage look-ups."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from mobseg.errors import ManifestError, MissingStageError, StorageError
from mobseg.manifest import SCHEMA_VERSION, Manifest, StageRecord


def test_record_roundtrip_and_lookup(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "manifest.json")
    with m.running("prepare", "prepare/pancreas", {"seed": 0}, {"source": "phantom"}) as outputs:
        assert m.get("prepare/pancreas").status == "running"
        outputs["raw_dir"] = "/x/raw"
    rec = m.require("prepare/pancreas", "mobseg prepare --organ pancreas")
    assert rec.status == "done"
    assert rec.params == {"seed": 0}
    assert rec.inputs == {"source": "phantom"}
    assert rec.outputs == {"raw_dir": "/x/raw"}
    assert rec.finished is not None and rec.error is None
    assert set(rec.versions) >= {"python", "mobseg", "torch", "nnunetv2"}
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema"] == SCHEMA_VERSION
    assert list(data["records"]) == ["prepare/pancreas"]


def test_failed_stage_is_recorded_and_reraised(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "manifest.json")
    with pytest.raises(RuntimeError, match="boom"):
        with m.running("pretrain", "pretrain/liver"):
            raise RuntimeError("boom\nsecond line")
    rec = m.get("pretrain/liver")
    assert rec.status == "failed"
    assert rec.error == "RuntimeError: boom"


def test_rerun_counts_attempts(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "manifest.json")
    for _ in range(3):
        with m.running("report", "report"):
            pass
    assert m.get("report").attempts == 3


def test_require_names_the_command(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "manifest.json")
    with pytest.raises(MissingStageError) as info:
        m.require("prepare/pancreas", "mobseg prepare --organ pancreas")
    assert "run `mobseg prepare --organ pancreas` first" in str(info.value).lower()
    m.start("prepare", "prepare/pancreas")
    with pytest.raises(MissingStageError, match="status is running"):
        m.require("prepare/pancreas", "mobseg prepare --organ pancreas")


def test_find_filters_by_stage_and_prefix(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "manifest.json")
    for key in (
        "finetune/pancreas/mob-b3-r16/seed1",
        "finetune/pancreas/mob-b3-r16/seed0",
        "finetune/liver/diagonal/seed0",
    ):
        m.put(StageRecord(stage="finetune", key=key, status="done"))
    m.put(StageRecord(stage="prepare", key="prepare/pancreas", status="done"))
    keys = [r.key for r in m.find("finetune", "finetune/pancreas/")]
    assert keys == ["finetune/pancreas/mob-b3-r16/seed0", "finetune/pancreas/mob-b3-r16/seed1"]
    assert len(m.find()) == 4


def test_crash_between_write_and_rename_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "manifest.json"
    m = Manifest(path)
    m.put(StageRecord(stage="prepare", key="prepare/pancreas", status="done"))
    before = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    # a failed write is one StorageError line naming the file, not a raw OSError
    with pytest.raises(StorageError, match="simulated crash"):
        m.put(StageRecord(stage="prepare", key="prepare/liver", status="done"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert set(Manifest(path).records()) == {"prepare/pancreas"}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".manifest.json.")]
    assert leftovers == []


def test_corrupt_or_foreign_manifest_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="cannot be read"):
        Manifest(path).records()
    path.write_text(json.dumps({"schema": 99, "records": {}}))
    with pytest.raises(ManifestError, match="schema 99"):
        Manifest(path).records()


def _writer(path: str, worker: int, n: int) -> None:
    m = Manifest(path)
    for i in range(n):
        m.put(StageRecord(stage="finetune", key=f"finetune/w{worker}/r{i}", status="done"))


def test_concurrent_writers_lose_no_record(tmp_path: Path) -> None:
    path = str(tmp_path / "manifest.json")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    records = Manifest(path).records()
    assert len(records) == 50
    assert {f"finetune/w{w}/r{i}" for w in range(2) for i in range(25)} == set(records)


def test_outdated_names_upstream_records_that_ran_again_failed_or_vanished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = Manifest(tmp_path / "manifest.json")
    with m.running("prepare", "prepare/liver"):
        pass
    with m.running("other", "other/x"):
        pass
    prep, other = m.get("prepare/liver"), m.get("other/x")
    assert prep is not None and other is not None and len(prep.run_id) == 32
    with m.running("pretrain", "pretrain/liver", {}, {"a": 1}, [prep, other]):
        pass
    rec = m.get("pretrain/liver")
    assert rec is not None
    assert rec.inputs == {
        "a": 1,
        "upstream": {"prepare/liver": prep.run_id, "other/x": other.run_id},
    }
    assert m.outdated(rec) == [] and not m.stale(rec)

    with m.running("prepare", "prepare/liver"):  # prepare --force: a new run id
        pass
    new_prep = m.get("prepare/liver")
    assert new_prep is not None and new_prep.run_id != prep.run_id
    assert m.outdated(rec) == ["prepare/liver"]
    with caplog.at_level("INFO", logger="mobseg.manifest"):
        assert m.stale(rec)
    assert "pretrain/liver is outdated (prepare/liver ran again since)" in caplog.text

    m.fail("other/x", "boom")
    assert m.outdated(rec) == ["prepare/liver", "other/x"]
    m.update("other/x", lambda _old: None)  # vanished
    assert m.outdated(rec, m.records()) == ["prepare/liver", "other/x"]
    # records without upstream, and unfinished ones, are never stale
    assert m.outdated(new_prep) == [] and not m.stale(None)
    m.start("pretrain", "pretrain/liver", {}, {"upstream": {"prepare/liver": "x"}})
    assert not m.stale(m.get("pretrain/liver"))
