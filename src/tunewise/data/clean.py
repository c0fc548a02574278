"""Exact duplicates (after normalizing whitespace and case) and conflicting labels.

Two rows are the same example only when their whole chat (and, for preference pairs, the
rejected answer) is the same; two rows with the same input and different answers are not
duplicates but a contradiction, listed by `conflicting_labels` and kept for the user to settle.
"""

from __future__ import annotations

import hashlib
import json
import re

from tunewise.data.outputs import parse_json
from tunewise.data.records import Example

_SPACE = re.compile(r"\s+")
EXCERPT_CHARS = 160


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def _digest(value: object) -> bytes:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).digest()


def normalized_key(example: Example) -> str:
    """Hash of the chat (and the rejected answer) with whitespace collapsed and case folded."""
    parts = [(m["role"], _norm(m["content"])) for m in example.messages]
    if example.rejected is not None:
        parts.append(("rejected", _norm(example.rejected)))
    return _digest(parts).hex()


def answer_key(example: Example) -> str:
    """What the example answers, normalized: a JSON answer by its value (key order and spacing
    do not matter), any other answer with whitespace collapsed and case folded; a preference
    pair by both of its answers."""
    parsed = parse_json(example.target)
    key = json.dumps(parsed, sort_keys=True, ensure_ascii=False) if isinstance(parsed, (dict, list)) \
        else _norm(example.target)
    return key if example.rejected is None else f"{key}\x00{_norm(example.rejected)}"


def drop_exact_duplicates(examples: list[Example]) -> tuple[list[Example], list[dict]]:
    """Keep the first of each group of equal examples; list what was removed and what was kept."""
    first_seen: dict[str, Example] = {}
    kept: list[Example] = []
    removed: list[dict] = []
    for example in examples:
        key = normalized_key(example)
        if key in first_seen:
            removed.append({"source": example.source, "duplicate_of": first_seen[key].source})
        else:
            first_seen[key] = example
            kept.append(example)
    return kept, removed


def _excerpt(text: str) -> str:
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def conflicting_labels(examples: list[Example]) -> list[dict]:
    """Inputs (whitespace and case aside) that appear with different answers:
    {"input": excerpt, "sources": [file:line, ...], "answers": [one excerpt per distinct answer]}."""
    by_input: dict[bytes, list[int]] = {}
    for i, example in enumerate(examples):
        if example.prompt_messages:
            key = _digest([(m["role"], _norm(m["content"])) for m in example.prompt_messages])
            by_input.setdefault(key, []).append(i)
    conflicts = []
    for members in by_input.values():
        if len(members) < 2:
            continue
        answers: dict[str, Example] = {}
        for i in members:
            answers.setdefault(answer_key(examples[i]), examples[i])
        if len(answers) > 1:
            conflicts.append({
                "input": _excerpt(examples[members[0]].input_text),
                "sources": [examples[i].source for i in members],
                "answers": [_excerpt(e.target) for e in answers.values()],
            })
    return conflicts
