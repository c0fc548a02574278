import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import label_rows, write_jsonl
from tunewise.data import DataSettings, parse_mapping, prepare, read_examples, write_prepared
from tunewise.data.clean import drop_exact_duplicates
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat
from tunewise.pipeline import write_data_folder
from tunewise.runs import sha256_file

FAST = dict(semantic_threshold=None)  # the MiniLM path has its own tests


def test_every_format_normalizes_to_the_same_chat(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    rows = {
        "chat": chat,
        "alpaca": {"instruction": "Q", "input": "", "output": "A"},
        "prompt_completion": {"prompt": "Q", "completion": "A"},
        "sharegpt": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        "preference": {"prompt": "Q", "chosen": "A", "rejected": "B"},
    }
    for name, row in rows.items():
        examples, problems, fmt = read_examples(write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert fmt == name and not problems, problems
        assert examples[0].messages == chat["messages"]
        assert examples[0].source == f"{name}.jsonl:1"
    pref, _, _ = read_examples(tmp_path / "preference.jsonl")
    assert pref[0].rejected == "B"
    text, _, fmt = read_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "raw document"}]))
    assert fmt == "text" and text[0].messages == [{"role": "assistant", "content": "raw document"}]


def test_preference_as_chats_with_and_without_prompt(tmp_path):
    user = [{"role": "user", "content": "Q"}]
    good, bad = [{"role": "assistant", "content": "A"}], [{"role": "assistant", "content": "B"}]
    rows = [{"prompt": user, "chosen": good, "rejected": bad}, {"chosen": user + good, "rejected": user + bad},
            {"chosen": user + good, "rejected": [{"role": "user", "content": "other"}] + bad},
            {"prompt": "Q", "chosen": "A", "rejected": "A"}]
    examples, problems, _ = read_examples(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [e.messages for e in examples] == [user + good, user + good]
    assert [e.rejected for e in examples] == ["B", "B"]
    assert [p.line for p in problems] == [3, 4]
    assert "differ only in the last turn" in problems[0].reason and "same answer" in problems[1].reason


def test_field_mapping(tmp_path):
    mapping = parse_mapping("question=user,answer=assistant")
    rows = [{"question": "Q", "answer": "A", "id": 1}]
    examples, problems, fmt = read_examples(write_jsonl(tmp_path / "m.jsonl", rows), mapping=mapping)
    assert fmt == "prompt_completion" and examples[0].messages[1]["content"] == "A"
    with pytest.raises(TunewiseError, match="unknown"):
        parse_mapping("question=asker")
    _, problems, _ = read_examples(write_jsonl(tmp_path / "u.jsonl", [*rows, {"text": "x"}]))
    assert "map your fields with --map" in problems[0].reason


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
    by_line = {p.line: p for p in problems}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in by_line[2].reason
    assert "expected a JSON object" in by_line[3].reason
    assert "unknown format" in by_line[4].reason and "question" in by_line[4].reason
    assert "empty" in by_line[5].reason
    assert "role order" in by_line[6].reason
    assert "end with an assistant" in by_line[7].reason
    assert "must be a string" in by_line[8].reason
    assert by_line[9].kind == "mixed_format" and "prompt_completion format, but the file is chat" in by_line[9].reason


@pytest.mark.parametrize("content, message", [(None, "not found"), ("", "empty"), ("\n\n", "empty"),
                                              ("{bad\n[]\n", "none of the 2 rows")])
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


def _prepared(tmp_path, rows, **settings):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return prepare([path], DataSettings(**{**FAST, **settings}))


def test_split_is_80_10_10_stratified_disjoint_and_hashed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", label_rows(200) + ["oops"])
    settings = DataSettings(**FAST)
    chat = ChatFormat.build(tokenizer, model="smollm2")
    prepared = prepare([path], settings, chat=chat)
    manifest = write_data_folder(prepared, tmp_path / "data", settings, chat)  # with the data report
    counts = manifest.counts
    assert (counts["train"], counts["val"], counts["test"], counts["rejected"], counts["read"]) == (160, 20, 20, 1, 201)
    assert manifest.split_strategy == "stratified" and manifest.output_type == "json"
    sources = {}
    for split in ("train", "val", "test"):
        file = tmp_path / "data" / f"{split}.jsonl"
        assert manifest.sha256[split] == sha256_file(file)
        sources[split] = [json.loads(line) for line in file.read_text().splitlines()]
    ids = {k: {r["source"] for r in v} for k, v in sources.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"])
    # stratified: each label's share in test is within one example of its share overall
    overall = Counter(json.loads(r["messages"][-1]["content"])["section"] for v in sources.values() for r in v)
    test = Counter(json.loads(r["messages"][-1]["content"])["section"] for r in sources["test"])
    for label, n in overall.items():
        assert abs(test[label] - n * 20 / 200) <= 1
    rejected = [json.loads(line) for line in (tmp_path / "data" / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0]["line"] == 201
    assert "tokens" in manifest.stats and manifest.stats["tokens"]["max"] > 10
    html = (tmp_path / "data" / "report.html").read_text()
    assert manifest.version in html and "data:image/png;base64," in html and "oops" not in html
    again = write_prepared(prepared, tmp_path / "data2", settings)
    assert again.version == manifest.version
    other = prepare([path], DataSettings(**FAST, seed=1))
    assert write_prepared(other, tmp_path / "data3", settings).version != manifest.version


def test_near_duplicates_are_clustered_and_reported(tmp_path):
    base = "the quick brown fox jumps over the lazy dog near the quiet river bank at dawn today"
    rows = [{"prompt": f"{base} {i}", "completion": "x"} for i in range(3)]
    rows += [{"prompt": f"completely different text number {i} about cooking pasta with garlic and oil",
              "completion": str(i)} for i in range(40)]
    prepared = _prepared(tmp_path, rows, near_dup_threshold=0.7, split="random")
    near = [c for c in prepared.clusters if c["kind"] == "near"]
    assert near and near[0]["kept"] == "d.jsonl:1" and set(near[0]["removed"]) >= {"d.jsonl:2"}
    assert prepared.counts["near_duplicates"] >= 1


def test_decontamination_removes_train_rows_that_overlap_the_eval_file(tmp_path):
    rows = label_rows(100)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [rows[5], rows[7]])
    prepared = _prepared(tmp_path, rows, eval_files=(str(eval_path),), near_dup_threshold=None)
    removed = {c["source"] for c in prepared.contaminated}
    train = {e.source for e in prepared.splits["train"]}
    assert not ({"d.jsonl:6", "d.jsonl:8"} & train)
    assert removed <= {"d.jsonl:6", "d.jsonl:8"} and removed
    assert all(c["overlaps"].startswith("eval.jsonl:") for c in prepared.contaminated)


def test_group_and_time_splits(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i} long free text answer {i}", "user": f"u{i % 10}", "day": i}
            for i in range(100)]
    grouped = _prepared(tmp_path, rows, split="group", group_key="user", near_dup_threshold=None)
    owners = {name: {e.meta["user"] for e in grouped.splits[name]} for name in ("train", "val", "test")}
    assert not (owners["train"] & owners["test"]) and not (owners["train"] & owners["val"])
    timed = _prepared(tmp_path, rows, split="time", time_key="day", near_dup_threshold=None)
    assert min(e.meta["day"] for e in timed.splits["test"]) > max(e.meta["day"] for e in timed.splits["val"])
    assert min(e.meta["day"] for e in timed.splits["val"]) > max(e.meta["day"] for e in timed.splits["train"])


def test_strict_stops_at_the_first_error_class(tmp_path):
    with pytest.raises(TunewiseError, match="--strict") as err:
        _prepared(tmp_path, label_rows(20) + ["not json"], strict=True)
    assert "d.jsonl:21" in str(err.value)


def test_too_long_examples_are_dropped_and_counted(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "x"}]}
    rows = label_rows(30) + [long]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare([path], DataSettings(**FAST, max_seq_len=100, split="random"),
                       chat=ChatFormat.build(tokenizer, model="smollm2"))
    assert prepared.counts["too_long"] == 1
    assert [p.kind for p in prepared.problems] == ["too_long"] and "max_seq_len 100" in prepared.problems[0].reason


