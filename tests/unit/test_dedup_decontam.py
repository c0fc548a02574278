"""Dedup, conflicting labels and decontamination on templated real-world data (issue 13):
rows that share a template or an instruction stay, real copies and near-copies go."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import SHARED_INSTRUCTION as INSTRUCTION
from tests.helpers import alpaca_rows as alpaca
from tests.helpers import debian_rows as debian
from tests.helpers import write_jsonl
from tunewise.data import DataSettings, prepare
from tunewise.data.similar import SharedPhrasing
from tunewise.pipeline import write_data_folder

FAST = dict(semantic_threshold=None)  # MinHash and n-grams only: the property test runs many times


def test_alpaca_rows_sharing_one_instruction_keep_their_training_rows(tmp_path):
    # every default: auto (stratified) split, MinHash, embeddings, n-gram decontamination
    rows = alpaca(300)
    prepared = prepare([write_jsonl(tmp_path / "a.jsonl", rows)], DataSettings())
    c = prepared.counts
    assert c["train"] >= 0.9 * (300 - c["val"] - c["test"]), c
    assert c["contaminated"] <= 2 and c["near_duplicates"] + c["semantic_duplicates"] <= 3, c
    # the shared instruction is what the checks left out, and the report shows it
    assert prepared.shared_phrasing and INSTRUCTION.lower().startswith(prepared.shared_phrasing[0]["text"][:40])


def test_a_planted_copy_of_a_test_input_is_still_removed(tmp_path):
    rows = [{**row, "day": i} for i, row in enumerate(alpaca(300))]
    newest = rows[-1]  # the time split puts the newest rows in the test set
    planted = {**newest, "output": "zzz-other", "day": -1}  # the oldest row: training
    path = write_jsonl(tmp_path / "a.jsonl", [*rows, planted])
    prepared = prepare([path], DataSettings(split="time", time_key="day"))
    assert "a.jsonl:300" in {e.source for e in prepared.splits["test"]}
    assert "a.jsonl:301" not in {e.source for e in prepared.splits["train"]}
    hit = [x for x in prepared.contaminated if x["source"] == "a.jsonl:301"]
    assert hit and hit[0]["overlaps"] == "a.jsonl:300"
    assert len(prepared.splits["train"]) >= 0.9 * (301 - 60)
    # the same input with two answers is a contradiction, listed with both answers
    assert prepared.conflicts == [{"input": prepared.conflicts[0]["input"], "sources": ["a.jsonl:300", "a.jsonl:301"],
                                   "answers": [newest["output"], "zzz-other"]}]
    assert prepared.conflicts[0]["input"].endswith(newest["input"].split("\n")[-1])  # the row's own content shows
    assert any("conflicting labels" in w for w in prepared.warnings)


def test_eval_file_copies_are_removed_and_listed(tmp_path):
    rows = alpaca(200)
    eval_path = write_jsonl(tmp_path / "bench.jsonl", [rows[10], {**rows[20], "output": "other"}])
    prepared = prepare([write_jsonl(tmp_path / "a.jsonl", rows)], DataSettings(eval_files=(str(eval_path),)))
    train = {e.source for e in prepared.splits["train"]}
    assert not {"a.jsonl:11", "a.jsonl:21"} & train
    listed = {x["source"]: x["overlaps"] for x in prepared.contaminated}
    for source, overlaps in (("a.jsonl:11", "bench.jsonl:1"), ("a.jsonl:21", "bench.jsonl:2")):
        assert source not in train and (listed.get(source) == overlaps or source not in
                                        {e.source for split in prepared.splits.values() for e in split} - train)
    assert len(prepared.contaminated) <= 4


def test_ids_that_differ_are_distinct_rows_and_case_copies_are_duplicates(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(200)]
    rng = random.Random(0)
    copies = [{"prompt": f"Q{i}" if i % 2 else f" q{i}", "completion": f"A{i}" if i % 2 else f"a{i}"}
              for i in rng.sample(range(200), 100)]
    prepared = prepare([write_jsonl(tmp_path / "ids.jsonl", rows + copies)], DataSettings())
    c = prepared.counts
    assert c["exact_duplicates"] == 100 and c["near_duplicates"] == 0 and c["semantic_duplicates"] == 0, c
    assert c["contaminated"] == 0 and c["train"] + c["val"] + c["test"] == 200, c


def test_real_near_duplicates_still_go_and_other_answers_stay(tmp_path):
    description = "shared library for reading and writing the foo archive format, with zstd and lz4 support"
    rows = [{"prompt": f"Package: {name}\nDescription: {description}", "completion": "libs"}
            for name in ("libfoo2", "libfoo2t64")]
    rows.append({"prompt": f"Package: libfoo-utils\nDescription: {description}", "completion": "utils"})
    rows += [{"prompt": f"Package: {text.split()[1]}\nDescription: x{i} {text}", "completion": section}
             for i, (text, section) in enumerate(debian(60))]
    prepared = prepare([write_jsonl(tmp_path / "d.jsonl", rows)], DataSettings(split="random"))
    removed = {s for c in prepared.clusters if c["kind"] in ("near", "semantic") for s in c["removed"]}
    assert removed == {"d.jsonl:2"}, prepared.clusters
    kept = {e.source for split in prepared.splits.values() for e in split}
    assert {"d.jsonl:1", "d.jsonl:3"} <= kept | {x["source"] for x in prepared.contaminated}
    assert all(c["how"] for c in prepared.clusters)


def test_the_data_report_explains_every_removal(tmp_path):
    rows = [{**row, "day": i} for i, row in enumerate(alpaca(120))]
    rows += [rows[5], {**rows[-1], "output": "other", "day": -1}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    settings = DataSettings(split="time", time_key="day", **FAST)
    prepared = prepare([path], settings)
    manifest = write_data_folder(prepared, tmp_path / "out", settings, None)  # the pipeline's: with the report
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert manifest.conflicts == prepared.conflicts and manifest.shared_phrasing
    for text in ("Conflicting labels", "Shared phrasing", "a.jsonl:122", "a.jsonl:6", "whitespace and case aside",
                 prepared.shared_phrasing[0]["text"][:30], prepared.contaminated[0]["how"]):
        assert text in html, text


def test_shared_phrasing_needs_rows_under_two_labels():
    texts = [f"classify this: item {i}" for i in range(6)]
    shared = SharedPhrasing(texts, ngram=2, min_rows=4)
    assert shared.specific == [str(i) for i in range(6)]  # "classify this", "this item", "item" + number
    assert shared.phrases.most_common(1) == [("classify this item", 6)]
    one_label = SharedPhrasing(texts, ngram=2, min_rows=4, labels=["x"] * 6)
    assert one_label.specific == [f"classify this item {i}" for i in range(6)]
    two_labels = SharedPhrasing(texts, ngram=2, min_rows=4, labels=["x", "x", "x", "x", "x", "y"])
    assert two_labels.specific == [str(i) for i in range(6)]
    few = texts[:3]  # in 3 rows: not shared
    assert SharedPhrasing(few, ngram=2, min_rows=4).specific == [f"classify this item {i}" for i in range(3)]
    assert SharedPhrasing(["", "!!", "a b"], ngram=2, min_rows=1).specific == ["", "!!", "a b"]
    assert shared.word_overlap("classify this: item 1", "classify this: item 2") == 0.0
    assert shared.word_overlap("item 1 classify", "1 item") == 1.0


# ---- property: templated data never loses a distinct row ---------------------------------

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "su", "ti", "vo", "ze")
         for b in ("bar", "cel", "dom", "fin", "gur", "hal", "jit", "kon", "lem", "mor")]
LABELS = ["alpha", "beta", "gamma", '{"ok": true}', '{"ok": false}']


@st.composite
def templated_rows(draw) -> tuple[str, list[dict]]:
    """A template every row shares (an instruction and field names) and per-row content with no
    near twin: each row's words are drawn without replacement, plus its own id number."""
    shape = draw(st.sampled_from(["alpaca", "chat", "prompt_completion"]))
    instruction = " ".join(draw(st.lists(st.sampled_from(["please", "read", "the", "record", "below", "and",
                                                           "reply", "with", "its", "class", "only"]),
                                         min_size=0, max_size=24)))
    n = draw(st.integers(min_value=24, max_value=60))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    words = rng.sample(VOCAB, k=min(len(VOCAB), 3 * n))
    free_text = draw(st.booleans())
    rows = []
    for i in range(n):
        own = " ".join(words[3 * i : 3 * i + 3]) if 3 * i + 3 <= len(words) else f"solo{i}"
        content = f"Name: {own} {rng.randint(0, 10**6)}\nNotes: item {i}"
        answer = f"{own.split()[0]} answer {i}" if free_text else rng.choice(LABELS)
        if shape == "alpaca":
            rows.append({"instruction": instruction or "Classify", "input": content, "output": answer})
        elif shape == "chat":
            rows.append({"messages": [{"role": "system", "content": instruction or "Classify"},
                                      {"role": "user", "content": content},
                                      {"role": "assistant", "content": answer}]})
        else:
            rows.append({"prompt": f"{instruction}\n\n{content}", "completion": answer})
    return shape, rows


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=templated_rows())
def test_no_distinct_templated_row_is_lost(case):
    _, rows = case
    with tempfile.TemporaryDirectory() as folder:
        prepared = prepare([write_jsonl(Path(folder) / "t.jsonl", rows)], DataSettings(**FAST, split="random"))
    c = prepared.counts
    assert c["rejected"] == 0 and c["exact_duplicates"] == 0 and c["near_duplicates"] == 0, prepared.clusters
    assert c["contaminated"] == 0, prepared.contaminated
    assert c["train"] + c["val"] + c["test"] == len(rows)


