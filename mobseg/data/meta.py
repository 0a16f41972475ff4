"""``meta.csv`` of the TotalSegmentator dataset: reading and validation.

The file is UTF-8 with a byte-order mark, ``;``-delimited, with the columns
``image_id;age;gender;institute;study_type;split;manufacturer;scanner_model;
kvp;pathology;pathology_location``. ``split`` is ``train``, ``val`` or
``test`` (the authors' official split, kept for reference only); free-text
fields such as ``study_type`` come with mixed case and trailing spaces and are
stripped here.

Only ``image_id`` and ``split`` are required. A file that cannot be parsed at
all (empty, no header, missing ``image_id``) raises
:class:`~mobseg.errors.InvalidInputError`; problems of single rows (wrong
number of fields, an unusable id, a duplicate id) are returned as
:class:`MetaProblem` so the caller can skip or fail per ``--on-error``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field

from mobseg.errors import InvalidInputError

log = logging.getLogger(__name__)

#: Columns of the v2.0.1 meta.csv, in order.
META_COLUMNS: tuple[str, ...] = (
    "image_id",
    "age",
    "gender",
    "institute",
    "study_type",
    "split",
    "manufacturer",
    "scanner_model",
    "kvp",
    "pathology",
    "pathology_location",
)
OFFICIAL_SPLITS: tuple[str, ...] = ("train", "val", "test")

#: A case id must be one safe path component (no separators, no "..").
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class MetaRow:
    """One case of meta.csv.

    Attributes:
        image_id: The case id, e.g. ``s0000`` (its folder name).
        split: The official split, lower case (``train``, ``val``, ``test``,
            or whatever the file says, stripped).
        fields: Every column of the row, stripped (column name -> value).
        line: Line number in the file (1 = header).
    """

    image_id: str
    split: str
    fields: dict[str, str] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class MetaProblem:
    """A row that cannot be used.

    Attributes:
        image_id: The case id when one could be read, else None.
        reason: Short reason code (``malformed_meta_row``, ``duplicate_id``).
        message: What is wrong, naming the line.
    """

    image_id: str | None
    reason: str
    message: str


def is_safe_id(case: str) -> bool:
    """True when ``case`` is usable as a single folder name."""
    return bool(_ID_RE.match(case)) and ".." not in case


def parse_meta(data: bytes, where: str) -> tuple[list[MetaRow], list[MetaProblem]]:
    """Parse the bytes of meta.csv.

    Args:
        data: The file's content.
        where: The file's location, for messages (a path or ``zip!entry``).

    Returns:
        The usable rows in file order, and the problems of the unusable ones.
        An id listed several times with identical rows is kept once (with a
        warning); when its rows disagree every one is unusable (which one is
        right cannot be told) and the id is reported once.

    Raises:
        InvalidInputError: empty file, undecodable bytes, no ``image_id`` or
            ``split`` column, or no data row at all.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"meta.csv is not UTF-8 text ({exc.reason} at byte {exc.start}).", path=where
        ) from exc
    if not text.strip():
        raise InvalidInputError(
            "meta.csv is empty.", path=where, hint="Use the dataset's original meta.csv."
        )
    lines = text.splitlines()
    delimiter = ";" if lines[0].count(";") >= lines[0].count(",") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except (StopIteration, csv.Error) as exc:
        raise InvalidInputError(f"meta.csv has no readable header ({exc}).", path=where) from exc
    missing = [c for c in ("image_id", "split") if c not in header]
    if missing:
        raise InvalidInputError(
            f"meta.csv is malformed: the header lacks the column(s) {', '.join(missing)} "
            f"(found: {';'.join(header) or 'nothing'}).",
            path=where,
            hint="Expected the ';'-separated columns " + ";".join(META_COLUMNS) + ".",
        )
    rows: list[MetaRow] = []
    problems: list[MetaProblem] = []
    try:
        records = list(reader)
    except csv.Error as exc:
        raise InvalidInputError(f"meta.csv is malformed ({exc}).", path=where) from exc
    for offset, values in enumerate(records):
        line = offset + 2
        if not values or all(not v.strip() for v in values):
            continue
        id_col = header.index("image_id")
        first = values[id_col].strip() if len(values) > id_col else ""
        if len(values) != len(header):
            problems.append(
                MetaProblem(
                    first if is_safe_id(first) else None,
                    "malformed_meta_row",
                    f"meta.csv line {line} has {len(values)} fields, the header has {len(header)}.",
                )
            )
            continue
        fields = {h: v.strip() for h, v in zip(header, values, strict=True)}
        case = fields["image_id"]
        if not is_safe_id(case):
            problems.append(
                MetaProblem(
                    None,
                    "malformed_meta_row",
                    f"meta.csv line {line} has an unusable image_id {case!r} "
                    "(expected a folder name such as s0000).",
                )
            )
            continue
        rows.append(MetaRow(case, fields["split"].lower(), fields, line))
    if not rows and not problems:
        raise InvalidInputError("meta.csv has a header but no cases.", path=where)
    counts: dict[str, list[int]] = {}
    same: dict[str, bool] = {}
    first_fields: dict[str, dict[str, str]] = {}
    for row in rows:
        counts.setdefault(row.image_id, []).append(row.line)
        first = first_fields.setdefault(row.image_id, row.fields)
        same[row.image_id] = same.get(row.image_id, True) and row.fields == first
    unique: list[MetaRow] = []
    reported: set[str] = set()
    for row in rows:
        lines_of = counts[row.image_id]
        if len(lines_of) > 1:
            if row.image_id in reported:
                continue
            reported.add(row.image_id)
            if same[row.image_id]:
                log.warning(
                    "%s lists %s %d times with identical rows (lines %s); it is kept once.",
                    where,
                    row.image_id,
                    len(lines_of),
                    ", ".join(map(str, lines_of)),
                )
                unique.append(row)
                continue
            problems.append(
                MetaProblem(
                    row.image_id,
                    "duplicate_id",
                    f"meta.csv lists {row.image_id} {len(lines_of)} times (lines "
                    f"{', '.join(map(str, lines_of))}) with different rows, so the case "
                    "is left out.",
                )
            )
        else:
            unique.append(row)
    return unique, problems


def format_meta(rows: list[dict[str, str]]) -> bytes:
    """meta.csv bytes in the dataset's own format (BOM, ``;``, the 11 columns).

    Args:
        rows: One dict per case (missing columns are written empty).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=";", lineterminator="\n")
    writer.writerow(META_COLUMNS)
    for row in rows:
        writer.writerow([row.get(c, "") for c in META_COLUMNS])
    return buf.getvalue().encode("utf-8-sig")
