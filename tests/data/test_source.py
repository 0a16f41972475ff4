"""Folder and zip access to the TotalSegmentator layout."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mobseg.data.source import (
    DirSource,
    ZipSource,
    ct_relpath,
    is_unsafe_member,
    mask_relpath,
    open_source,
    write_case,
    write_meta,
)
from mobseg.errors import InvalidInputError


def tiny_case(root: Path, case: str) -> None:
    ct = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[1, 1, 1] = 1
    write_case(root, case, ct, {"pancreas": mask})


@pytest.fixture
def nested(tmp_path: Path) -> Path:
    root = tmp_path / "download" / "Totalsegmentator_dataset_v201"
    for case in ("s0000", "s0001"):
        tiny_case(root, case)
    write_meta(
        root, [{"image_id": "s0000", "split": "train"}, {"image_id": "s0001", "split": "test"}]
    )
    return tmp_path / "download"


def test_dir_source_finds_meta_csv_below_the_given_folder(nested: Path, tmp_path: Path) -> None:
    src = open_source(nested)
    assert isinstance(src, DirSource) and src.root.name == "Totalsegmentator_dataset_v201"
    assert src.meta_bytes().startswith("\ufeff".encode())
    assert src.case_folders() == {"s0000", "s0001"}
    assert src.exists("s0000", ct_relpath()) and src.exists("s0000", mask_relpath("pancreas"))
    assert not src.exists("s0000", mask_relpath("liver"))
    with src.local_file("s0001", ct_relpath(), tmp_path / "tmp") as p:
        assert p == src.root / "s0001" / "ct.nii.gz"
    assert not (tmp_path / "tmp").exists()  # folders are read in place
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="No meta.csv"):
        open_source(empty)


def test_zip_source_locates_meta_and_copies_members_out_temporarily(
    nested: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "ts.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(nested.rglob("*")):
            if p.is_file():
                zf.write(p, "outer/" + p.relative_to(nested).as_posix())
    src = open_source(archive)
    assert isinstance(src, ZipSource)
    assert src.prefix == "outer/Totalsegmentator_dataset_v201/"
    assert src.case_folders() == {"s0000", "s0001"}
    assert src.location("s0000", ct_relpath()).endswith(
        "ts.zip!outer/Totalsegmentator_dataset_v201/s0000/ct.nii.gz"
    )
    original = (nested / "Totalsegmentator_dataset_v201" / "s0000" / "ct.nii.gz").read_bytes()
    tmp = tmp_path / "work" / "tmp"
    with src.local_file("s0000", ct_relpath(), tmp) as p:
        assert p.parent == tmp and p.read_bytes() == original
    assert list(tmp.iterdir()) == []  # removed after use
    with pytest.raises(InvalidInputError, match="no such member"):
        with src.local_file("s0009", ct_relpath(), tmp):
            pass
    src.close()


def test_unsafe_entries_are_refused(tmp_path: Path) -> None:
    for name in ("/abs/x", "\\\\server\\x", "C:/x", "a/../../b", "../b", "a\\..\\b"):
        assert is_unsafe_member(name), name
    for name in ("a/b..c/d", "s0000/ct.nii.gz", "..hidden/x"):
        assert not is_unsafe_member(name), name
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("meta.csv", "\ufeffimage_id;split\ns0000;train\n")
        zf.writestr("../s0000/ct.nii.gz", b"x")
        zf.writestr("s0000/../../ct.nii.gz", b"x")
    src = ZipSource(archive)
    assert sorted(src.refused) == ["../s0000/ct.nii.gz", "s0000/../../ct.nii.gz"]
    assert not src.exists("s0000", ct_relpath())


def test_bad_sources(tmp_path: Path) -> None:
    not_zip = tmp_path / "x.zip"
    not_zip.write_bytes(b"nope")
    with pytest.raises(InvalidInputError, match="Not a zip archive"):
        open_source(not_zip)
    archive = tmp_path / "nometa.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("s0000/ct.nii.gz", b"x")
    with pytest.raises(InvalidInputError, match="no meta.csv"):
        open_source(archive)
    with pytest.raises(InvalidInputError, match="does not exist"):
        open_source(tmp_path / "missing")
