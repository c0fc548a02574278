"""Read the rows of a data file, whatever container it comes in; never lose a valid row.

Containers (`detect_container`):
- `jsonl`: `.jsonl` / `.ndjson`, and a `.json` file that is one JSON value per line. Read in
  binary, one line at a time (a 50 MB line is fine, a 1 GB file is never loaded whole). A UTF-8
  BOM at the start of a line is dropped, CRLF is accepted, blank lines are skipped. A line that
  is not UTF-8, not JSON, or nested too deeply becomes an error `Row`; the other lines still read.
- `json`: a `.json` file whose first non-space character is `[` (a JSON array: one row per
  element) or whose first line is a lone `{` (pretty-printed JSON: one row per top-level value).
  Read in 1 MiB chunks, one value at a time; if it is not valid JSON, `TunewiseError` says where
  (the rows before the error were already yielded: the caller rejects the file as a whole).
- `csv`: `.csv`, and `.tsv` (tab-separated). The first non-blank record is the header (names
  stripped of spaces). Cells stay text, empty cells stay "" (`Row.text_cells` is set: the format
  decides which columns hold JSON, see `formats`). Rows whose cells are all blank are skipped
  like blank lines. Quoting is strict: a quote that is never closed, or text after a closing
  quote, makes the record an error row at the line where it starts, and the lines it swallowed
  are read again as records of their own, so an open quote never merges rows. A record that
  spans several lines (a quoted cell with line breaks) is kept when it has the header's cells.
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

import codecs
import csv
import io
import json
import re
from collections import deque
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
CHUNK_BYTES = 1 << 20
MAX_VALUE_CHARS = 1 << 26  # 64 Mi characters: past this a JSON value is a bracket left open
MAX_CELL_CHARS = 1 << 25  # 32 Mi characters: past this a cell is an open quote, not an example
_SPACE = re.compile(r"[ \t\r\n]*")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a non-UTF-8 byte


@dataclass(frozen=True)
class Row:
    """One record of the file: its parsed value, or None and why it could not be read."""

    line: int
    value: object | None
    error: str | None
    text_cells: bool = False  # every value is the text of a CSV cell (nothing decoded)


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
    """Rows of a JSON array (one per element) or of top-level JSON values, streamed: memory holds
    one chunk and the value being read, whatever the file's size."""
    with _open_binary(path) as handle:
        yield from _json_values(_TextWindow(handle, path))


