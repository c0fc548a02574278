import json

import pytest

from tunewise.data import collect, read_examples, write_dataset
from tunewise.data.clean import drop_exact_duplicates
from tunewise.errors import TunewiseError
from tunewise.runs import sha256_file
from tests.helpers import label_rows, write_jsonl


def test_three_formats_normalize_to_the_same_chat(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    alpaca = {"instruction": "Q", "input": "", "output": "A"}
    pc = {"prompt": "Q", "completion": "A"}
    for name, row in [("chat", chat), ("alpaca", alpaca), ("prompt_completion", pc)]:
        examples, problems, fmt = read_examples(write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert fmt == name and not problems
        assert examples[0].messages == chat["messages"]
        assert examples[0].source == f"{name}.jsonl:1"


def test_alpaca_input_is_appended_to_instruction(tmp_path):
    row = {"instruction": "Translate", "input": "hello", "output": "bonjour"}
    examples, _, _ = read_examples(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert examples[0].messages[0]["content"] == "Translate\n\nhello"


def test_every_bad_line_is_reported_with_its_number_and_reason(tmp_path):
    good = label_rows(2)
    rows = [
        good[0],
        "{not json",
        "[1, 2]",
        {"question": "q", "answer": "a"},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        {"messages": [{"role": "user", "content": "x"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        {"prompt": "p", "completion": "c"},
        good[1],
    ]
    examples, problems, fmt = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert fmt == "chat" and len(examples) == 2
    by_line = {p.line: p.reason for p in problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in by_line[2]
    assert "expected a JSON object" in by_line[3]
    assert "unknown format" in by_line[4] and "question" in by_line[4]
    assert "empty" in by_line[5]
    assert "role order" in by_line[6]
    assert "end with an assistant" in by_line[7]
    assert "must be a string" in by_line[8]
    assert "prompt_completion format, but the file is chat" in by_line[9]


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), ("", "empty"), ("\n\n", "empty"), ("{bad\n[]\n", "none of the 2 lines")],
)
def test_unusable_files_raise_with_the_file_name(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TunewiseError, match=message) as err:
        read_examples(path)
    assert str(path) in str(err.value)


def test_exact_duplicates_ignore_whitespace_and_case(tmp_path):
    rows = label_rows(3)
    twin = json.loads(json.dumps(rows[0]))
    twin["messages"][0]["content"] = "  " + twin["messages"][0]["content"].upper().replace(" ", "   ")
    examples, _, _ = read_examples(write_jsonl(tmp_path / "d.jsonl", [*rows, twin]))
    kept, removed = drop_exact_duplicates(examples)
    assert len(kept) == 3
    assert removed == [{"source": "d.jsonl:4", "duplicate_of": "d.jsonl:1"}]


def test_split_is_80_10_10_seeded_disjoint_and_hashed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", label_rows(200) + ["oops"])
    collected = collect([path], seed=0, max_examples=None)
    manifest = write_dataset(collected, tmp_path / "data", val_fraction=0.1, test_fraction=0.1, seed=0)
    counts = manifest["counts"]
    assert (counts["train"], counts["val"], counts["test"], counts["rejected"], counts["read"]) == (160, 20, 20, 1, 201)
    sources = {}
    for split in ("train", "val", "test"):
        file = tmp_path / "data" / f"{split}.jsonl"
        assert manifest["sha256"][split] == sha256_file(file)
        sources[split] = {json.loads(line)["source"] for line in file.read_text().splitlines()}
    assert not (sources["train"] & sources["test"]) and not (sources["train"] & sources["val"])
    rejected = [json.loads(line) for line in (tmp_path / "data" / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["line"] == 201
    again = write_dataset(collected, tmp_path / "data2", val_fraction=0.1, test_fraction=0.1, seed=0)
    assert again["version"] == manifest["version"]
    other = write_dataset(collected, tmp_path / "data3", val_fraction=0.1, test_fraction=0.1, seed=1)
    assert other["version"] != manifest["version"]