def test_label_imbalance_warns(tmp_path):
    rows = [{"prompt": f"item {i}", "completion": "yes" if i < 95 else "no"} for i in range(100)]
    prepared = _prepared(tmp_path, rows, near_dup_threshold=None)
    assert any("imbalance" in w for w in prepared.warnings)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_read_examples_never_crashes_on_arbitrary_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows{suffix}"
        path.write_bytes(data)
        try:
            examples, problems, _ = read_examples(path)
        except TunewiseError:
            return
        assert all(p.line >= 1 and p.reason for p in problems)


@settings(max_examples=100, deadline=None)
@given(contents=st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=8),
       garbage=st.lists(st.text(alphabet="{[:,x ", min_size=1, max_size=10).filter(lambda t: t.strip()), max_size=5))
def test_no_valid_row_is_lost(contents, garbage):
    rows = [{"prompt": c, "completion": c} for c in contents]
    lines = [json.dumps(r) for r in rows] + garbage
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            examples, problems, _ = read_examples(path)
        except TunewiseError:
            assert False, "valid rows were present"
        assert [e.messages[0]["content"] for e in examples] == contents
        assert [p.line for p in problems] == list(range(len(rows) + 1, len(lines) + 1))


def test_dataset_version_depends_on_content_not_on_the_folder(tmp_path):
    rows = label_rows(60)
    versions = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        path = write_jsonl(tmp_path / folder / "d.jsonl", rows)
        settings = DataSettings(**FAST)
        versions.append(write_prepared(prepare([path], settings), tmp_path / folder / "out", settings).version)
    assert versions[0] == versions[1]
    changed = write_jsonl(tmp_path / "c.jsonl", label_rows(60, seed=1))
    other = write_prepared(prepare([changed], DataSettings(**FAST)), tmp_path / "c", DataSettings(**FAST))
    assert other.version != versions[0]


