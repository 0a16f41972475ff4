"""Access to a dataset in the TotalSegmentator layout, extracted or zipped.

Layout (v2.0.1)::

    <root>/meta.csv
    <root>/sXXXX/ct.nii.gz
    <root>/sXXXX/segmentations/<structure>.nii.gz     (117 files, absent ones all zero)

``<root>`` is wherever ``meta.csv`` is found (the shallowest one), in a folder
or inside a zip archive; it is never assumed. From a zip only the members
asked for are read (the central directory plus those members), so a 23 GB
archive is never extracted as a whole. Members are copied to a temporary file
in a folder the caller names (inside the workdir) only for as long as they
are read.

Archive entries whose names are absolute (``/x``, ``C:\\x``) or contain a
``..`` component are refused: they are never read, and they are listed in
:attr:`ZipSource.refused` so the caller can report them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
import SimpleITK as sitk

from mobseg.data import nifti
from mobseg.errors import InvalidInputError
from mobseg.fsutil import atomic_write_bytes, describe_os_error, is_storage_error, storage_error

log = logging.getLogger(__name__)

META_NAME = "meta.csv"
CT_NAME = "ct.nii.gz"
SEG_DIR = "segmentations"
_CASE_DIR_RE = re.compile(r"^s\d{4,}$")


def ct_relpath() -> str:
    """Path of the CT inside a case folder."""
    return CT_NAME


def mask_relpath(organ: str) -> str:
    """Path of a structure's mask inside a case folder."""
    return f"{SEG_DIR}/{organ}.nii.gz"


