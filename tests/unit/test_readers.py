"""The readers: every container gives the same rows; a bad row is reported, never fatal, never lost."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunewise.data.formats import decode_text_cells
from tunewise.data.readers import Row, detect_container, iter_rows
from tunewise.errors import TunewiseError

ROWS = [
    {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}], "id": "a"},
    {"messages": [{"role": "user", "content": "Q2, with \"quotes\"\nand a newline"},
                  {"role": "assistant", "content": "A2"}], "id": "b\nsecond line"},
    {"messages": [{"role": "user", "content": "Q3 \u2028 café"}, {"role": "assistant", "content": ""}], "id": ""},
]


def rows_of(path: Path) -> list[Row]:
    return list(iter_rows(path))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_containers(folder: Path) -> dict[str, Path]:
    """ROWS in every container tunewise reads."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": folder / "d.jsonl", "json": folder / "d.json", "csv": folder / "d.csv",
             "parquet": folder / "d.parquet", "datasets": folder / "saved"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    paths["json"].write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["messages", "id"])
        writer.writeheader()
        writer.writerows({"messages": json.dumps(r["messages"], ensure_ascii=False), "id": r["id"]} for r in ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"], row_group_size=2)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(paths["datasets"]))
    return paths


def test_every_container_gives_the_same_rows(tmp_path):
    paths = write_containers(tmp_path)
    expected_lines = {"jsonl": [1, 2, 3], "json": [2, 15, 28], "csv": [2, 3, 5], "parquet": [1, 2, 3],
                      "datasets": [1, 2, 3]}
    for kind, path in paths.items():
        assert detect_container(path) == kind
        rows = rows_of(path)
        # CSV cells are text; the format decodes the chat column (formats.decode_text_cells)
        assert [decode_text_cells(r.value) if r.text_cells else r.value for r in rows] == ROWS, kind
        assert all(r.error is None for r in rows)
        assert [r.line for r in rows] == expected_lines[kind], kind


def test_json_array_lines_are_where_each_element_starts(tmp_path):
    path = write(tmp_path / "a.json", b'\n[ {"a": 1},\n\n  {"a": 2}, 3,\n "x"\n]\n')
    assert [(r.line, r.value) for r in rows_of(path)] == [(2, {"a": 1}), (4, {"a": 2}), (4, 3), (5, "x")]


def test_a_dataset_dict_reads_its_train_split(tmp_path):
    import datasets

    train, test = datasets.Dataset.from_list(ROWS[:1]), datasets.Dataset.from_list(ROWS[1:])
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(str(tmp_path / "dd"))
    datasets.DatasetDict({"validation": test}).save_to_disk(str(tmp_path / "val"))
    assert [r.value for r in rows_of(tmp_path / "dd")] == ROWS[:1]
    assert [r.value for r in rows_of(tmp_path / "val")] == ROWS[1:]


def test_bom_and_crlf(tmp_path):
    path = write(tmp_path / "d.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
    assert rows_of(path) == [Row(1, {"a": 1}, None), Row(2, {"a": 2}, None)]
    path = write(tmp_path / "d.csv", b"\xef\xbb\xbfa,b\r\n1,\r\n")
    assert rows_of(path) == [Row(2, {"a": "1", "b": ""}, None, text_cells=True)]


def test_invalid_utf8_on_one_line_spares_the_others(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"a": 1}\n{"a": "\xff\xfe"}\n{"a": 3}\n')
    rows = rows_of(path)
    assert [r.value for r in rows] == [{"a": 1}, None, {"a": 3}]
    assert rows[1].line == 2 and rows[1].error.startswith("not UTF-8 text at byte 8")
    path = write(tmp_path / "d.csv", b'a\n1\n\xff\n3\n')
    assert [(r.line, r.value) for r in rows_of(path)] == [(2, {"a": "1"}), (3, None), (4, {"a": "3"})]


def test_truncated_last_line(tmp_path):
    rows = rows_of(write(tmp_path / "d.jsonl", b'{"a": 1}\n{"a": "hel'))
    assert rows[0].value == {"a": 1}
    assert rows[1].line == 2 and rows[1].value is None and "truncated" in rows[1].error
    with pytest.raises(TunewiseError, match="truncated"):
        rows_of(write(tmp_path / "d.json", b'[{"a": 1}, {"a": 2'))


def test_a_50_mb_line_parses(tmp_path):
    big = "x" * (50 * 1024 * 1024)
    path = tmp_path / "big.jsonl"
    path.write_text('{"a": 1}\n' + json.dumps({"text": big}) + "\n", encoding="utf-8")
    rows = rows_of(path)
    assert rows[1].line == 2 and rows[1].error is None and rows[1].value["text"] == big


def test_deep_nesting_is_an_error_row(tmp_path):
    path = write(tmp_path / "d.jsonl", b"[" * 100_000 + b'\n{"a": 1}\n')
    assert rows_of(path) == [Row(1, None, "JSON nested too deeply"), Row(2, {"a": 1}, None)]
    with pytest.raises(TunewiseError, match="nested too deeply"):
        rows_of(write(tmp_path / "d.json", b"[" * 100_000))
    assert rows_of(write(tmp_path / "d.csv", b"a\n" + b"[" * 100_000 + b"\n"))[0].value == {"a": "[" * 100_000}


def test_non_objects_blank_lines_and_odd_values(tmp_path):
    path = write(tmp_path / "d.jsonl", b'\n[1, 2]\n  \n"s"\n\t\r\n3\nnull\n' + b"1" * 5000 + b"\n")
    rows = rows_of(path)
    assert [(r.line, r.value) for r in rows[:4]] == [(2, [1, 2]), (4, "s"), (6, 3), (7, None)]
    assert rows[3].error is None
    assert rows[4].line == 8 and rows[4].value is None and "not valid JSON" in rows[4].error


def test_empty_files_yield_nothing(tmp_path):
    for name, data in [("a.jsonl", b""), ("b.jsonl", b" \n\r\n\n"), ("c.json", b"  \n"), ("d.json", b"[ ]"),
                       ("e.csv", b""), ("f.csv", b"a,b\n\n"), ("g.parquet", b"")]:
        assert rows_of(write(tmp_path / name, data)) == [], name


def test_whole_file_problems_raise(tmp_path):
    with pytest.raises(TunewiseError, match="not found"):
        rows_of(tmp_path / "missing.jsonl")
    with pytest.raises(TunewiseError, match="unsupported data file type '.txt'"):
        rows_of(write(tmp_path / "d.txt", b'{"a": 1}\n'))
    with pytest.raises(TunewiseError, match="folder"):
        rows_of(tmp_path)
    with pytest.raises(TunewiseError, match="UTF-16"):
        rows_of(write(tmp_path / "u.jsonl", '{"a": 1}\n'.encode("utf-16")))
    with pytest.raises(TunewiseError, match="Parquet"):
        rows_of(write(tmp_path / "p.parquet", b"not parquet"))
    with pytest.raises(TunewiseError) as err:
        rows_of(write(tmp_path / "bad.json", b'[\n {"a": 1},\n {"a" 2}\n]'))
    assert err.value.line == 3


def test_json_file_that_is_really_jsonl_or_pretty_printed(tmp_path):
    path = write(tmp_path / "lines.json", b'{"a": 1}\nnope\n{"a": 2}\n')
    assert detect_container(path) == "jsonl"
    assert [(r.line, r.value) for r in rows_of(path)] == [(1, {"a": 1}), (2, None), (3, {"a": 2})]
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps({"a": 1}, indent=2) + "\n" + json.dumps({"b": 2}, indent=2), encoding="utf-8")
    assert detect_container(path) == "json"
    assert [(r.line, r.value) for r in rows_of(path)] == [(1, {"a": 1}), (4, {"b": 2})]


def test_csv_cells_stay_text(tmp_path):
    path = write(tmp_path / "d.tsv", b'name\tmessages\tnote\nx\t [{"role": "user"}] \t{not json\n'
                                      b'y\t{"k": 1}\t[citation needed]\nshort\n')
    rows = rows_of(path)
    assert rows[0].value == {"name": "x", "messages": ' [{"role": "user"}] ', "note": "{not json"}
    assert rows[0].text_cells and rows[1].value["messages"] == '{"k": 1}'
    assert rows[2].line == 4 and "expected 3 cells" in rows[2].error
    long_cell = json.dumps([{"role": "user", "content": "z" * 300_000}])
    path = tmp_path / "long.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["messages"], [long_cell]])
    assert rows_of(path)[0].value == {"messages": long_cell}


OPEN_QUOTES = {
    # the quote opened on line 2 is closed by the next quote (line 4), with text after it
    "closed-late": ('prompt,completion\nq1,"a1\nq2,a2\nq3,"a3"\nq4,a4\n', "text follows a closing quote"),
    # the quote opened on line 2 is never closed
    "to-the-end": ('prompt,completion\n"q1,a1\nq2,a2\nq3,a3\nq4,a4\n', "runs to the end of the file"),
}


@pytest.mark.parametrize("name", sorted(OPEN_QUOTES))
def test_an_open_quote_is_reported_and_never_merges_rows(tmp_path, name):
    text, reason = OPEN_QUOTES[name]
    rows = rows_of(write(tmp_path / "d.csv", text.encode()))
    assert [r.line for r in rows] == [2, 3, 4, 5]
    assert rows[0].value is None and "quote never closed" in rows[0].error and reason in rows[0].error
    assert [r.value for r in rows[1:]] == [{"prompt": f"q{i}", "completion": f"a{i}"} for i in (2, 3, 4)]


def test_quoted_cells_with_line_breaks_are_one_record(tmp_path):
    rows = rows_of(write(tmp_path / "d.csv", b'prompt,completion\r\n"two\r\nlines, and ""quotes""",x\r\nq,"a"\r\n'))
    assert [(r.line, r.value) for r in rows] == [(2, {"prompt": 'two\r\nlines, and "quotes"', "completion": "x"}),
                                                 (4, {"prompt": "q", "completion": "a"})]
    # a record over several lines with the wrong number of cells is an open quote too: reported, lines read again
    rows = rows_of(write(tmp_path / "e.csv", b'a,b,c\n1,"2\n4,5",6\n7,8\n'))
    assert rows[0].line == 2 and rows[0].value == {"a": "1", "b": "2\n4,5", "c": "6"}
    rows = rows_of(write(tmp_path / "f.csv", b'a,b,c\n1,"2\n4,5"\n7,8,9\n'))
    assert rows[0].line == 2 and "lines 2-3 read as one record of 2 cells" in rows[0].error
    assert rows[1].line == 3 and "expected 3 cells" in rows[1].error
    assert rows[2].value == {"a": "7", "b": "8", "c": "9"}


# --- properties -------------------------------------------------------------------------------

JUNK_PIECES = [b"[", b"]", b"{", b"}", b'"', b",", b":", b"1", b"\n", b"\r\n", b"\r", b" ", b"\xff", b"\xc3",
               b"\xef\xbb\xbf", b"\xff\xfe", b'{"a": 1}', b"null", b"\\", b"\t", b"\x00"]
ANY_BYTES = st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(JUNK_PIECES), max_size=60).map(b"".join),
                      st.text(max_size=100).map(lambda t: t.encode("utf-8")))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ANY_BYTES, suffix=st.sampled_from([".jsonl", ".ndjson", ".json", ".csv", ".tsv"]))
