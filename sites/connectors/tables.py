"""Reading a table file (CSV/TSV or Parquet) into rows, with problems that name where.

Rows are numbered as a person sees them: a CSV row by the line where its record ends
(the header is line 1), a Parquet row by its position with the header as row 1 too,
so "row 2" is the first patient in both.
"""

from __future__ import annotations

import _csv
import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medfed.sites.errors import DataProblem

Row = dict[str, object]


class TableError(Exception):
    """The whole file cannot be read as a table; carries the one problem that says why."""

    def __init__(self, problem: DataProblem) -> None:
        self.problem = problem
        super().__init__(str(problem))


@dataclass(frozen=True)
class Table:
    """A table's header and its rows with their row numbers; `problems` are rows that
    could not be read (bad CSV syntax, too many fields)."""

    file: str
    header: tuple[str, ...]
    rows: tuple[tuple[int, Row], ...]
    problems: tuple[DataProblem, ...]


def read_table(
    path: Path,
    *,
    delimiter: str | None = None,
    encoding: str = "utf-8",
    required: tuple[str, ...] = (),
) -> Table:
    """Read `path` by its suffix (`.parquet` or text); raise `TableError` if it cannot be
    read at all or lacks a `required` column."""
    if path.suffix.lower() in (".parquet", ".pq"):
        table = _read_parquet(path)
    else:
        table = _read_text(path, delimiter or _default_delimiter(path), encoding)
    missing = [column for column in required if column not in table.header]
    if missing:
        hint = _delimiter_hint(table.header, delimiter or _default_delimiter(path))
        raise TableError(
            DataProblem(
                table.file,
                1,
                missing[0],
                f"column is missing{hint}"
                + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""),
            )
        )
    return table


def read_bytes(path: Path) -> bytes:
    """The file's bytes; `TableError` if it is missing or unreadable."""
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TableError(DataProblem(str(path), None, None, f"cannot be read ({reason})")) from exc


def dataset_texts(
    paths: Iterable[Path], base: Path, encoding: str, problems: list[DataProblem]
) -> Iterator[tuple[Path, str]]:
    """Each file of a dataset (relative paths taken from `base`) as decoded text; a file
    that cannot be read or decoded is a problem in `problems` and is skipped."""
    for relative in paths:
        path = relative if relative.is_absolute() else base / relative
        try:
            yield path, decode(path, read_bytes(path), encoding)
        except TableError as exc:
            problems.append(exc.problem)


def decode(path: Path, raw: bytes, encoding: str) -> str:
    """`raw` as text in `encoding` (a UTF-8 BOM dropped); `TableError` names the byte."""
    try:
        return raw.decode(
            "utf-8-sig" if encoding.lower().replace("_", "-") == "utf-8" else encoding
        )
    except LookupError as exc:
        raise TableError(
            DataProblem(str(path), None, None, f"encoding {encoding!r} is unknown")
        ) from exc
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TableError(
            DataProblem(
                str(path),
                line,
                None,
                f"is not {encoding} text (byte {exc.start}); set the dataset's encoding",
            )
        ) from exc


def _default_delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _delimiter_hint(header: tuple[str, ...], delimiter: str) -> str:
    if len(header) == 1:
        for other in (";", "\t", ",", "|"):
            if other != delimiter and other in header[0]:
                return f" (the header looks {other!r}-separated; set the dataset's delimiter)"
    return ""


def _read_text(path: Path, delimiter: str, encoding: str) -> Table:
    name = str(path)
    text = decode(path, read_bytes(path), encoding)
    if "\x00" in text:
        raise TableError(DataProblem(name, None, None, "holds NUL bytes: not a text table"))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = tuple(cell.strip() for cell in next(reader, []))
    except csv.Error as exc:
        raise TableError(DataProblem(name, 1, None, f"header is not valid CSV ({exc})")) from exc
    if not header or not any(header):
        raise TableError(DataProblem(name, None, None, "is empty: no header row"))
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise TableError(DataProblem(name, 1, repeated[0], "column name repeats in the header"))
    rows: list[tuple[int, Row]] = []
    problems: list[DataProblem] = []
    for line, cells in _records(reader, name, problems):
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            problems.append(DataProblem(name, line, None, "has more fields than the header"))
            continue
        rows.append((line, dict(zip(header, cells, strict=False))))
    return Table(name, header, tuple(rows), tuple(problems))


def _records(
    reader: _csv.Reader, name: str, problems: list[DataProblem]
) -> Iterator[tuple[int, list[str]]]:
    """Each record with its line number; bad CSV syntax becomes a problem and ends reading."""
    while True:
        starts_at = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            problems.append(DataProblem(name, starts_at, None, f"is not valid CSV ({exc})"))
            return
        yield reader.line_num, cells


def _read_parquet(path: Path) -> Table:
    name = str(path)
    read_bytes(path)  # a missing or unreadable file reads as such, not as a pyarrow error
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TableError(
            DataProblem(name, None, None, f"is not a readable Parquet file ({exc})")
        ) from exc
    header = tuple(table.column_names)
    rows = tuple((index + 2, row) for index, row in enumerate(table.to_pylist()))
    return Table(name, header, rows, ())