def is_unsafe_member(name: str) -> bool:
    """True for archive names that could escape an extraction folder."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return ".." in parts


class Source(ABC):
    """A TotalSegmentator-layout dataset.

    Attributes:
        kind: ``dir`` or ``zip``.
        path: The folder or archive.
    """

    kind: str
    path: Path

    @abstractmethod
    def meta_bytes(self) -> bytes:
        """The content of meta.csv."""

    @abstractmethod
    def meta_location(self) -> str:
        """Where meta.csv is, for messages."""

    @abstractmethod
    def exists(self, case: str, rel: str) -> bool:
        """Whether ``<root>/<case>/<rel>`` is present."""

    @abstractmethod
    def location(self, case: str, rel: str) -> str:
        """A readable location of ``<case>/<rel>`` (a path, or ``archive!member``)."""

    @abstractmethod
    def case_folders(self) -> set[str]:
        """Names of the ``sXXXX`` folders present next to meta.csv."""

    @abstractmethod
    @contextmanager
    def local_file(self, case: str, rel: str, tmp_dir: Path) -> Iterator[Path]:
        """A readable local path of ``<case>/<rel>`` while the block runs.

        Raises:
            InvalidInputError: the file is absent, or the archive member is corrupt.
        """

    @property
    def refused(self) -> list[str]:
        """Unsafe archive entries that were refused (always empty for folders)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release open handles."""


class DirSource(Source):
    """An extracted dataset folder.

    Args:
        path: The folder; meta.csv is looked for in it and up to two levels down.
    """

    kind = "dir"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self.root = self._locate_root(self.path)

    @staticmethod
    def _locate_root(path: Path) -> Path:
        if (path / META_NAME).is_file():
            return path
        found: list[Path] = []
        for depth in ("*", "*/*"):
            found = sorted(p for p in path.glob(f"{depth}/{META_NAME}") if p.is_file())
            if found:
                break
        if not found:
            raise InvalidInputError(
                "No meta.csv found in the folder or two levels below.",
                path=str(path),
                hint="Give the extracted TotalSegmentator folder (with meta.csv and sXXXX/).",
            )
        if len(found) > 1:
            log.warning("Several meta.csv files under %s; using %s", path, found[0])
        return found[0].parent

    def meta_bytes(self) -> bytes:
        return (self.root / META_NAME).read_bytes()

    def meta_location(self) -> str:
        return str(self.root / META_NAME)

    def _file(self, case: str, rel: str) -> Path:
        return self.root / case / rel

    def exists(self, case: str, rel: str) -> bool:
        return self._file(case, rel).is_file()

    def location(self, case: str, rel: str) -> str:
        return str(self._file(case, rel))

    def case_folders(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir() and _CASE_DIR_RE.match(p.name)}

    @contextmanager
    def local_file(self, case: str, rel: str, tmp_dir: Path) -> Iterator[Path]:
        path = self._file(case, rel)
        if not path.is_file():
            raise InvalidInputError("The file does not exist.", case=case, path=str(path))
        yield path


class ZipSource(Source):
    """A zip archive of the dataset, read member by member.

    Args:
        path: The ``.zip`` file.
    """

    kind = "zip"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InvalidInputError(
                f"Not a readable zip archive ({exc}).",
                path=str(self.path),
                hint="Download it again (mobseg verifies Zenodo downloads by md5).",
            ) from exc
        self._refused: list[str] = []
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            if is_unsafe_member(info.filename):
                self._refused.append(info.filename)
                continue
            if info.is_dir():
                continue
            self._members[info.filename.replace("\\", "/")] = info
        if self._refused:
            log.warning(
                "Refused %d archive entries with absolute paths or '..' in %s (e.g. %r); "
                "they are never read.",
                len(self._refused),
                self.path,
                self._refused[0],
            )
        metas = sorted(
            (
                n
                for n in self._members
                if PurePosixPath(n).name == META_NAME and not n.startswith("__MACOSX/")
            ),
            key=lambda n: (n.count("/"), n),
        )
        if not metas:
            raise InvalidInputError(
                "The archive holds no meta.csv.",
                path=str(self.path),
                hint="Give the TotalSegmentator v2.0.1 archive or an extracted folder.",
            )
        self._meta = metas[0]
        parent = str(PurePosixPath(self._meta).parent)
        self.prefix = "" if parent == "." else parent + "/"

    @property
    def refused(self) -> list[str]:
        return list(self._refused)

    def _name(self, case: str, rel: str) -> str:
        return f"{self.prefix}{case}/{rel}"

    def meta_bytes(self) -> bytes:
        return self._read_member(self._meta, None)

    def meta_location(self) -> str:
        return f"{self.path}!{self._meta}"

    def exists(self, case: str, rel: str) -> bool:
        return self._name(case, rel) in self._members

    def location(self, case: str, rel: str) -> str:
        return f"{self.path}!{self._name(case, rel)}"

    def case_folders(self) -> set[str]:
        out = set()
        n = len(self.prefix)
        for name in self._members:
            if name.startswith(self.prefix):
                first = name[n:].split("/", 1)[0]
                if _CASE_DIR_RE.match(first) and "/" in name[n:]:
                    out.add(first)
        return out

    def _read_member(self, name: str, case: str | None) -> bytes:
        try:
            return self._zip.read(self._members[name])
        except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
            raise InvalidInputError(
                f"The archive member is corrupt ({exc}).",
                case=case,
                path=f"{self.path}!{name}",
            ) from exc

    @contextmanager
    def local_file(self, case: str, rel: str, tmp_dir: Path) -> Iterator[Path]:
        name = self._name(case, rel)
        where = f"{self.path}!{name}"
        info = self._members.get(name)
        if info is None:
            raise InvalidInputError("The archive has no such member.", case=case, path=where)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        suffix = ".nii.gz" if name.endswith(".nii.gz") else PurePosixPath(name).suffix
        fd, tmp = tempfile.mkstemp(prefix=f".{case}.", suffix=suffix, dir=tmp_dir)
        tmp_path = Path(tmp)
        try:
            try:
                with os.fdopen(fd, "wb") as out, self._zip.open(info) as member:
                    shutil.copyfileobj(member, out, 1 << 22)
            except OSError as exc:
                if is_storage_error(exc):  # a full work disk is not a corrupt archive
                    raise storage_error(tmp_path, describe_os_error(exc)) from exc
                raise InvalidInputError(
                    f"The archive member is corrupt ({exc}).", case=case, path=where
                ) from exc
            except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                raise InvalidInputError(
                    f"The archive member is corrupt ({exc}).", case=case, path=where
                ) from exc
            yield tmp_path
        finally:
            tmp_path.unlink(missing_ok=True)

    def close(self) -> None:
        self._zip.close()


class NnunetRawSource(Source):
    """An nnU-Net raw dataset folder seen through the TotalSegmentator interface.

    ``<root>/dataset.json``, ``imagesTr/<case>_0000.nii.gz`` and
    ``labelsTr/<case>.nii.gz`` (one input channel, plain labels). Every
    labelled training case is a case; ``meta.csv`` is made up (split
    ``train``). The mask of a structure is its label in the multi-label file,
    found by name in dataset.json's labels (case and ``_``/space ignored) or,
    for a dataset with one foreground label, that label. It is written as a
    0/1 file to the caller's temporary folder while it is read.

    Args:
        path: The dataset folder.

    Raises:
        InvalidInputError: no dataset.json or imagesTr, several channels, a file
            ending other than ``.nii.gz``, or region-based labels.
    """

    kind = "nnunet"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import json

        self.path = self.root = Path(path).resolve()
        try:
            ds = json.loads((self.root / "dataset.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(
                f"dataset.json cannot be read ({exc}).", path=str(self.root / "dataset.json")
            ) from exc
        channels = ds.get("channel_names", ds.get("modality", {}))
        if len(channels) != 1:
            raise InvalidInputError(
                f"The nnU-Net dataset has {len(channels)} input channels; mobseg takes CT only.",
                path=str(self.root / "dataset.json"),
            )
        if ds.get("file_ending", ".nii.gz") != ".nii.gz":
            raise InvalidInputError(
                f"The nnU-Net dataset's files end in {ds.get('file_ending')!r}; mobseg reads "
                "'.nii.gz'.",
                path=str(self.root / "dataset.json"),
            )
        labels = ds.get("labels", {})
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            raise InvalidInputError(
                "The nnU-Net dataset has region-based labels; mobseg takes plain labels.",
                path=str(self.root / "dataset.json"),
            )
        self.labels = {str(k): int(v) for k, v in labels.items() if int(v) != 0}
        images = self.root / "imagesTr"
        self.cases = sorted(
            p.name[: -len("_0000.nii.gz")]
            for p in images.glob("*_0000.nii.gz")
            if (self.root / "labelsTr" / p.name.replace("_0000.nii.gz", ".nii.gz")).is_file()
        )

    @staticmethod
    def looks_like(path: Path) -> bool:
        """Whether ``path`` is an nnU-Net raw dataset folder (and no TotalSegmentator one)."""
        return (
            (path / "dataset.json").is_file()
            and (path / "imagesTr").is_dir()
            and not (path / META_NAME).is_file()
        )

    def label_value(self, organ: str) -> int | None:
        """The label of ``organ``, or the only label, or None."""
        key = organ.lower().replace("_", " ")
        for name, value in self.labels.items():
            if name.lower().replace("_", " ") == key:
                return value
        return next(iter(self.labels.values())) if len(self.labels) == 1 else None

    def meta_bytes(self) -> bytes:
        return ("image_id;split\n" + "".join(f"{c};train\n" for c in self.cases)).encode()

    def meta_location(self) -> str:
        return f"{self.root / 'dataset.json'} (imagesTr/labelsTr)"

    def _file(self, case: str, rel: str) -> Path:
        if rel == CT_NAME:
            return self.root / "imagesTr" / f"{case}_0000.nii.gz"
        return self.root / "labelsTr" / f"{case}.nii.gz"

    def _organ(self, rel: str) -> str | None:
        prefix = SEG_DIR + "/"
        if rel.startswith(prefix) and rel.endswith(".nii.gz"):
            return rel[len(prefix) : -len(".nii.gz")]
        return None

    def exists(self, case: str, rel: str) -> bool:
        organ = self._organ(rel)
        if rel != CT_NAME and (organ is None or self.label_value(organ) is None):
            return False
        return case in self.cases and self._file(case, rel).is_file()

    def location(self, case: str, rel: str) -> str:
        return str(self._file(case, rel))

    def case_folders(self) -> set[str]:
        return set(self.cases)

    @contextmanager
    def local_file(self, case: str, rel: str, tmp_dir: Path) -> Iterator[Path]:
        path = self._file(case, rel)
        if not self.exists(case, rel):
            raise InvalidInputError("The file does not exist.", case=case, path=str(path))
        if rel == CT_NAME:
            yield path
            return
        organ = self._organ(rel)
        value = self.label_value(organ or "")
        labels = nifti.read_image(path, case)
        mask = (sitk.GetArrayFromImage(labels) == value).astype(np.uint8)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=".nii.gz", dir=tmp_dir)
        os.close(fd)
        out = Path(name)
        try:
            nifti.write_array(mask, labels, out, np.uint8)
            yield out
        finally:
            out.unlink(missing_ok=True)


def open_source(path: str | os.PathLike[str]) -> Source:
    """A :class:`DirSource` for a folder, a :class:`ZipSource` for a zip file, a
    :class:`NnunetRawSource` for an nnU-Net raw dataset folder.

    Raises:
        InvalidInputError: the path does not exist or is neither.
    """
    p = Path(path).expanduser()
    if p.is_dir() and NnunetRawSource.looks_like(p):
        return NnunetRawSource(p)
    if p.is_dir():
        return DirSource(p)
    if p.is_file():
        if zipfile.is_zipfile(p):
            return ZipSource(p)
        raise InvalidInputError(
            "Not a zip archive.", path=str(p), hint="Give a folder or the dataset's .zip file."
        )
    raise InvalidInputError(
        "The source does not exist.",
        path=str(p),
        hint="Use --source zenodo, phantom, or the path of an extracted folder or zip.",
    )


def write_case(
    root: str | os.PathLike[str],
    case: str,
    ct: sitk.Image,
    masks: Mapping[str, np.ndarray | sitk.Image],
) -> Path:
    """Write one case in the TotalSegmentator layout (atomically per file).

    Used for synthetic data sets (tests, benchmarks, examples).

    Args:
        root: Dataset folder (the one holding meta.csv).
        case: Case id (``s0000``).
        ct: The CT image.
        masks: Structure name -> mask, as a (z, y, x) array on the CT's grid
            (written as uint8 unless it is a floating-point array) or an image
            written as it is.

    Returns:
        The case folder.
    """
    folder = Path(root) / case
    nifti.write_image(ct, folder / CT_NAME)
    for name, mask in masks.items():
        target = folder / mask_relpath(name)
        if isinstance(mask, sitk.Image):
            nifti.write_image(mask, target)
        else:
            arr = np.asarray(mask)
            dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.uint8
            nifti.write_array(arr, ct, target, dtype)
    return folder


def write_meta(root: str | os.PathLike[str], rows: list[dict[str, str]]) -> Path:
    """Write ``meta.csv`` in the dataset's format (BOM, ``;``, 11 columns)."""
    from mobseg.data.meta import format_meta

    return atomic_write_bytes(Path(root) / META_NAME, format_meta(rows))
