"""What kind of output a task has (labels, JSON objects, free text), read off its targets."""

from __future__ import annotations

import json
import re
import string
from typing import Any

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)


def normalize_label(text: str) -> str:
    return " ".join(text.strip().strip(string.punctuation + " ").casefold().split())


def parse_json(text: str) -> Any | None:
    """The JSON value of an output (one surrounding markdown code fence allowed), or None."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        return None


def detect_output_type(targets: list[str]) -> str:
    """json if every output is a JSON object; label if few distinct short outputs; else text."""
    if all(isinstance(parse_json(t), dict) for t in targets):
        return "json"
    distinct = {normalize_label(t) for t in targets}
    short = all(len(t.split()) <= 5 for t in targets)
    if short and len(distinct) <= max(20, len(targets) // 20):
        return "label"
    return "text"


def label_of(target: str, output_type: str) -> str | None:
    """The class a target belongs to, for stratifying and balance: the label itself, or the
    JSON object with few distinct values as a whole; None for free text."""
    if output_type == "label":
        return normalize_label(target)
    if output_type == "json":
        return json.dumps(parse_json(target), sort_keys=True)
    return None
