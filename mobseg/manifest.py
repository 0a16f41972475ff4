"""The manifest: the on-disk chain between stages.

``<workdir>/manifest.json`` holds one record per stage run, keyed by a path-like
key such as ``finetune/pancreas/mob-b3-r16/seed0``. Each record stores the
stage's parameters, inputs, outputs, status (``running``, ``done``,
``failed``), times, the error of a failed run and the versions of mobseg and
its main dependencies.

Writes are atomic (a temporary file in the same folder, flushed and fsynced,
then ``os.replace``) and every read-modify-write happens under a file lock
(``manifest.json.lock``), so concurrent processes (``mobseg study --jobs``,
cluster array jobs on a shared file system) never lose a record and a crash
never leaves a half-written manifest.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from mobseg.errors import ManifestError, MissingStageError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def collect_versions() -> dict[str, str]:
    """Versions of mobseg, Python and the main dependencies (without importing them)."""
    import platform

    versions = {"python": platform.python_version()}
    for dist in ("mobseg", "torch", "nnunetv2", "numpy", "SimpleITK"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


@dataclass
class StageRecord:
    """One run of one stage.

    Attributes:
        stage: Stage name (``prepare``, ``pretrain``, ...).
        key: Unique key, e.g. ``finetune/pancreas/mob-b3-r16/seed0``.
        params: The parameters the stage ran with (JSON-serialisable).
        inputs: Named input paths or keys of earlier stages.
        outputs: Named outputs (paths relative to the workdir or absolute).
        status: ``running``, ``done`` or ``failed``.
        started: ISO time the (latest) run started.
        finished: ISO time it finished or failed, else None.
        error: One-line error of a failed run.
        versions: Versions of mobseg and its dependencies.
        attempts: How many times the stage was started.
        run_id: Identifies the latest run; a later stage stores the run ids of
            the records it was built from (``inputs["upstream"]``), so a rerun
            upstream stage makes it outdated (:meth:`Manifest.outdated`).
    """

    stage: str
    key: str
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    started: str = field(default_factory=_now)
    finished: str | None = None
    error: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    attempts: int = 1
    run_id: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def done(self) -> bool:
        return self.status == "done"


def outdated_inputs(record: StageRecord, records: Mapping[str, StageRecord]) -> list[str]:
    """Keys in ``record.inputs["upstream"]`` whose record in ``records`` is missing,
    unfinished, or has another run id than the one ``record`` was built from."""
    changed = []
    for key, run_id in (record.inputs.get("upstream") or {}).items():
        rec = records.get(key)
        if rec is None or not rec.done or (run_id and rec.run_id != run_id):
            changed.append(key)
    return changed


class Manifest:
    """Read and update ``manifest.json`` safely.

    Args:
        path: The manifest file (its folder is created on first write).
        timeout: Seconds to wait for the lock before giving up.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.lock = FileLock(str(self.path) + ".lock", timeout=timeout)

    # -- reading -----------------------------------------------------------------
    def _read_unlocked(self) -> dict[str, StageRecord]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(
                f"The manifest {self.path} cannot be read ({exc}).",
                "Restore it from manifest.json.bak or move it aside to start afresh.",
            ) from exc
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                f"The manifest {self.path} has schema {schema!r}; this mobseg reads "
                f"schema {SCHEMA_VERSION}.",
                "Use a fresh --workdir or the mobseg version that wrote it.",
            )
        return {k: StageRecord.from_dict(v) for k, v in data.get("records", {}).items()}

    def records(self) -> dict[str, StageRecord]:
        """All records by key (a consistent snapshot)."""
        with self.lock:
            return self._read_unlocked()

    def get(self, key: str) -> StageRecord | None:
        """The record of ``key``, or None."""
        return self.records().get(key)

    def is_done(self, key: str) -> bool:
        rec = self.get(key)
        return rec is not None and rec.done

    def require(self, key: str, command: str) -> StageRecord:
        """The finished record of ``key``.

        Raises:
            MissingStageError: the stage never ran, is running or failed; the
                message names ``command`` to run first.
        """
        rec = self.get(key)
        if rec is None:
            raise MissingStageError(key, command)
        if not rec.done:
            raise MissingStageError(key, command, detail=f"its status is {rec.status}")
        return rec

    def outdated(
        self, record: StageRecord, records: dict[str, StageRecord] | None = None
    ) -> list[str]:
        """Keys of the upstream records that ran again (or vanished) since ``record`` ran.

        Args:
            record: A record whose ``inputs["upstream"]`` maps upstream keys to
                the run ids it was built from (see :meth:`running`).
            records: A snapshot of :meth:`records` to check against; None = read now.

        Returns:
            The changed upstream keys; empty when ``record`` is current (and for
            records written before run ids existed).
        """
        if not record.inputs.get("upstream"):
            return []
        return outdated_inputs(record, self.records() if records is None else records)

    def stale(self, record: StageRecord | None) -> bool:
        """``record`` is finished but outdated (:meth:`outdated`); says which input changed.

        A stage redoes a stale record from scratch (as with ``--force``).
        """
        if record is None or not record.done:
            return False
        changed = self.outdated(record)
        if changed:
            names = ", ".join(changed)
            log.info("%s is outdated (%s ran again since); redoing it.", record.key, names)
        return bool(changed)

    def find(self, stage: str | None = None, prefix: str = "") -> list[StageRecord]:
        """Records of ``stage`` whose key starts with ``prefix``, sorted by key."""
        recs = self.records().values()
        return sorted(
            (r for r in recs if (stage is None or r.stage == stage) and r.key.startswith(prefix)),
            key=lambda r: r.key,
        )

    # -- writing -----------------------------------------------------------------
    def _write_unlocked(self, records: dict[str, StageRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "schema": SCHEMA_VERSION,
            "records": {k: records[k].to_dict() for k in sorted(records)},
        }
        fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def update(self, key: str, change: Callable[[StageRecord | None], StageRecord | None]) -> None:
        """Atomically replace the record of ``key`` by ``change(old)``.

        ``change`` receives the current record (or None) and returns the new
        one, or None to delete it. The whole read-modify-write holds the lock.
        """
        with self.lock:
            records = self._read_unlocked()
            new = change(records.get(key))
            if new is None:
                records.pop(key, None)
            else:
                records[key] = new
            self._write_unlocked(records)

    def put(self, record: StageRecord) -> None:
        """Insert or replace ``record``."""
        self.update(record.key, lambda _old: record)

    def start(
        self,
        stage: str,
        key: str,
        params: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> StageRecord:
        """Mark ``key`` as running (counting attempts) and return the record."""
        holder: list[StageRecord] = []

        def change(old: StageRecord | None) -> StageRecord:
            rec = StageRecord(
                stage=stage,
                key=key,
                params=dict(params or {}),
                inputs=dict(inputs or {}),
                outputs=dict(old.outputs) if old is not None else {},
                versions=collect_versions(),
                attempts=(old.attempts + 1) if old is not None else 1,
                run_id=uuid.uuid4().hex,
            )
            holder.append(rec)
            return rec

        self.update(key, change)
        return holder[0]

    def finish(self, key: str, outputs: dict[str, Any] | None = None) -> None:
        """Mark ``key`` as done with its outputs."""

        def change(old: StageRecord | None) -> StageRecord:
            rec = old or StageRecord(stage=key.split("/", 1)[0], key=key)
            rec.status, rec.finished, rec.error = "done", _now(), None
            rec.outputs = dict(outputs or {})
            return rec

        self.update(key, change)

    def fail(self, key: str, error: str) -> None:
        """Mark ``key`` as failed with a one-line error."""

        def change(old: StageRecord | None) -> StageRecord:
            rec = old or StageRecord(stage=key.split("/", 1)[0], key=key)
            rec.status, rec.finished, rec.error = "failed", _now(), error
            return rec

        self.update(key, change)

    @contextmanager
    def running(
        self,
        stage: str,
        key: str,
        params: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        upstream: Sequence[StageRecord] = (),
    ) -> Iterator[dict[str, Any]]:
        """Record a stage run around a block.

        Yields a dict that the block fills with its outputs. On normal exit the
        record becomes ``done``; on an exception it becomes ``failed`` with the
        error's first line, and the exception propagates. An interrupted run
        (KeyboardInterrupt, kill) stays ``running`` and is resumed by a rerun.

        Args:
            stage: Stage name.
            key: Record key.
            params: The stage's parameters.
            inputs: Named inputs.
            upstream: The finished records this run is built from; their run
                ids are stored in ``inputs["upstream"]`` for :meth:`outdated`.
        """
        if upstream:
            inputs = {**(inputs or {}), "upstream": {r.key: r.run_id for r in upstream}}
        self.start(stage, key, params, inputs)
        outputs: dict[str, Any] = {}
        try:
            yield outputs
        except Exception as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.fail(key, f"{type(exc).__name__}: {line}")
            raise
        self.finish(key, outputs)