def _reference_specific(texts: list[str], labels: list | None, n: int, min_rows: int) -> list[str]:
    """SharedPhrasing's rule written plainly: word tuples, sets of rows and labels, no hashing."""
    import re

    words = [re.findall(r"\w+", t.lower()) for t in texts]
    rows, labels_of = {}, {}
    for i, row in enumerate(words):
        for k in range(len(row) - n + 1):
            gram = tuple(row[k : k + n])
            rows.setdefault(gram, set()).add(i)
            labels_of.setdefault(gram, set()).add(None if labels is None else labels[i])
    shared = {g for g in rows if len(rows[g]) >= min_rows and (labels is None or len(labels_of[g]) >= 2)}
    out = []
    for text, row in zip(texts, words):
        covered = [False] * len(row)
        for k in range(len(row) - n + 1):
            if tuple(row[k : k + n]) in shared:
                covered[k : k + n] = [True] * n
        kept = [w for w, c in zip(row, covered) if not c]
        out.append(text if not row else " ".join(row) if all(covered) or not any(covered) else " ".join(kept))
    return out


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(["a", "B", "c", "d", "é", "x1", "!", "the"]), max_size=9)
                      .map(" ".join), max_size=12),
       n=st.integers(1, 4), min_rows=st.integers(1, 4), labelled=st.booleans(), data=st.data())
