"""Exact duplicates (after normalizing whitespace and case) and conflicting labels.

Two rows are the same example only when their whole chat (and, for preference pairs, the
rejected answer) is the same; two rows with the same input and different answers are not
duplicates but a contradiction, listed by `conflicting_labels` and kept for the user to settle.
Preference pairs for one prompt may differ (several pairs per prompt is normal); they
contradict each other only when one pair prefers what another rejects.
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


def normalized_key(example: Example) -> str:
    """Hash of the chat (and the rejected answer) with whitespace collapsed and case folded."""
    parts = [(m["role"], _norm(m["content"])) for m in example.messages]
    if example.rejected is not None:
        parts.append(("rejected", _norm(example.rejected)))
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


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
    """Whitespace collapsed; a long text as its start and its end (a shared instruction comes
    first, the row's own content last)."""
    text = _SPACE.sub(" ", text).strip()
    if len(text) <= EXCERPT_CHARS:
        return text
    head = EXCERPT_CHARS // 3
    return f"{text[:head]} … {text[-(EXCERPT_CHARS - head - 3):]}"


def _input_key(example: Example) -> tuple:
    return tuple((m["role"], _norm(m["content"])) for m in example.prompt_messages)


def conflicting_labels(examples: list[Example], answers: list[str] | None = None) -> list[dict]:
    """Inputs (whitespace and case aside) that appear with different answers:
    {"input": excerpt, "sources": [file:line, ...], "answers": [one excerpt per distinct answer]}.
    `answers` are the examples' `answer_key`s when the caller has them already."""
    answers = answers if answers is not None else [answer_key(e) for e in examples]
    by_hash: dict[int, list[int]] = {}  # a hash, not the text: memory stays one int per row
    for i, example in enumerate(examples):
        if example.prompt_messages:
            by_hash.setdefault(hash(_input_key(example)), []).append(i)
    conflicts = []
    for candidates in by_hash.values():
        if len(candidates) < 2 or len({answers[i] for i in candidates}) < 2:
            continue
        same_input: dict[tuple, list[int]] = {}  # the real inputs, in case two hashes collided
        for i in candidates:
            same_input.setdefault(_input_key(examples[i]), []).append(i)
        for members in same_input.values():
            firsts = _contradicting(members, examples) if examples[members[0]].rejected is not None \
                else _first_per_answer(members, answers)
            if len(firsts) > 1:
                conflicts.append({
                    "input": _excerpt(examples[members[0]].input_text),
                    "sources": [examples[i].source for i in members],
                    "answers": [_excerpt(_shown_answer(examples[i])) for i in firsts],
                })
    return conflicts


def _contradicting(members: list[int], examples: list[Example]) -> list[int]:
    """The first pair that prefers A to B and the first that prefers B to A, if the prompt has both."""
    first_of: dict[tuple[str, str], int] = {}
    for i in members:
        if examples[i].rejected is not None:
            first_of.setdefault((_norm(examples[i].target), _norm(examples[i].rejected)), i)
    for (chosen, rejected), i in first_of.items():
        if (rejected, chosen) in first_of:
            return [i, first_of[(rejected, chosen)]]
    return []


def _shown_answer(example: Example) -> str:
    return example.target if example.rejected is None else f"{example.target} (over: {example.rejected})"


def _first_per_answer(members: list[int], answers: list[str]) -> list[int]:
    seen: dict[str, int] = {}
    for i in members:
        seen.setdefault(answers[i], i)
    return list(seen.values())