# ---- real users' files (issue 13) -------------------------------------------------------------

def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_json_answers_stay_text_and_chat_columns_are_decoded(tmp_path):
    answers = [json.dumps({"section": s, "tags": ["a", "b"]}) for s in ("net", "games", "utils")]
    path = _write_csv(tmp_path / "a.csv", ["prompt", "completion"],
                      [[f"package {i}", answer] for i, answer in enumerate(answers)])
    examples, problems, fmt = read_examples(path)
    assert fmt == "prompt_completion" and not problems
    assert [e.target for e in examples] == answers
    chat = [{"role": "user", "content": "[1, 2] as JSON?"}, {"role": "assistant", "content": '{"a": [1, 2]}'}]
    path = _write_csv(tmp_path / "c.csv", ["dialog", "note"], [[json.dumps(chat), "[citation needed]"], ["{oops", "x"]])
    examples, problems, fmt = read_examples(path, mapping=parse_mapping("dialog=messages"))
    assert fmt == "chat" and examples[0].messages == chat
    assert problems[0].line == 3 and "column 'messages' must hold the chat as JSON" in problems[0].reason
    pairs = _write_csv(tmp_path / "p.csv", ["prompt", "chosen", "rejected"],
                       [["[draft] fix this", json.dumps([{"role": "assistant", "content": "good"}]), '{"x": 1}']])
    examples, problems, fmt = read_examples(pairs)
    assert fmt == "preference" and not problems
    assert examples[0].messages[0]["content"] == "[draft] fix this" and examples[0].target == "good"
    assert examples[0].rejected == '{"x": 1}'


def test_an_open_csv_quote_is_reported_and_rows_are_not_merged(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('prompt,completion\nq1,"a1\nq2,a2\nq3,"a3"\nq4,a4\n', encoding="utf-8")
    examples, problems, _ = read_examples(path)
    assert [e.messages[0]["content"] for e in examples] == ["q2", "q3", "q4"]
    assert [(p.line, p.kind) for p in problems] == [(2, "unreadable")] and "quote never closed" in problems[0].reason
    assert f"{path}:2" in str(problems[0])


def test_strings_that_are_not_unicode_are_rejected_not_crashed_on(tmp_path):
    rows = [json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) for i in range(30)]
    rows[3] = '{"prompt": "broken \\ud800 text", "completion": "x"}'
    rows[4] = '{"prompt": "q", "completion": "x", "\\udc00id": 1}'  # an unused key: the row is fine
    rows[5] = '{"\\ud83dprompt": "q", "completion": "x"}'  # the reason quotes the key: still writable
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = DataSettings(**FAST, split="random")
    prepared = prepare([path], settings)
    by_line = {p.line: p.reason for p in prepared.problems}
    assert sorted(by_line) == [4, 6]
    assert "not valid Unicode" in by_line[4] and "U+D800" in by_line[4] and "'prompt'" in by_line[4]
    assert "\\ud83d" in by_line[6]
    write_prepared(prepared, tmp_path / "out", settings)
    rejected = (tmp_path / "out" / "rejected.jsonl").read_text(encoding="utf-8")
    assert "U+D800" in rejected
    grouped = write_jsonl(tmp_path / "g.jsonl",
                          [{"prompt": f"q{i}", "completion": "a", "user": f"u{i % 4}"} for i in range(20)]
                          + ['{"prompt": "q", "completion": "a", "user": "\\udfff"}'])
    _, problems, _ = read_examples(grouped, keep=("user",))
    assert [p.line for p in problems] == [21] and "not valid Unicode" in problems[0].reason


def test_strict_stops_at_the_first_bad_row_without_reading_on(tmp_path, monkeypatch):
    from tunewise.data import formats
    from tunewise.data.readers import Row

    def rows(path):
        yield Row(1, {"prompt": "q", "completion": "a"}, None)
        yield Row(2, None, "not valid JSON: Expecting value (column 1)")
        raise AssertionError("read past the first bad row")

    monkeypatch.setattr(formats, "iter_rows", rows)
    with pytest.raises(TunewiseError, match="--strict") as err:
        read_examples(tmp_path / "big.jsonl", strict=True)
    assert err.value.line == 2


def test_csv_time_keys_that_are_numbers_sort_as_numbers(tmp_path):
    path = _write_csv(tmp_path / "t.csv", ["prompt", "completion", "day"],
                      [[f"question {i}", f"answer {i}", str(i)] for i in range(1, 31)])
    prepared = prepare([path], DataSettings(**FAST, split="time", time_key="day"))
    assert sorted(int(e.meta["day"]) for e in prepared.splits["test"]) == [28, 29, 30]