def test_shared_phrasing_matches_a_plain_reference(texts, n, min_rows, labelled, data):
    labels = data.draw(st.lists(st.sampled_from("xyz"), min_size=len(texts), max_size=len(texts))) if labelled else None
    got = SharedPhrasing(texts, labels=labels, ngram=n, min_rows=min_rows).specific
    assert got == _reference_specific(texts, labels, n, min_rows)


def test_preference_pairs_for_one_prompt_conflict_only_when_they_contradict(tmp_path):
    rows = [{"prompt": "Name a colour", "chosen": "Blue.", "rejected": "I cannot help."},
            {"prompt": "Name a colour", "chosen": "Red.", "rejected": "I cannot help."},  # another pair: fine
            {"prompt": "Name a colour", "chosen": "Blue.", "rejected": "Red."},
            {"prompt": "name a  colour", "chosen": "Blue.", "rejected": "Red."},  # a copy: exact duplicate
            {"prompt": "Pick a fruit", "chosen": "Pear.", "rejected": "Rock."},
            {"prompt": "Pick a fruit", "chosen": "Rock.", "rejected": "Pear."}]  # prefers what row 5 rejects
    rows += [{"prompt": f"Question {i}: add {i} and {i}", "chosen": str(2 * i), "rejected": "no"} for i in range(30)]
    prepared = prepare([write_jsonl(tmp_path / "p.jsonl", rows)], DataSettings(**FAST, split="random"))
    assert prepared.counts["exact_duplicates"] == 1
    assert [c["sources"] for c in prepared.conflicts] == [["p.jsonl:5", "p.jsonl:6"]]
    assert prepared.conflicts[0]["answers"] == ["Pear. (over: Rock.)", "Rock. (over: Pear.)"]
