"""A small, careful Zenodo client: resolve a record, download, resume, verify.

TotalSegmentator v2.0.1 lives on Zenodo:

- ``full``: record 10047292, ``Totalsegmentator_dataset_v201.zip``,
  23,581,218,285 bytes, md5 ``fe250e5718e0a3b5df4c4ea9d58a62fe`` (1228 scans);
- ``small``: record 10047263, ``Totalsegmentator_dataset_small_v201.zip``,
  md5 ``6b5524af4b15e6ba06ef2d700c0c73e0`` (102 scans).

The record's JSON (``<base>/api/records/<id>``) lists its files with ``key``,
``size``, ``checksum`` (``"md5:<hex>"``) and ``links.self`` (the content URL);
the size and md5 used for verification are the record's own.

Download protocol:

- the file is written to ``<name>.part``; an interrupted download (a dropped
  connection, a killed process) resumes from the bytes already there with an
  HTTP ``Range`` request (a server that answers 200 instead of 206 restarts it);
- network failures (connection errors, timeouts, HTTP 429 and 5xx) are retried
  with exponential back-off (``backoff * 2**attempt`` seconds, at most 60);
  the attempt counter resets whenever bytes arrive;
- the md5 is computed while downloading (the existing part is hashed first
  when resuming); size and md5 are checked before the file gets its final
  name. A mismatch moves the file aside to ``<name>.bad`` and raises
  :class:`~mobseg.errors.DownloadError` saying so;
- a verified file gets a ``<name>.verified.json`` stamp (size, md5, mtime), so
  later runs do not hash 23 GB again.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mobseg import progress
from mobseg.data.nifti import atomic_write_json
from mobseg.errors import DownloadError

log = logging.getLogger(__name__)

ZENODO_URL = "https://zenodo.org"
_CHUNK = 1 << 20
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class ZenodoDataset:
    """A published archive of TotalSegmentator on Zenodo.

    Attributes:
        record: The Zenodo record id.
        filename: The archive's file name in the record.
        size: Its size in bytes when known.
        md5: Its md5 (hex) as published.
    """

    record: str
    filename: str
    size: int | None
    md5: str


DATASETS: dict[str, ZenodoDataset] = {
    "full": ZenodoDataset(
        "10047292",
        "Totalsegmentator_dataset_v201.zip",
        23_581_218_285,
        "fe250e5718e0a3b5df4c4ea9d58a62fe",
    ),
    "small": ZenodoDataset(
        "10047263",
        "Totalsegmentator_dataset_small_v201.zip",
        None,
        "6b5524af4b15e6ba06ef2d700c0c73e0",
    ),
}


@dataclass(frozen=True)
class ZenodoFile:
    """One file of a Zenodo record.

    Attributes:
        key: File name.
        size: Size in bytes.
        md5: md5 hex digest (lower case).
        url: Content URL.
    """

    key: str
    size: int
    md5: str
    url: str


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry.

    Attributes:
        retries: Consecutive failed attempts allowed (without progress).
        backoff: Base delay in seconds (``backoff * 2**attempt``, capped at 60 s).
        timeout: Socket timeout in seconds.
    """

    retries: int = 8
    backoff: float = 2.0
    timeout: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(60.0, self.backoff * (2.0**attempt))


class _Transient(Exception):
    """A failure worth retrying."""


def _user_agent() -> dict[str, str]:
    return {"User-Agent": "mobseg (TotalSegmentator downloader)"}


def _retrying(
    what: str, policy: RetryPolicy, fn: Callable[[], Any], sleep: Callable[[float], None]
) -> Any:
    """Call ``fn`` until it succeeds, retrying transient failures."""
    attempt = 0
    while True:
        try:
            return fn()
        except _Transient as exc:
            if attempt >= policy.retries:
                raise DownloadError(
                    f"{what} failed after {attempt + 1} attempts ({exc.__cause__ or exc}).",
                    "Check the network connection and run the command again; downloads resume.",
                ) from exc
            wait = policy.delay(attempt)
            log.warning("%s failed (%s); retrying in %.0f s", what, exc.__cause__ or exc, wait)
            sleep(wait)
            attempt += 1


