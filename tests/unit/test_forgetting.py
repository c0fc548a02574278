import json
from collections import Counter

import pytest

from tests.helpers import write_jsonl
from tunewise.errors import TunewiseError
from tunewise.evaluate.forgetting import (
    CHECK_FIELDS,
    RegressionItem,
    check_passes,
    load_regression_set,
    passes,
    prompts,
    score,
)


def _kinds(check: dict) -> set[str]:
    return {check["kind"]}.union(*(_kinds(c) for c in check.get("checks", [])))


def test_the_shipped_set_loads_and_validates():
    items = load_regression_set()
    assert len(items) >= 50
    assert len({it.id for it in items}) == len(items)
    categories = Counter(it.category for it in items)
    assert len(categories) >= 5 and min(categories.values()) >= 5, categories
    used = set().union(*(_kinds(it.check) for it in items))
    assert used <= set(CHECK_FIELDS) and {"contains", "regex", "exact"} <= used
    chats = prompts(items)
    assert chats[0] == [{"role": "user", "content": items[0].prompt}]
    assert all(len(c) == 1 and c[0]["role"] == "user" for c in chats)


def test_no_prompt_passes_its_own_check():
    """Echoing the question back must not count as an answer."""
    assert [it.id for it in load_regression_set() if passes(it, it.prompt)] == []


# (check, a correct answer, a wrong one), written by hand
CASES = [
    ({"kind": "contains", "any": ["Paris"]}, "The capital of France is Paris.", "It is Lyon; not Parisian."),
    ({"kind": "contains", "any": ["4", "four"]}, "12 / 3 = 4.", "12 / 3 = 14, or 4.5"),
    ({"kind": "contains", "any": ["4", "four"]}, "FOUR", "forty"),
    ({"kind": "contains", "any": ["carbon dioxide"]}, "Carbon\ndioxide (CO2)", "carbon monoxide"),
    ({"kind": "regex", "pattern": r"HELLO"}, "HELLO!", "Hello!"),
    ({"kind": "regex", "pattern": r"(?i)^\W*yes\b"}, "Yes, it is.", "No. Yes is wrong."),
    ({"kind": "exact", "value": "Paris"}, " paris. ", "The capital is Paris."),
    ({"kind": "exact", "value": "blue blue blue"}, "Blue, blue, blue!", "blue blue"),
    ({"kind": "max_words", "n": 3}, "Grass is green.", "Grass is usually green."),
    ({"kind": "max_words", "n": 3}, "Green", "  ...  "),
    ({"kind": "lines", "n": 3}, "cat\n\ndog\nbird\n", "cat, dog, bird"),
    ({"kind": "uppercase"}, "THE SKY IS BLUE.", "THE SKY IS Blue."),
    ({"kind": "uppercase"}, "BLUE", "42"),
    ({"kind": "lowercase"}, "a banana.", "A banana."),
    ({"kind": "choice", "options": ["Anna", "Ben", "Carl"], "answer": "Carl"},
     "The youngest is Carl, then Ben.", "Anna is older than Ben, Ben older than Carl."),
    ({"kind": "choice", "options": ["45", "54"], "answer": "54"}, "54 is bigger than 45.", "45"),
    ({"kind": "all", "checks": [{"kind": "uppercase"}, {"kind": "contains", "any": ["blue"]}]}, "BLUE.", "blue."),
]


@pytest.mark.parametrize(("check", "right", "wrong"), CASES,
                         ids=[f"{c['kind']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_each_check_kind_accepts_a_right_answer_and_rejects_a_wrong_one(check, right, wrong):
    assert check_passes(check, right)
    assert not check_passes(check, wrong)


def test_every_check_kind_has_a_hand_written_case():
    assert {c["kind"] for c, _, _ in CASES} == set(CHECK_FIELDS)


def test_score_is_one_or_zero_per_item():
    items = [RegressionItem("a", "facts", "Capital of France?", {"kind": "contains", "any": ["Paris"]}),
             RegressionItem("b", "arithmetic", "2 + 3?", {"kind": "contains", "any": ["5", "five"]})]
    assert score(items, ["  Paris.\n", "2 + 3 = 6"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        score(items, ["Paris"])


GOOD = {"id": "x-01", "category": "facts", "prompt": "Capital of France?", "check": {"kind": "contains", "any": ["Paris"]}}


@pytest.mark.parametrize(("bad", "field"), [
    ({**GOOD, "prompt": ""}, "prompt"),
    ({k: v for k, v in GOOD.items() if k != "category"}, "category"),
    ({**GOOD, "extra": 1}, "extra"),
    ({**GOOD, "check": {"kind": "similar", "any": ["Paris"]}}, "check.kind"),
    ({**GOOD, "check": {"kind": "contains", "any": "Paris"}}, "check.any"),
    ({**GOOD, "check": {"kind": "regex", "pattern": "(unclosed"}}, "check.pattern"),
    ({**GOOD, "check": {"kind": "max_words", "n": 0}}, "check.n"),
    ({**GOOD, "check": {"kind": "choice", "options": ["a", "b"], "answer": "c"}}, "check.answer"),
    ({**GOOD, "check": {"kind": "all", "checks": [{"kind": "uppercase"}, {"kind": "exact"}]}}, "check.checks[1].value"),
    ({**GOOD, "id": "x-00"}, "id"),  # the first row's id again
])
def test_a_bad_row_names_file_line_and_field(tmp_path, bad, field):
    first = {**GOOD, "id": "x-00"}
    path = write_jsonl(tmp_path / "set.jsonl", [first, GOOD, bad])
    with pytest.raises(TunewiseError) as err:
        load_regression_set(path)
    assert err.value.file == str(path) and err.value.line == 3 and err.value.field == field
    assert f"{path}:3" in str(err.value) and field in str(err.value)


def test_a_row_that_is_not_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [GOOD, "{not json"])
    with pytest.raises(TunewiseError, match=r"set\.jsonl:2: not valid JSON"):
        load_regression_set(path)
    with pytest.raises(TunewiseError, match="not found"):
        load_regression_set(tmp_path / "missing.jsonl")


def test_a_custom_file_loads(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n", encoding="utf-8")
    assert load_regression_set(path) == [RegressionItem(**GOOD)]
