"""The forgetting check: a small general-instruction regression set, answered by the base model
and by the fine-tune; a drop in accuracy is the "forgetting" red flag.

The set ships with tunewise (`evaluate/regression/general.jsonl`, written for it). Each row is
`{"id", "category", "prompt", "check"}`; a check is scored automatically on the model's output:

- `{"kind": "contains", "any": [...]}`: any alternative occurs as a whole word or phrase
  (case-insensitive; "4" does not match "14" or "4.5"; spaces match any whitespace)
- `{"kind": "regex", "pattern": "..."}`: `re.search` as written (add `(?i)` for case-insensitive)
- `{"kind": "exact", "value": "..."}`: equal after casefolding, dropping punctuation, collapsing spaces
- `{"kind": "max_words", "n": 5}`: between 1 and n words
- `{"kind": "lines", "n": 3}`: exactly n non-empty lines
- `{"kind": "uppercase"}` / `{"kind": "lowercase"}`: has letters, all of them in that case
- `{"kind": "choice", "options": [...], "answer": "..."}`: of the options, the one the output
  names first is the answer (so echoing the question's options back does not pass)
- `{"kind": "all", "checks": [...]}`: every sub-check passes
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tunewise.data.records import Message
from tunewise.errors import TunewiseError

MAX_NEW_TOKENS = 64  # every answer in the set fits in a sentence or two
FIELDS = ("id", "category", "prompt", "check")

# kind -> {field: type} of the fields it requires (and allows)
CHECK_FIELDS: dict[str, dict[str, type]] = {
    "contains": {"any": list},
    "regex": {"pattern": str},
    "exact": {"value": str},
    "max_words": {"n": int},
    "lines": {"n": int},
    "uppercase": {},
    "lowercase": {},
    "choice": {"options": list, "answer": str},
    "all": {"checks": list},
}


@dataclass(frozen=True)
class RegressionItem:
    """One prompt of the regression set and the check its answer must pass."""

    id: str
    category: str
    prompt: str
    check: dict


def load_regression_set(path: Path | None = None) -> list[RegressionItem]:
    """The items of a regression set file (default: the one shipped with tunewise), validated."""
    shipped = resources.files("tunewise") / "evaluate" / "regression" / "general.jsonl"
    source = Path(path) if path is not None else shipped
    file = str(source)
    if not source.is_file():
        raise TunewiseError("regression set file not found", file=file, fix="give an existing .jsonl file")
    text = source.read_text(encoding="utf-8")
    items: list[RegressionItem] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = _parse_row(line, file, line_no)
        if item.id in seen:
            raise TunewiseError(f"id '{item.id}' already used on line {seen[item.id]}", file=file, line=line_no,
                                field="id", fix="give every row its own id")
        seen[item.id] = line_no
        items.append(item)
    if not items:
        raise TunewiseError("the regression set has no rows", file=file, fix="add one JSON object per line")
    return items


def _parse_row(line: str, file: str, line_no: int) -> RegressionItem:
    def bad(message: str, field: str | None = None, fix: str | None = None) -> TunewiseError:
        return TunewiseError(message, file=file, line=line_no, field=field, fix=fix)

    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise bad(f"not valid JSON ({err.msg})", fix="one JSON object per line") from None
    if not isinstance(row, dict):
        raise bad("a row must be a JSON object", fix='{"id": ..., "category": ..., "prompt": ..., "check": {...}}')
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise bad(f"unknown field '{unknown[0]}'", field=unknown[0], fix=f"allowed fields: {', '.join(FIELDS)}")
    for name in ("id", "category", "prompt"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise bad("missing or not a non-empty string", field=name)
    if "check" not in row:
        raise bad("missing", field="check", fix=f"an object with a 'kind': {', '.join(CHECK_FIELDS)}")
    _validate_check(row["check"], "check", bad)
    return RegressionItem(id=row["id"], category=row["category"], prompt=row["prompt"], check=row["check"])


def _validate_check(check: Any, where: str, bad) -> None:
    if not isinstance(check, dict) or check.get("kind") not in CHECK_FIELDS:
        raise bad("not a check: needs a known 'kind'", field=f"{where}.kind",
                  fix=f"kinds: {', '.join(CHECK_FIELDS)}")
    kind = check["kind"]
    wanted = CHECK_FIELDS[kind]
    extra = sorted(set(check) - {"kind"} - set(wanted))
    if extra:
        raise bad(f"unknown field for a '{kind}' check", field=f"{where}.{extra[0]}",
                  fix=f"a '{kind}' check has: {', '.join(['kind', *wanted])}")
    for name, typ in wanted.items():
        value = check.get(name)
        if not isinstance(value, typ) or isinstance(value, bool) or (typ is not int and not value):
            raise bad(f"a '{kind}' check needs a non-empty {typ.__name__} here", field=f"{where}.{name}")
    if kind in ("contains", "choice"):
        name = "any" if kind == "contains" else "options"
        if not all(isinstance(v, str) and v.strip() for v in check[name]):
            raise bad("every alternative must be a non-empty string", field=f"{where}.{name}")
    if kind == "choice" and check["answer"].casefold() not in {o.casefold() for o in check["options"]}:
        raise bad("the answer is not one of the options", field=f"{where}.answer")
    if kind in ("max_words", "lines") and check["n"] < 1:
        raise bad("must be at least 1", field=f"{where}.n")
    if kind == "regex":
        try:
            re.compile(check["pattern"])
        except re.error as err:
            raise bad(f"not a valid regular expression ({err})", field=f"{where}.pattern") from None
    if kind == "all":
        for i, sub in enumerate(check["checks"]):
            _validate_check(sub, f"{where}.checks[{i}]", bad)


def prompts(items: list[RegressionItem]) -> list[list[Message]]:
    """The chat each item is asked as: the user turn alone (no system prompt: general behavior)."""
    return [[{"role": "user", "content": item.prompt}] for item in items]


def _phrase(text: str) -> str:
    """A regex for `text` as a whole word or phrase: no word character (or decimal/thousands
    continuation of a number) right before or after it; any whitespace where it has a space."""
    body = r"\s+".join(re.escape(part) for part in text.split())
    return rf"(?<!\w){body}(?!\w|[.,]\d)"


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def check_passes(check: dict, output: str) -> bool:
    """Whether `output` passes one (validated) check."""
    kind = check["kind"]
    if kind == "contains":
        return any(re.search(_phrase(alt), output, re.I) for alt in check["any"])
    if kind == "regex":
        return re.search(check["pattern"], output) is not None
    if kind == "exact":
        return _normalize(output) == _normalize(check["value"])
    if kind == "max_words":
        return 1 <= len(re.findall(r"\S*\w\S*", output)) <= check["n"]
    if kind == "lines":
        return sum(1 for line in output.splitlines() if line.strip()) == check["n"]
    if kind == "uppercase":
        return any(c.isalpha() for c in output) and not any(c.islower() for c in output)
    if kind == "lowercase":
        return any(c.isalpha() for c in output) and not any(c.isupper() for c in output)
    if kind == "choice":
        found = [(m.start(), -len(option), option) for option in check["options"]
                 if (m := re.search(_phrase(option), output, re.I))]
        return bool(found) and min(found)[2].casefold() == check["answer"].casefold()
    if kind == "all":
        return all(check_passes(sub, output) for sub in check["checks"])
    raise ValueError(f"unknown check kind {kind!r}")  # load_regression_set rejects these


def passes(item: RegressionItem, output: str) -> bool:
    return check_passes(item.check, output.strip())


def score(items: list[RegressionItem], outputs: list[str]) -> list[float]:
    """1.0 per item whose output passes its check, else 0.0, in the items' order."""
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} items but {len(outputs)} outputs")
    return [float(passes(item, output)) for item, output in zip(items, outputs)]
