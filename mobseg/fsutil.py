"""Publishing files safely: verify, fsync, honour the umask, then rename.

Every file mobseg writes goes to a temporary name in the destination folder
first. :func:`publish` then checks it (its size, and an optional full read such
as a NIfTI verification), flushes it to the disk, gives it the mode the umask
allows (``tempfile`` creates 0600 files) and only then renames it into place.
A write that fails, or a file that does not verify (a full disk: SimpleITK's
writer reports ENOSPC only on stderr), removes the temporary file and raises
:class:`~mobseg.errors.StorageError` naming the file and the free space.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mobseg.errors import MobsegError, StorageError

#: OSError numbers that mean "the storage refuses the write", not a bug.
STORAGE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EFBIG,
        errno.EIO,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.EISDIR,
    }
)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # fallback: set and restore at once
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0o666 minus the umask)."""
    return 0o666 & ~current_umask()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_space(path: str | os.PathLike[str]) -> str:
    """``"12.3 MiB free"`` on the file system of ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{_human(shutil.disk_usage(p).free)} free"
    except OSError:
        return "free space unknown"


def storage_error(path: str | os.PathLike[str], reason: str) -> StorageError:
    """The one-line error of a failed write of ``path``."""
    return StorageError(
        f"Could not write {path}: {reason} ({free_space(Path(path).parent)} there).",
        "Free some space or fix the folder, then rerun the same command.",
    )


def describe_os_error(exc: OSError) -> str:
    """A short reason for ``exc`` without its path (e.g. ``No space left on device``)."""
    return exc.strerror or str(exc) or type(exc).__name__


def is_storage_error(exc: BaseException) -> bool:
    """``exc`` is an OSError of the storage (full, read-only, not a folder, ...)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename) to the disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(
    tmp: str | os.PathLike[str],
    final: str | os.PathLike[str],
    verify: Callable[[Path], None] | None = None,
    expected_size: int | None = None,
) -> Path:
    """Verify, fsync, chmod and rename the finished temporary file ``tmp`` to ``final``.

    Args:
        tmp: The written temporary file (in ``final``'s folder).
        final: Its published name.
        verify: Called with ``tmp``; raises if the file is incomplete (e.g. a
            full read of a NIfTI file).
        expected_size: The exact size in bytes, when known; otherwise an empty
            file fails.

    Returns:
        ``final``.

    Raises:
        StorageError: the file is missing, short, does not verify, or cannot be
            flushed or renamed; ``tmp`` is removed.
    """
    tmp_path, final_path = Path(tmp), Path(final)
    try:
        size = tmp_path.stat().st_size
        if expected_size is not None and size != expected_size:
            raise storage_error(final_path, f"{size} of {expected_size} bytes were written")
        if expected_size is None and size == 0:
            raise storage_error(final_path, "the writer left an empty file")
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if verify is not None:
            try:
                verify(tmp_path)
            except MobsegError as exc:
                raise storage_error(
                    final_path, f"the written file does not read back ({exc.message})"
                ) from exc
        os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, final_path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise storage_error(final_path, describe_os_error(exc)) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(final_path.parent)
    return final_path


def _suffix(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".tar.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix


def make_parent(path: str | os.PathLike[str]) -> Path:
    """Create ``path``'s folder; a file in the way or a read-only disk is a StorageError."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(
            path, f"its folder cannot be created ({describe_os_error(exc)})"
        ) from exc
    if not folder.is_dir():  # pragma: no cover - mkdir raises first
        raise storage_error(path, "its folder is a file")
    return folder


@contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    verify: Callable[[Path], None] | None = None,
    expected_size: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; :func:`publish` it on success.

    The temporary name keeps the extension (so writers that choose a format by
    extension still work) and starts with a dot. On an exception, or when the
    file does not verify, the temporary file is removed and ``path`` is left
    untouched; storage failures raise :class:`~mobseg.errors.StorageError`.
    """
    final = Path(path)
    folder = make_parent(final)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_suffix(final), dir=folder)
    except OSError as exc:
        raise storage_error(final, describe_os_error(exc)) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if is_storage_error(exc):
            raise storage_error(final, describe_os_error(exc)) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    publish(tmp_path, final, verify, expected_size)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (checked, flushed, fsynced, umask mode)."""
    with atomic_path(path, expected_size=len(data)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
