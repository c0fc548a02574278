"""Read the rows of a data file, whatever container it comes in; never lose a valid row.

Containers (`detect_container`):
- `jsonl`: `.jsonl` / `.ndjson`, and a `.json` file that is one JSON value per line. Read in
  binary, one line at a time (a 50 MB line is fine, a 1 GB file is never loaded whole). A UTF-8
  BOM at the start of a line is dropped, CRLF is accepted, blank lines are skipped. A line that
  is not UTF-8, not JSON, or nested too deeply becomes an error `Row`; the other lines still read.
- `json`: a `.json` file whose first non-space character is `[` (a JSON array: one row per
  element) or whose first line is a lone `{` (pretty-printed JSON: one row per top-level value).
  The file is parsed whole; if it is not valid JSON, `TunewiseError` says where.
- `csv`: `.csv`, and `.tsv` (tab-separated). The first non-blank record is the header (names
  stripped of spaces). Cells stay strings, empty cells stay "", except that a cell whose
  stripped text starts with `[` or `{` and parses as JSON is decoded (a `messages` column
  written with `json.dumps`). Rows whose cells are all blank are skipped like blank lines.
- `parquet`: read with pyarrow in record batches; lists and structs become lists and dicts.
- `datasets`: a folder written by `datasets` `save_to_disk` (it holds `dataset_info.json`,
  `state.json`, or `dataset_dict.json`). For a `DatasetDict` the "train" split is read if there
  is one, else the first split.

`Row.line` is 1-based: the physical line where the record starts (JSONL, JSON, CSV) or the row
index + 1 (Parquet, datasets). A value that is not an object is returned as is; the caller
decides. Whole-file problems (missing, unreadable, unsupported, not valid JSON as a whole) raise
`TunewiseError`; an empty file yields no rows.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tunewise.errors import TunewiseError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet"}
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
SUPPORTED = ("use .jsonl/.ndjson (one JSON object per line), .json (a JSON array of objects), "
             ".csv/.tsv (a header row), .parquet, or a folder written by datasets' save_to_disk")
BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
JSON_SPACE = " \t\r\n"
BATCH_ROWS = 1024
_SPACE = re.compile(r"[ \t\r\n]*")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a non-UTF-8 byte


@dataclass(frozen=True)
class Row:
    """One record of the file: its parsed value, or None and why it could not be read."""

    line: int
    value: object | None
    error: str | None


def detect_container(path: Path) -> str:
    """The container of `path`: "jsonl" | "json" | "csv" | "parquet" | "datasets"."""
    path = Path(path)
    if not path.exists():
        raise TunewiseError("data file not found", file=path,
                            fix="check the path (a relative path starts from the current folder)")
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASETS_MARKERS):
            return "datasets"
        raise TunewiseError(
            "this is a folder, not a data file or a saved dataset (it has no " + ", ".join(DATASETS_MARKERS) + ")",
            file=path, fix=SUPPORTED)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise TunewiseError(f"unsupported data file type '{path.suffix or '(no extension)'}'", file=path, fix=SUPPORTED)
    if kind == "json" and not _looks_like_json_document(path):
        return "jsonl"
    return kind


def iter_rows(path: Path) -> Iterator[Row]:
    """Every record of the file in order, as a `Row` (see the module docstring)."""
    path = Path(path)
    kind = detect_container(path)
    if kind == "jsonl":
        yield from _jsonl_rows(path)
    elif kind == "json":
        yield from _json_rows(path)
    elif kind == "csv":
        yield from _csv_rows(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    elif kind == "parquet":
        yield from _parquet_rows(path)
    else:
        yield from _datasets_rows(path)


# --- JSON Lines -------------------------------------------------------------------------------

@contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    """The file opened for reading in binary; a UTF-16 file or an OS error is a TunewiseError."""
    try:
        handle = path.open("rb")
    except OSError as err:
        raise TunewiseError(f"cannot read the data file ({err.strerror or err})", file=path) from err
    with handle:
        if handle.peek(2)[:2] in UTF16_BOMS:
            raise TunewiseError("the file is UTF-16 text", file=path, fix="save the file as UTF-8")
        yield handle


def _looks_like_json_document(path: Path) -> bool:
    """True when a `.json` file starts with `[`, or with a line that is a lone `{` (pretty-printed)."""
    with _open_binary(path) as handle:
        line = handle.readline(4096)
        while line and not line.strip():
            line = handle.readline(4096)
    line = line.removeprefix(BOM).strip()
    return line.startswith(b"[") or line == b"{"


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            row = _jsonl_row(number, raw)
            if row is not None:
                yield row


def _jsonl_row(number: int, raw: bytes) -> Row | None:
    """Parse one physical line (with its newline, if any); None for a blank line."""
    ended = raw.endswith(b"\n")
    body = raw.removeprefix(BOM).rstrip(b"\r\n")
    if not body.strip(JSON_SPACE.encode()):
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        at = err.start + 1 + (len(BOM) if raw.startswith(BOM) else 0)
        reason = f"not UTF-8 text at byte {at} of the line; save the file as UTF-8"
        if not ended and err.reason == "unexpected end of data":
            reason += " (the file ends mid-character: it looks truncated)"
        return Row(number, None, reason)
    try:
        return Row(number, json.loads(text), None)
    except json.JSONDecodeError as err:
        reason = f"not valid JSON: {err.msg} (column {err.colno})"
        if not ended:
            reason += "; it is the last line and has no newline at the end: the file looks truncated"
        return Row(number, None, reason)
    except RecursionError:
        return Row(number, None, "JSON nested too deeply")
    except ValueError as err:  # e.g. an integer over Python's 4300-digit limit
        return Row(number, None, f"not valid JSON ({err})")


# --- JSON array / pretty-printed JSON ---------------------------------------------------------

def _json_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON array (one per element) or of top-level JSON values; the file is parsed whole first."""
    with _open_binary(path) as handle:
        data = handle.read().removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TunewiseError(f"not UTF-8 text at byte {err.start + 1}", file=path,
                            line=data.count(b"\n", 0, err.start) + 1, fix="save the file as UTF-8") from err
    yield from _json_values(text, path)