def test_arbitrary_bytes_never_crash(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / f"d{suffix}", data)
        try:
            rows = rows_of(path)
        except TunewiseError:
            return
        assert all(row.error is None or row.value is None for row in rows)
        lines = [row.line for row in rows]
        assert lines == sorted(set(lines)) and all(line >= 1 for line in lines)


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


SCALARS = st.one_of(st.text(), st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False))
OBJECTS = st.dictionaries(st.text(), st.one_of(SCALARS, st.lists(SCALARS, max_size=3)), max_size=4)
GARBAGE = st.text(min_size=1, max_size=40).filter(
    lambda t: "\n" not in t and t.strip(" \t\r") and not t.startswith("\ufeff") and not is_json(t))
LINES = st.lists(st.one_of(OBJECTS.map(lambda o: ("ok", o)), GARBAGE.map(lambda g: ("bad", g)),
                           st.sampled_from(["", "  ", "\t\r"]).map(lambda b: ("blank", b))), max_size=25)


@settings(max_examples=200, deadline=None)
@given(lines=LINES, ascii_only=st.booleans(), crlf=st.booleans(), final_newline=st.booleans())
def test_no_valid_line_is_lost(lines, ascii_only, crlf, final_newline):
    texts = [json.dumps(item, ensure_ascii=ascii_only) if kind == "ok" else item for kind, item in lines]
    newline = "\r\n" if crlf else "\n"
    body = newline.join(texts) + (newline if final_newline else "")
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "d.jsonl", body.encode("utf-8"))
        rows = rows_of(path)
    expected = [(number, kind, item) for number, (kind, item) in enumerate(lines, start=1) if kind != "blank"]
    assert [r.line for r in rows] == [number for number, _, _ in expected]
    for row, (number, kind, item) in zip(rows, expected):
        if kind == "ok":
            assert row.error is None and row.value == item, (number, item)
        else:
            assert row.value is None and row.error, (number, item)


JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(JSON_VALUES, max_size=8), indent=st.sampled_from([None, 1, 2]), chunk=st.integers(1, 24),
       ascii_only=st.booleans())
def test_json_arrays_stream_in_chunks_of_any_size(values, indent, chunk, ascii_only):
    import tunewise.data.readers as readers

    text = json.dumps(values, indent=indent, ensure_ascii=ascii_only)
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "d.json", text.encode("utf-8"))
        whole = rows_of(path)  # default 1 MiB chunks: the file is one chunk
        saved = readers.CHUNK_BYTES
        readers.CHUNK_BYTES = chunk  # values, strings, numbers and UTF-8 sequences cut at every place
        try:
            chunked = rows_of(path)
        finally:
            readers.CHUNK_BYTES = saved
    assert [r.value for r in whole] == values
    assert chunked == whole


def test_json_array_errors_name_the_line_even_far_into_the_file(tmp_path, monkeypatch):
    import tunewise.data.readers as readers

    monkeypatch.setattr(readers, "CHUNK_BYTES", 64)
    rows = [{"prompt": f"q{i}", "completion": "a" * 50} for i in range(40)]
    text = json.dumps(rows, indent=1).replace('"q33"', '"q33" "oops"')
    with pytest.raises(TunewiseError, match="Expecting ',' delimiter") as err:
        rows_of(write(tmp_path / "bad.json", text.encode()))
    assert err.value.line == text[: text.index('"oops"')].count("\n") + 1
    with pytest.raises(TunewiseError, match="never closed"):
        rows_of(write(tmp_path / "cut.json", json.dumps(rows)[:-1].encode()))
    bad = json.dumps(rows, indent=1).encode().replace(b"q30", b"q\xff0")
    with pytest.raises(TunewiseError, match="not UTF-8 text at byte") as err:
        rows_of(write(tmp_path / "bytes.json", bad))
    assert err.value.line == bad[: bad.index(b"\xff")].count(b"\n") + 1
    at = bad.index(b"\xff") + 1
    assert f"byte {at}" in str(err.value)


def test_a_header_with_an_open_quote_is_a_whole_file_error(tmp_path):
    with pytest.raises(TunewiseError, match="the header row cannot be read: quote never closed") as err:
        rows_of(write(tmp_path / "h.csv", b'"prompt,completion\nq,a\n'))
    assert err.value.line == 1
