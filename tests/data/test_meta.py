"""meta.csv parsing: the real format, and every malformation."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobseg.data.meta import META_COLUMNS, format_meta, parse_meta
from mobseg.errors import InvalidInputError

HEADER = ";".join(META_COLUMNS)


def meta(*rows: str) -> bytes:
    return ("\ufeff" + "\n".join([HEADER, *rows]) + "\n").encode("utf-8")


def test_the_real_format_with_bom_and_messy_fields() -> None:
    data = meta(
        "s0000;64;m;A;CT abdomen-pelvis  ;train;Siemens;X;120;;",
        "s0001;;f;B; ct THORAX ;Val ;;;;;",
        "s0002;;;;;test;;;;;",
    )
    rows, problems = parse_meta(data, "meta.csv")
    assert problems == []
    assert [r.image_id for r in rows] == ["s0000", "s0001", "s0002"]
    assert [r.split for r in rows] == ["train", "val", "test"]
    assert rows[0].fields["study_type"] == "CT abdomen-pelvis"
    assert rows[1].fields["study_type"] == "ct THORAX"
    assert rows[0].line == 2


def test_the_shared_example_reads(totalseg_example: Path) -> None:
    rows, problems = parse_meta((totalseg_example / "meta.csv").read_bytes(), "x")
    assert [(r.image_id, r.split) for r in rows] == [("s0000", "test")] and problems == []


def test_format_round_trip() -> None:
    data = format_meta([{"image_id": "s0005", "split": "val", "study_type": "phantom "}])
    assert data.startswith("\ufeff".encode())
    rows, _ = parse_meta(data, "m")
    assert rows[0].image_id == "s0005" and rows[0].split == "val"
    assert rows[0].fields["study_type"] == "phantom"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\xef\xbb\xbf\n\n", "empty"),
        ("\ufeffid;split\ns0;train\n".encode(), "lacks the column(s) image_id"),
        ("\ufeffimage_id;age\ns0;3\n".encode(), "lacks the column(s) split"),
        (("\ufeff" + HEADER + "\n").encode(), "no cases"),
        (b"\x80\x81\x82", "not UTF-8"),
    ],
)
def test_unusable_files_raise(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_meta(data, "/data/meta.csv")
    assert message in str(info.value) and "/data/meta.csv" in str(info.value)


def test_row_problems_are_reported_and_the_rest_kept() -> None:
    data = meta(
        "s0000;;;;;train;;;;;",
        "s0001;;;;;train;;;;;",
        "s0002;1;2",
        "../etc;;;;;train;;;;;",
        "s0001;;;;;test;;;;;",
        "s0003;;;;;val;;;;;",
        "s0001;;;;;test;;;;;",
    )
    rows, problems = parse_meta(data, "meta.csv")
    assert [r.image_id for r in rows] == ["s0000", "s0003"]
    by_reason = {(p.reason, p.image_id): p.message for p in problems}
    assert set(by_reason) == {
        ("malformed_meta_row", "s0002"),
        ("malformed_meta_row", None),
        ("duplicate_id", "s0001"),
    }
    assert "line 4 has 3 fields" in by_reason[("malformed_meta_row", "s0002")]
    assert "'../etc'" in by_reason[("malformed_meta_row", None)]
    assert "s0001 3 times (lines 3, 6, 8)" in by_reason[("duplicate_id", "s0001")]


def test_comma_delimited_file_is_accepted() -> None:
    rows, problems = parse_meta(b"image_id,split\ns0000,train\n", "m")
    assert [(r.image_id, r.split) for r in rows] == [("s0000", "train")] and not problems