def _json_values(text: str, path: Path) -> list[Row]:
    """Scan `text` as one array (rows = its elements) or as whitespace-separated values."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    in_array = text.startswith("[", pos)
    if in_array:
        pos = _skip_space(text, pos + 1)
        if text.startswith("]", pos):
            return _expect_end(text, _skip_space(text, pos + 1), path, [])
    rows: list[Row] = []
    line, counted = 1, 0
    while pos < len(text):
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(path, err.msg, text, err.pos) from err
        except RecursionError as err:
            raise TunewiseError("JSON nested too deeply", file=path, line=line) from err
        except ValueError as err:
            raise _json_error(path, str(err), text, pos) from err
        rows.append(Row(line, value, None))
        pos = _skip_space(text, end)
        if not in_array:
            continue
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            return _expect_end(text, _skip_space(text, pos + 1), path, rows)
        else:
            raise _json_error(path, "Expecting ',' delimiter" if pos < len(text) else "the array is never closed",
                              text, pos)
    if in_array:
        raise _json_error(path, "the array is never closed", text, pos)
    return rows


def _skip_space(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    return match.end() if match else pos


def _expect_end(text: str, pos: int, path: Path, rows: list[Row]) -> list[Row]:
    if pos < len(text):
        raise _json_error(path, "Extra data after the array", text, pos)
    return rows


def _json_error(path: Path, message: str, text: str, pos: int) -> TunewiseError:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    truncated = " (the file ends early: it looks truncated)" if pos >= len(text) else ""
    return TunewiseError(f"not valid JSON: {message} (column {column}){truncated}", file=path, line=line,
                         fix="a .json file must be one JSON array of objects; or use .jsonl, one object per line")


# --- CSV / TSV --------------------------------------------------------------------------------

def _csv_rows(path: Path, delimiter: str) -> Iterator[Row]:
    """Rows of a CSV/TSV file, keyed by the header; a non-UTF-8 or ragged record is an error row."""
    with _open_binary(path) as binary, _csv_field_limit(1 << 30):
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield Row(start, None, f"not valid CSV ({err})")
                continue
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = _csv_header(cells, path, start)
                continue
            yield _csv_row(start, reader.line_num, header, cells)


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Raise the csv module's 128 KiB cell limit (a long `messages` cell is normal) while reading."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv_header(cells: list[str], path: Path, line: int) -> list[str]:
    names = [cell.strip() for cell in cells]
    if any(_ESCAPED_BYTE.search(name) for name in names):
        raise TunewiseError("the header row is not UTF-8 text", file=path, line=line, fix="save the file as UTF-8")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise TunewiseError(f"the header repeats the column name '{repeated[0]}'", file=path, line=line,
                            fix="give every column a different name")
    return names


def _csv_row(start: int, end: int, header: list[str], cells: list[str]) -> Row:
    if len(cells) != len(header):
        reason = f"expected {len(header)} cells like the header, got {len(cells)}"
        if end > start:
            reason += f" (the record runs from line {start} to line {end}: is a quote left open?)"
        return Row(start, None, reason)
    for name, cell in zip(header, cells):
        if _ESCAPED_BYTE.search(cell):
            return Row(start, None, f"column '{name}' is not UTF-8 text; save the file as UTF-8")
    return Row(start, {name: decode_json_cell(cell) for name, cell in zip(header, cells)}, None)


def decode_json_cell(cell: str) -> object:
    """The JSON value of a cell whose stripped text starts with `[` or `{` and parses; else the cell."""
    stripped = cell.strip()
    if not stripped.startswith(("[", "{")):
        return cell
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        return cell


# --- Parquet / datasets folder ----------------------------------------------------------------

def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        return
    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=BATCH_ROWS)
        index = 0
        for batch in batches:
            for value in batch.to_pylist():
                index += 1
                yield Row(index, value, None)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise TunewiseError(f"cannot read the Parquet file ({err})", file=path) from err


def _datasets_rows(path: Path) -> Iterator[Row]:
    import datasets
    import pyarrow as pa

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, pa.ArrowException) as err:
        raise TunewiseError(f"cannot load the saved dataset ({err})", file=path) from err
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            return
        loaded = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    index = 0
    for table in loaded.with_format("arrow").iter(batch_size=BATCH_ROWS):
        for value in table.to_pylist():
            index += 1
            yield Row(index, value, None)