def _classify(exc: BaseException, url: str) -> BaseException:
    """Turn a urllib error into _Transient (retry) or DownloadError (give up).

    A host name that does not resolve (no network, no DNS, a typo in the
    URL) gives up at once: retrying it for minutes helps nobody.
    """
    reason = getattr(exc, "reason", None) if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        host = urllib.parse.urlsplit(url).hostname or url
        return DownloadError(
            f"Cannot resolve the host {host} ({reason.strerror or reason}): no network?",
            "Check the network connection (or --zenodo-url) and run the command again; "
            "downloads resume.",
        )
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in _RETRY_STATUS:
            t = _Transient(f"HTTP {exc.code}")
            t.__cause__ = exc
            return t
        return DownloadError(f"{url} answered HTTP {exc.code} ({exc.reason}).")
    t = _Transient(str(exc) or type(exc).__name__)
    t.__cause__ = exc
    return t


def resolve_record(
    record: str,
    base_url: str = ZENODO_URL,
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> list[ZenodoFile]:
    """The files of a Zenodo record.

    Args:
        record: Record id, e.g. ``10047292``.
        base_url: Zenodo (or a mirror / test server) without trailing slash.
        policy: Retry policy.
        sleep: Sleep function (tests pass a no-op).

    Raises:
        DownloadError: unreachable after retries, HTTP error, or an answer
            that is not a record with files.
    """
    url = f"{base_url.rstrip('/')}/api/records/{record}"

    def get() -> Any:
        req = urllib.request.Request(url, headers={**_user_agent(), "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=policy.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except json.JSONDecodeError as exc:
            raise DownloadError(f"{url} did not answer with JSON ({exc}).") from exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _classify(exc, url) from exc

    data = _retrying(f"Reading Zenodo record {record}", policy, get, sleep)
    entries = data.get("files") if isinstance(data, dict) else None
    if isinstance(entries, dict):  # newer API: {"entries": {...}}
        entries = list((entries.get("entries") or {}).values())
    if not isinstance(entries, list) or not entries:
        raise DownloadError(f"Zenodo record {record} at {url} lists no files.")
    files: list[ZenodoFile] = []
    for e in entries:
        try:
            key = e.get("key") or e["filename"]
            size = int(e.get("size", e.get("filesize")))
            checksum = str(e["checksum"])
            links = e.get("links") or {}
            link = links.get("self") or links.get("content") or links.get("download")
        except (KeyError, TypeError, ValueError) as exc:
            raise DownloadError(
                f"Zenodo record {record} has a malformed file entry: {e!r}"
            ) from exc
        algo, _, digest = checksum.partition(":")
        if algo.lower() != "md5" or not digest:
            raise DownloadError(f"Zenodo record {record}: unsupported checksum {checksum!r}.")
        if not link:
            link = f"{base_url.rstrip('/')}/records/{record}/files/{key}/content"
        files.append(ZenodoFile(key=key, size=size, md5=digest.lower(), url=link))
    return files


def _hash_file(path: Path, hasher: Any, limit: int | None = None) -> int:
    done = 0
    with open(path, "rb") as fh:
        while True:
            want = _CHUNK if limit is None else min(_CHUNK, limit - done)
            if want <= 0:
                break
            chunk = fh.read(want)
            if not chunk:
                break
            hasher.update(chunk)
            done += len(chunk)
    return done


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _is_stamped(path: Path, zf: ZenodoFile) -> bool:
    stamp = _stamp_path(path)
    if not (path.is_file() and stamp.is_file()):
        return False
    try:
        data = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    st = path.stat()
    return data == {"size": zf.size, "md5": zf.md5, "mtime_ns": st.st_mtime_ns} and (
        st.st_size == zf.size
    )


def _stamp(path: Path, zf: ZenodoFile) -> None:
    atomic_write_json(
        _stamp_path(path),
        {"size": zf.size, "md5": zf.md5, "mtime_ns": path.stat().st_mtime_ns},
    )


def _put_aside(path: Path, message: str) -> DownloadError:
    bad = path.with_name(path.name.removesuffix(".part") + ".bad")
    os.replace(path, bad)
    return DownloadError(
        f"{message} The file was kept aside as {bad}.",
        "Run the command again to download it anew (delete the .bad file when done).",
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=progress.console,
        disable=not progress.enabled(),
    )


def download_file(
    zf: ZenodoFile,
    dest_dir: str | os.PathLike[str],
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download one record file to ``dest_dir/<key>``, resumably, and verify it.

    Returns:
        The verified file.

    Raises:
        DownloadError: network failure after retries, an HTTP error, or a size
            or md5 mismatch (the file is then kept aside as ``<key>.bad``).
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    # One download per file at a time, also across processes (``study --jobs``).
    with FileLock(str(dest / f".{zf.key}.lock")):
        return _download_locked(zf, dest, policy, sleep)


def _download_locked(
    zf: ZenodoFile, dest: Path, policy: RetryPolicy, sleep: Callable[[float], None]
) -> Path:
    final = dest / zf.key
    if _is_stamped(final, zf):
        log.info("%s is already downloaded and verified.", final)
        return final
    if final.is_file():
        # A file without a valid stamp (copied in by hand, or stamp lost): verify it.
        hasher = hashlib.md5()
        size = _hash_file(final, hasher)
        if size == zf.size and hasher.hexdigest() == zf.md5:
            _stamp(final, zf)
            return final
        raise _put_aside(
            final,
            f"{final} does not match Zenodo's size/md5 ({size} bytes, md5 {hasher.hexdigest()}; "
            f"expected {zf.size} bytes, md5 {zf.md5}).",
        )
    part = dest / (zf.key + ".part")
    hasher = hashlib.md5()
    hashed = 0
    if part.is_file() and part.stat().st_size > zf.size:
        part.unlink()
    if part.is_file() and part.stat().st_size:
        log.info("Resuming %s from %d bytes.", zf.key, part.stat().st_size)
        hashed = _hash_file(part, hasher)

    with _progress() as prog:
        task = prog.add_task(f"Downloading {zf.key}", total=zf.size, completed=hashed)

        def attempt() -> bool:
            nonlocal hasher, hashed
            offset = part.stat().st_size if part.is_file() else 0
            if offset != hashed:  # the part changed under us: hash it again
                hasher, hashed = hashlib.md5(), 0
                hashed = _hash_file(part, hasher) if offset else 0
            if offset >= zf.size:
                return True
            headers = dict(_user_agent())
            if offset:
                headers["Range"] = f"bytes={offset}-"
            req = urllib.request.Request(zf.url, headers=headers)
            try:
                resp = urllib.request.urlopen(req, timeout=policy.timeout)
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and offset:  # range not satisfiable: start afresh
                    part.unlink(missing_ok=True)
                    hasher, hashed = hashlib.md5(), 0
                    raise _Transient("HTTP 416, restarting") from exc
                raise _classify(exc, zf.url) from exc
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                raise _classify(exc, zf.url) from exc
            with resp:
                mode = "ab"
                if offset and resp.status != 206:
                    log.warning("The server ignored the Range request; restarting %s.", zf.key)
                    mode, hasher, hashed = "wb", hashlib.md5(), 0
                    prog.update(task, completed=0)
                elif offset:
                    start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != offset:
                        part.unlink(missing_ok=True)
                        hasher, hashed = hashlib.md5(), 0
                        raise _Transient(f"unexpected Content-Range {start} for offset {offset}")
                progressed = False
                got = 0
                try:
                    with open(part, mode) as out:
                        while True:
                            chunk = resp.read(_CHUNK)
                            if not chunk:
                                break
                            out.write(chunk)
                            hasher.update(chunk)
                            hashed += len(chunk)
                            got += len(chunk)
                            progressed = True
                            prog.update(task, completed=hashed)
                except (http.client.HTTPException, OSError) as exc:
                    if progressed:
                        raise _Progressed(str(exc) or type(exc).__name__) from exc
                    raise _classify(exc, zf.url) from exc
            length = resp.headers.get("Content-Length")
            if hashed < zf.size and length is not None and length.isdigit() and got == int(length):
                # the server sent its whole file: it is shorter than the record says
                raise _put_aside(
                    part,
                    f"Size mismatch: the server sent all of {zf.key}, {hashed} bytes, but the "
                    f"record says {zf.size}.",
                )
            if hashed < zf.size:
                raise _Progressed(f"connection closed at {hashed} of {zf.size} bytes")
            return True

        def attempt_resetting() -> bool:
            # A break after new bytes resumes at once without using up the retry
            # budget; a break that gained nothing counts as a failed attempt.
            best = hashed
            while True:
                try:
                    return attempt()
                except _Progressed as exc:
                    if hashed <= best:
                        raise _Transient(str(exc)) from exc
                    best = hashed
                    log.warning("Download interrupted (%s); resuming.", exc)

        _retrying(f"Downloading {zf.key}", policy, attempt_resetting, sleep)

    size = part.stat().st_size
    if size != zf.size:
        raise _put_aside(part, f"{zf.key} has {size} bytes, Zenodo says {zf.size}.")
    digest = hasher.hexdigest() if hashed == size else _rehash(part)
    if digest != zf.md5:
        raise _put_aside(part, f"{zf.key} has md5 {digest}, Zenodo says {zf.md5}.")
    os.replace(part, final)
    _stamp(final, zf)
    log.info("Downloaded and verified %s (%d bytes, md5 %s).", final, size, digest)
    return final


class _Progressed(Exception):
    """The connection broke after some bytes arrived (resume at once)."""


def _rehash(path: Path) -> str:
    h = hashlib.md5()
    _hash_file(path, h)
    return h.hexdigest()


def _content_range_start(value: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes a-b/n`` header."""
    if not value:
        return None
    try:
        unit, _, rest = value.partition(" ")
        if unit.strip().lower() != "bytes":
            return None
        return int(rest.split("-", 1)[0])
    except ValueError:
        return None


def fetch_dataset(
    subset: str,
    dest_dir: str | os.PathLike[str],
    base_url: str = ZENODO_URL,
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Resolve, download and verify the TotalSegmentator archive of ``subset``.

    Args:
        subset: ``full`` (record 10047292) or ``small`` (10047263).
        dest_dir: Download folder (``<workdir>/downloads``).
        base_url: Zenodo or a mirror with the same API.

    Returns:
        The verified zip file.
    """
    ds = DATASETS[subset]
    files = resolve_record(ds.record, base_url, policy, sleep)
    chosen = [f for f in files if f.key == ds.filename] or [
        f for f in files if f.key.endswith(".zip")
    ]
    if len(chosen) != 1:
        raise DownloadError(
            f"Zenodo record {ds.record} has no single archive {ds.filename} "
            f"(files: {', '.join(f.key for f in files)})."
        )
    zf = chosen[0]
    if zf.key == ds.filename and (zf.md5 != ds.md5 or (ds.size is not None and zf.size != ds.size)):
        # the published md5 wins: a mirror (or a changed record) cannot swap the data
        log.warning(
            "%s lists md5 %s (%d bytes) for %s; the published archive has md5 %s%s. "
            "Verifying against the published values.",
            base_url,
            zf.md5,
            zf.size,
            zf.key,
            ds.md5,
            "" if ds.size is None else f" ({ds.size} bytes)",
        )
        zf = ZenodoFile(
            key=zf.key, size=ds.size if ds.size is not None else zf.size, md5=ds.md5, url=zf.url
        )
    return download_file(zf, dest_dir, policy, sleep)