class _TextWindow:
    """The UTF-8 text of a binary file, read in chunks. `text` is what was read and not yet
    dropped; positions are relative to it, and `base_line` counts the lines dropped before it."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self._handle, self._path = handle, path
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._bytes = 0  # bytes read, after the BOM
        self._first = True
        self.text, self.base_line, self.eof = "", 0, False

    def more(self, at_least: int = 0) -> bool:
        """Read the next chunk into `text`; False at the end of the file."""
        if self.eof:
            return False
        data = self._handle.read(max(at_least, CHUNK_BYTES))
        if self._first:
            data, self._first = data.removeprefix(BOM), False
        pending = len(self._decoder.getstate()[0])
        try:
            piece = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            at = self._bytes - pending + err.start
            line = self.base_line + self.text.count("\n") + data.count(b"\n", 0, max(err.start - pending, 0)) + 1
            raise TunewiseError(f"not UTF-8 text at byte {at + 1}", file=self._path, line=line,
                                fix="save the file as UTF-8") from err
        self._bytes += len(data)
        self.text += piece
        self.eof = not data
        return True

    def drop(self, pos: int) -> None:
        """Forget the text before `pos` (positions shift by `pos`)."""
        self.base_line += self.text.count("\n", 0, pos)
        self.text = self.text[pos:]

    def skip_space(self, pos: int) -> int:
        """The first non-space position from `pos`, reading on as needed (len(text) at the end)."""
        while True:
            match = _SPACE.match(self.text, pos)
            pos = match.end() if match else pos
            if pos < len(self.text) or not self.more():
                return pos

    def decode(self, decoder: json.JSONDecoder, pos: int) -> tuple[object, int]:
        """The JSON value at `pos` and where it ends, reading on while it may continue."""
        while True:
            if len(self.text) - pos > MAX_VALUE_CHARS:
                raise self.error(f"a JSON value runs past {MAX_VALUE_CHARS:,} characters (is a quote or a "
                                 "bracket left open?)", pos)
            try:
                value, end = decoder.raw_decode(self.text, pos)
            except json.JSONDecodeError as err:
                cut = err.msg.startswith("Unterminated string") or err.pos >= len(self.text) - 32
                if cut and self.more(len(self.text) - pos):
                    continue
                raise self.error(f"not valid JSON: {err.msg}", err.pos) from err
            except RecursionError as err:
                raise TunewiseError("JSON nested too deeply", file=self._path, line=self.line(pos)) from err
            except ValueError as err:
                raise self.error(f"not valid JSON: {err}", pos) from err
            if end >= len(self.text) - 32 and self.more():  # a number at the chunk's end may go on ("1." + "5")
                continue
            return value, end

    def line(self, pos: int) -> int:
        return self.base_line + self.text.count("\n", 0, pos) + 1

    def error(self, message: str, pos: int) -> TunewiseError:
        column = pos - self.text.rfind("\n", 0, pos)
        truncated = " (the file ends early: it looks truncated)" if pos >= len(self.text) and self.eof else ""
        return TunewiseError(f"{message} (column {column}){truncated}", file=self._path, line=self.line(pos),
                             fix="a .json file must be one JSON array of objects; or use .jsonl, one object per line")


def _json_values(window: _TextWindow) -> Iterator[Row]:
    """Scan the file as one array (rows = its elements) or as whitespace-separated values."""
    decoder = json.JSONDecoder()
    pos = window.skip_space(0)
    in_array = window.text.startswith("[", pos)
    if in_array:
        pos = window.skip_space(pos + 1)
        if window.text.startswith("]", pos):
            _expect_end(window, pos + 1)
            return
    while pos < len(window.text):
        if pos >= CHUNK_BYTES:  # keep the window small: drop what was read
            window.drop(pos)
            pos = 0
        line = window.line(pos)
        value, end = window.decode(decoder, pos)
        yield Row(line, value, None)
        pos = window.skip_space(end)
        if not in_array:
            continue
        if window.text.startswith(",", pos):
            pos = window.skip_space(pos + 1)
        elif window.text.startswith("]", pos):
            _expect_end(window, pos + 1)
            return
        else:
            raise window.error("not valid JSON: Expecting ',' delimiter" if pos < len(window.text)
                               else "not valid JSON: the array is never closed", pos)
    if in_array:
        raise window.error("not valid JSON: the array is never closed", pos)


def _expect_end(window: _TextWindow, pos: int) -> None:
    pos = window.skip_space(pos)
    if pos < len(window.text):
        raise window.error("not valid JSON: Extra data after the array", pos)


# --- CSV / TSV --------------------------------------------------------------------------------

def _csv_rows(path: Path, delimiter: str) -> Iterator[Row]:
    """Rows of a CSV/TSV file, keyed by the header; a non-UTF-8, ragged or badly quoted record is an error row."""
    with _open_binary(path) as binary, _csv_field_limit(MAX_CELL_CHARS):
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        feed = _LineFeed(text)
        reader = csv.reader(feed, delimiter=delimiter, strict=True)
        header: list[str] | None = None
        while True:
            feed.start_record()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                if not feed.taken:
                    return
                if header is None:  # no header to read the rows by: the file as a whole is unusable
                    raise TunewiseError(f"the header row cannot be read: {_quote_problem(str(err), feed.taken)}",
                                        file=path, line=feed.taken[0][0]) from err
                yield Row(feed.taken[0][0], None, _quote_problem(str(err), feed.taken))
                feed.push_back(feed.taken[1:])  # what the bad record swallowed is read again
                continue
            start, end = feed.taken[0][0], feed.taken[-1][0]
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = _csv_header(cells, path, start)
                continue
            if end > start and len(cells) != len(header):
                yield Row(start, None, f"quote never closed: lines {start}-{end} read as one record of {len(cells)} "
                                       f"cells, the header has {len(header)}; close the quote (a quote inside a "
                                       'quoted cell is written "")')
                feed.push_back(feed.taken[1:])
                continue
            yield _csv_row(start, header, cells)


class _LineFeed:
    """The physical lines of a text file for `csv.reader`, with their numbers; the lines of the
    record being read are kept in `taken`, and lines can be pushed back to be read again."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = iter(lines)
        self._back: deque[tuple[int, str]] = deque()
        self._number = 0
        self.taken: list[tuple[int, str]] = []

    def __iter__(self) -> "_LineFeed":
        return self

    def __next__(self) -> str:
        if self._back:
            item = self._back.popleft()
        else:
            item = (self._number + 1, next(self._lines))
            self._number += 1
        self.taken.append(item)
        return item[1]

    def start_record(self) -> None:
        self.taken = []

    def push_back(self, items: list[tuple[int, str]]) -> None:
        self._back.extendleft(reversed(items))


def _quote_problem(error: str, taken: list[tuple[int, str]]) -> str:
    """The reason for a record that `csv` rejected in strict mode (`taken`: its lines)."""
    start, end = taken[0][0], taken[-1][0]
    fix = 'close the quote (a quote inside a quoted cell is written "")'
    if error == "unexpected end of data":
        return (f"quote never closed: the quote in the record starting on line {start} runs to the end of the "
                f"file; {fix}")
    if "expected after" in error:
        where = f"on line {start}" if end == start else f"from line {start} to line {end}"
        return f"quote never closed where its cell ends: text follows a closing quote {where}; {fix}"
    if "field larger than field limit" in error:
        return (f"a cell from line {start} runs past {MAX_CELL_CHARS:,} characters (to line {end}): "
                f"is a quote left open? {fix}")
    return f"not valid CSV ({error})"


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Set the csv module's cell limit (128 KiB by default; a long `messages` cell is normal) while reading."""
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


def _csv_row(start: int, header: list[str], cells: list[str]) -> Row:
    if len(cells) != len(header):
        return Row(start, None, f"expected {len(header)} cells like the header, got {len(cells)}")
    for name, cell in zip(header, cells):
        if _ESCAPED_BYTE.search(cell):
            return Row(start, None, f"column '{name}' is not UTF-8 text; save the file as UTF-8")
    return Row(start, dict(zip(header, cells)), None, text_cells=True)


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
