"""Small data builders the tests share."""

from __future__ import annotations

import json
import random
from pathlib import Path

SECTIONS = ["games", "net", "sound", "utils"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def label_rows(n: int, seed: int = 0) -> list[dict]:
    """n distinct chat rows whose answer is a short JSON object (the demo task's shape)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        section = rng.choice(SECTIONS)
        rows.append({"messages": [
            {"role": "user", "content": f"Package: pkg-{section}-{i}\nDescription: a {section} tool number {i}"},
            {"role": "assistant", "content": json.dumps({"section": section})},
        ]})
    return rows
