"""The manifest: the on-disk chain between stages.

``<workdir>/manifest.json`` holds one record per stage run, keyed by a path-like
key such as ``finetune/pancreas/mob-b3-r16/seed0``. Each record stores the
stage's parameters, inputs, outputs, status (``running``, ``done``,
``failed``), times, the error of a failed run and the versions of mobseg and
its main dependencies.

Writes are atomic (a temporary file in the same folder, checked, flushed and
fsynced, then ``os.replace``) and every read-modify-write happens under a file
lock (``manifest.json.lock``), so concurrent processes (``mobseg study --jobs``,
cluster array jobs on a shared file system) never lose a record and a crash
never leaves a half-written manifest. Before each write the previous manifest
is kept as ``manifest.json.bak``. Reading needs no write access: on a
read-only workdir (an archived study) records are read without the lock.

Paths inside the workdir are stored relative to it (each record lists where in
``params``/``inputs``/``outputs`` it holds such paths under ``"relative"``) and
read back as absolute paths under the manifest's *current* folder, so a
workdir can be moved, copied or archived, and a copy never reads the
original's files. Paths outside the workdir stay absolute.

:meth:`Manifest.running` also holds one lock per record
(``<workdir>/.locks/<key>.lock``): a second process that starts the same
stage while it runs is refused with :class:`~mobseg.errors.BusyError` naming
the process that holds it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mobseg import fsutil
from mobseg.errors import BusyError, ManifestError, MissingStageError, MobsegError

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
        """A record from its JSON form.

        Raises:
            ValueError: ``data`` is not a well-formed record (a field missing or
                of the wrong type); the message names the field.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a record must be an object, not {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        for name in ("stage", "key"):
            if not isinstance(data.get(name), str):
                raise ValueError(f"field {name!r} is missing or not a string")
        for name in ("params", "inputs", "outputs", "versions"):
            if name in data and not isinstance(data[name], dict):
                raise ValueError(f"field {name!r} is not an object")
        if data.get("status", "running") not in STATUSES:
            raise ValueError(f"field 'status' is {data.get('status')!r}, not one of {STATUSES}")
        if "attempts" in data and not isinstance(data["attempts"], int):
            raise ValueError("field 'attempts' is not an integer")
        for name in ("started", "finished", "error", "run_id"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"field {name!r} is not a string")
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


_SECTIONS = ("params", "inputs", "outputs")


def _relativize(value: Any, root: str, where: list[Any], found: list[list[Any]]) -> Any:
    """``value`` with absolute paths under ``root`` made relative; their places go to ``found``."""
    if isinstance(value, dict):
        return {k: _relativize(v, root, [*where, k], found) for k, v in value.items()}
    if isinstance(value, list):
        return [_relativize(v, root, [*where, i], found) for i, v in enumerate(value)]
    if isinstance(value, str) and os.path.isabs(value):
        norm = os.path.normpath(value)
        if norm == root or norm.startswith(root.rstrip(os.sep) + os.sep):
            found.append(where)
            return Path(os.path.relpath(norm, root)).as_posix()
    return value


def _absolutize(data: dict[str, Any], root: Path) -> None:
    """Resolve the relative paths a record lists under ``"relative"`` against ``root``."""
    for place in data.pop("relative", None) or []:
        if not isinstance(place, list) or not place or place[0] not in _SECTIONS:
            continue
        holder: Any = data
        for step in place[:-1]:
            try:
                holder = holder[step]
            except (KeyError, IndexError, TypeError):
                holder = None
                break
        last = place[-1]
        try:
            value = holder[last] if holder is not None else None
        except (KeyError, IndexError, TypeError):
            value = None
        if isinstance(value, str) and not os.path.isabs(value):
            holder[last] = str(root / value)


def record_to_json(record: StageRecord, root: str | os.PathLike[str]) -> dict[str, Any]:
    """The stored form of ``record``: paths under ``root`` relative, their places listed."""
    data = record.to_dict()
    found: list[list[Any]] = []
    base = os.path.normpath(os.path.abspath(root))
    for section in _SECTIONS:
        data[section] = _relativize(data[section], base, [section], found)
    if found:
        data["relative"] = found
    return data


def resolve_path(root: str | os.PathLike[str], value: str | os.PathLike[str]) -> Path:
    """A path as recorded: absolute as is, relative ones under the workdir ``root``.

    The one helper for reading a recorded path (the manifest already resolves
    the paths it relativized; this covers paths stages store relative themselves).
    """
    p = Path(value)
    return p if p.is_absolute() else Path(root) / p


def _holder_note(owner: Path) -> str:
    try:
        info = json.loads(owner.read_text(encoding="utf-8"))
        return f"process {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class Manifest:
    """Read and update ``manifest.json`` safely.

    Args:
        path: The manifest file (its folder is created on first write).
        timeout: Seconds to wait for the lock before giving up.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = 120.0) -> None:
        self.path = Path(os.path.abspath(path))
        self.root = self.path.parent
        self.lock = FileLock(str(self.path) + ".lock", timeout=timeout)

    @property
    def backup_path(self) -> Path:
        """``manifest.json.bak``: the manifest before its latest write."""
        return self.path.with_name(self.path.name + ".bak")

    def writable(self) -> bool:
        """The workdir can take writes (False on a read-only mount or folder)."""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return os.access(folder, os.W_OK)

    # -- reading -----------------------------------------------------------------
    def _read_text(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ManifestError(
                f"The manifest {self.path} cannot be read ({exc.strerror or exc}).",
                "Check the file's permissions.",
            ) from exc

    def _parse(self, text: str | None) -> dict[str, StageRecord]:
        if text is None:
            return {}
        bak = (
            "Restore it from manifest.json.bak or move it aside to start afresh."
            if self.backup_path.exists()
            else "Move it aside to start afresh (there is no manifest.json.bak)."
        )
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"The manifest {self.path} cannot be read ({exc}).", bak) from exc
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                f"The manifest {self.path} has schema {schema!r}; this mobseg reads "
                f"schema {SCHEMA_VERSION}.",
                "Use a fresh --workdir or the mobseg version that wrote it.",
            )
        raw = data.get("records", {})
        if not isinstance(raw, dict):
            raise ManifestError(
                f"The manifest {self.path} is malformed ('records' is not an object).", bak
            )
        records = {}
        for key, value in raw.items():
            try:
                if isinstance(value, dict):
                    value = dict(value)
                    _absolutize(value, self.root)
                records[key] = StageRecord.from_dict(value)
            except (ValueError, TypeError) as exc:
                raise ManifestError(
                    f"The manifest {self.path} is malformed: record {key!r}: {exc}.", bak
                ) from exc
        return records

    def _read_unlocked(self) -> dict[str, StageRecord]:
        return self._parse(self._read_text())

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold the lock for a read, or read without it where the lock cannot be made."""
        try:
            self.lock.acquire()
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) and self.writable():
                raise
            yield  # read-only workdir: writers are impossible, the replace is atomic
            return
        try:
            yield
        finally:
            self.lock.release()

    def records(self) -> dict[str, StageRecord]:
        """All records by key (a consistent snapshot).

        A workdir without a manifest reads as empty without taking the lock, so
        that reading (``mobseg status``) never creates the folder.
        """
        if not self.path.parent.is_dir():
            return {}
        with self._reading():
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
    def _write_unlocked(self, records: dict[str, StageRecord], previous: str | None = None) -> None:
        payload = {
            "schema": SCHEMA_VERSION,
            "records": {k: record_to_json(records[k], self.root) for k in sorted(records)},
        }
        if previous is not None:
            fsutil.atomic_write_bytes(self.backup_path, previous.encode("utf-8"))
        fsutil.atomic_write_bytes(self.path, json.dumps(payload, indent=1).encode("utf-8"))

    def update(self, key: str, change: Callable[[StageRecord | None], StageRecord | None]) -> None:
        """Atomically replace the record of ``key`` by ``change(old)``.

        ``change`` receives the current record (or None) and returns the new
        one, or None to delete it. The whole read-modify-write holds the lock.

        Raises:
            StorageError: the workdir is read-only or full (nothing is changed).
        """
        try:
            fsutil.make_parent(self.path)
            self.lock.acquire()
        except OSError as exc:
            raise fsutil.storage_error(self.path, fsutil.describe_os_error(exc)) from exc
        try:
            previous = self._read_text()
            records = self._parse(previous)
            new = change(records.get(key))
            if new is None:
                records.pop(key, None)
            else:
                records[key] = new
            self._write_unlocked(records, previous)
        finally:
            self.lock.release()

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
        with self.stage_lock(key):
            self.start(stage, key, params, inputs)
            outputs: dict[str, Any] = {}
            try:
                yield outputs
            except Exception as exc:
                line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                try:
                    self.fail(key, f"{type(exc).__name__}: {line}")
                except (OSError, MobsegError) as rec_exc:  # e.g. the disk is full
                    log.warning(
                        "%s could not be marked failed (%s); it stays 'running' and a rerun "
                        "resumes it.",
                        key,
                        rec_exc,
                    )
                raise
            self.finish(key, outputs)

    def lock_path(self, key: str) -> Path:
        """The lock file of one record: ``<workdir>/.locks/<key>.lock``."""
        return self.root / ".locks" / f"{key}.lock"

    @contextmanager
    def stage_lock(self, key: str) -> Iterator[None]:
        """Hold the lock of ``key`` for a block: one process runs a stage at a time.

        Raises:
            BusyError: another process holds it (the message says which).
            StorageError: the lock cannot be created (read-only or full workdir).
        """
        path = self.lock_path(key)
        fsutil.make_parent(path)
        lock = FileLock(str(path), timeout=0)
        owner = path.with_name(path.name + ".owner")
        try:
            lock.acquire()
        except Timeout:
            raise BusyError(
                f"Stage {key!r} is being run by {_holder_note(owner)}.",
                "Wait for it to finish, then rerun the same command (finished work is kept).",
            ) from None
        except OSError as exc:
            raise fsutil.storage_error(path, fsutil.describe_os_error(exc)) from exc
        try:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
            try:
                owner.write_text(json.dumps(info), encoding="utf-8")
            except OSError:
                pass
            yield
        finally:
            owner.unlink(missing_ok=True)
            lock.release()
