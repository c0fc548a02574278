"""Exact-duplicate removal (after normalizing whitespace and case)."""

from __future__ import annotations

import hashlib
import json
import re

from tunewise.data.records import Example

_SPACE = re.compile(r"\s+")


def normalized_key(example: Example) -> str:
    """Hash of the chat with whitespace collapsed and case folded."""
    parts = [(m["role"], _SPACE.sub(" ", m["content"]).strip().casefold()) for m in example.messages]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


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
