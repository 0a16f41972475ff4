"""The Zenodo client against a local HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mobseg.data import zenodo
from mobseg.data.zenodo import RetryPolicy, ZenodoFile, download_file, fetch_dataset, resolve_record
from mobseg.errors import DownloadError

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes, crosses chunk boundaries
NAME = "Totalsegmentator_dataset_small_v201.zip"
FAST = RetryPolicy(retries=3, backoff=0.5, timeout=5.0)


@dataclass
class Behaviour:
    """What the fake Zenodo does; every request is logged."""

    payload: bytes = PAYLOAD
    md5: str = hashlib.md5(PAYLOAD).hexdigest()
    drop_first_after: int | None = None  # bytes sent before dropping the first download
    ignore_range: bool = False
    fail_statuses: list[int] = field(default_factory=list)  # answered before serving
    record_status: int = 200
    log: list[dict[str, str | None]] = field(default_factory=list)


class Server:
    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                b = outer.b
                b.log.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path.startswith("/api/records/"):
                    if b.record_status != 200:
                        self.send_error(b.record_status)
                        return
                    record = self.path.rsplit("/", 1)[1]
                    body = json.dumps(
                        {
                            "id": record,
                            "files": [
                                {
                                    "key": NAME,
                                    "size": len(b.payload),
                                    "checksum": f"md5:{b.md5}",
                                    "links": {"self": f"{outer.url}/files/{NAME}/content"},
                                }
                            ],
                        }
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if b.fail_statuses:
                    self.send_error(b.fail_statuses.pop(0))
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not b.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(b.payload) - 1}/{len(b.payload)}"
                    )
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(b.payload) - start))
                self.end_headers()
                body = b.payload[start:]
                if b.drop_first_after is not None:
                    cut, b.drop_first_after = b.drop_first_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    # the fake server serves the "published" small archive: PAYLOAD is its content
    published = zenodo.ZenodoDataset("10047263", NAME, None, hashlib.md5(PAYLOAD).hexdigest())
    monkeypatch.setitem(zenodo.DATASETS, "small", published)
    s = Server(Behaviour())
    yield s
    s.close()


def downloads(server: Server) -> list[dict[str, str | None]]:
    return [e for e in server.b.log if str(e["path"]).startswith("/files/")]


def no_sleep(_: float) -> None:
    pass


def test_record_json_is_resolved(server: Server) -> None:
    files = resolve_record("10047263", server.url, FAST, no_sleep)
    assert files == [
        ZenodoFile(
            NAME,
            len(PAYLOAD),
            hashlib.md5(PAYLOAD).hexdigest(),
            f"{server.url}/files/{NAME}/content",
        )
    ]
    assert server.b.log[0]["path"] == "/api/records/10047263"


def test_dropped_connection_resumes_with_range(server: Server, tmp_path: Path) -> None:
    server.b.drop_first_after = 300_000
    path = fetch_dataset("small", tmp_path, server.url, FAST, no_sleep)
    assert path == tmp_path / NAME and path.read_bytes() == PAYLOAD
    reqs = downloads(server)
    assert len(reqs) == 2 and reqs[0]["range"] is None
    assert reqs[1]["range"] == "bytes=300000-"
    assert not (tmp_path / (NAME + ".part")).exists()
    assert json.loads((tmp_path / (NAME + ".verified.json")).read_text())["md5"] == server.b.md5
    # a second call trusts the stamp and downloads nothing
    fetch_dataset("small", tmp_path, server.url, FAST, no_sleep)
    assert len(downloads(server)) == 2


def test_partial_file_from_an_earlier_process_is_resumed(server: Server, tmp_path: Path) -> None:
    (tmp_path / (NAME + ".part")).write_bytes(PAYLOAD[:123_457])
    path = fetch_dataset("small", tmp_path, server.url, FAST, no_sleep)
    assert path.read_bytes() == PAYLOAD
    assert [r["range"] for r in downloads(server)] == ["bytes=123457-"]


def test_server_ignoring_range_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    server.b.ignore_range = True
    (tmp_path / (NAME + ".part")).write_bytes(b"garbage that must not stay")
    path = fetch_dataset("small", tmp_path, server.url, FAST, no_sleep)
    assert path.read_bytes() == PAYLOAD


def test_md5_mismatch_keeps_the_file_aside(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.b.md5 = "0" * 32
    monkeypatch.setitem(zenodo.DATASETS, "small", zenodo.ZenodoDataset("1", NAME, None, "0" * 32))
    with pytest.raises(DownloadError) as info:
        fetch_dataset("small", tmp_path, server.url, FAST, no_sleep)
    bad = tmp_path / (NAME + ".bad")
    msg = str(info.value)
    assert f"has md5 {hashlib.md5(PAYLOAD).hexdigest()}, Zenodo says {'0' * 32}" in msg
    assert str(bad) in msg and "kept aside" in msg
    assert bad.read_bytes() == PAYLOAD
    assert not (tmp_path / NAME).exists() and not (tmp_path / (NAME + ".part")).exists()


def test_existing_unverified_file_is_checked(server: Server, tmp_path: Path) -> None:
    (tmp_path / NAME).write_bytes(PAYLOAD)
    assert fetch_dataset("small", tmp_path, server.url, FAST, no_sleep) == tmp_path / NAME
    assert downloads(server) == []  # verified by hashing, not downloaded again
    (tmp_path / (NAME + ".verified.json")).unlink()
    (tmp_path / NAME).write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(DownloadError, match="kept aside"):
        fetch_dataset("small", tmp_path, server.url, FAST, no_sleep)
    assert (tmp_path / (NAME + ".bad")).exists()


def test_transient_errors_are_retried_with_backoff(server: Server, tmp_path: Path) -> None:
    server.b.fail_statuses = [503, 502]
    slept: list[float] = []
    path = fetch_dataset("small", tmp_path, server.url, FAST, slept.append)
    assert path.read_bytes() == PAYLOAD
    assert slept == [0.5, 1.0]


def test_retries_run_out(server: Server, tmp_path: Path) -> None:
    server.b.fail_statuses = [503] * 10
    slept: list[float] = []
    with pytest.raises(DownloadError, match="failed after 4 attempts"):
        fetch_dataset("small", tmp_path, server.url, FAST, slept.append)
    assert slept == [0.5, 1.0, 2.0]


def test_permanent_http_errors_are_not_retried(server: Server, tmp_path: Path) -> None:
    server.b.fail_statuses = [404]
    slept: list[float] = []
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_dataset("small", tmp_path, server.url, FAST, slept.append)
    assert slept == []
    server.b.record_status = 410
    with pytest.raises(DownloadError, match="HTTP 410"):
        resolve_record("1", server.url, FAST, no_sleep)


def test_unreachable_server(tmp_path: Path) -> None:
    slept: list[float] = []
    with pytest.raises(DownloadError, match="Reading Zenodo record"):
        resolve_record("1", "http://127.0.0.1:9", RetryPolicy(retries=1, backoff=0.1), slept.append)
    assert slept == [0.1]


def test_size_mismatch_is_reported(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/files/{NAME}/content"
    longer = ZenodoFile(NAME, len(PAYLOAD) - 10, server.b.md5, url)
    with pytest.raises(DownloadError, match=f"has {len(PAYLOAD)} bytes, Zenodo says"):
        download_file(longer, tmp_path, RetryPolicy(retries=0, backoff=0.0), no_sleep)
    assert (tmp_path / (NAME + ".bad")).stat().st_size == len(PAYLOAD)
    # the server sends its whole (shorter) file: a size mismatch at once, not 9 retries
    shorter = ZenodoFile(NAME, len(PAYLOAD) + 10, server.b.md5, url)
    slept: list[float] = []
    with pytest.raises(DownloadError, match=f"Size mismatch: .* {len(PAYLOAD)} bytes, but the"):
        download_file(shorter, tmp_path / "b", RetryPolicy(retries=8, backoff=0.0), slept.append)
    assert slept == [] and len(downloads(server)) == 2
    assert (tmp_path / "b" / (NAME + ".bad")).stat().st_size == len(PAYLOAD)


def test_a_mirrors_md5_does_not_replace_the_published_one(server: Server, tmp_path: Path) -> None:
    other = b"another archive" * 1000
    server.b.payload, server.b.md5 = other, hashlib.md5(other).hexdigest()
    with pytest.raises(DownloadError, match=f"Zenodo says {hashlib.md5(PAYLOAD).hexdigest()}"):
        fetch_dataset("small", tmp_path, server.url, FAST, no_sleep)
    assert not (tmp_path / NAME).exists()


def test_no_network_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    def no_dns(*_a, **_k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    slept: list[float] = []
    start = time.monotonic()
    with pytest.raises(DownloadError, match="Cannot resolve the host zenodo.org"):
        fetch_dataset("small", tmp_path, "https://zenodo.org", RetryPolicy(), slept.append)
    assert slept == [] and time.monotonic() - start < 30


def test_known_archives() -> None:
    assert zenodo.DATASETS["full"].record == "10047292"
    assert zenodo.DATASETS["full"].size == 23_581_218_285
    assert zenodo.DATASETS["full"].md5 == "fe250e5718e0a3b5df4c4ea9d58a62fe"
    assert zenodo.DATASETS["small"].record == "10047263"
