#!/usr/bin/env python3
"""Build the debian-sections demo dataset from `apt-cache dumpavail` output.

Task: given a Debian package name and its short description, predict the
package's archive section and whether it is architecture-independent.

Each output line is a chat-format example:
    {"messages": [{"role": "user", "content": "Package: <name>\\nDescription: <short>"},
                  {"role": "assistant", "content": "{\\"section\\": \\"<s>\\", \\"architecture\\": \\"<all|any>\\"}"}]}

Stdlib only. Deterministic for a given input file and seed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

SECTIONS = (
    "admin", "devel", "doc", "games", "graphics",
    "net", "python", "science", "sound", "utils",
)


def iter_stanzas(text: str) -> Iterator[dict[str, str]]:
    """Yield RFC822-like stanzas (blank-line separated) as field dicts.

    Continuation lines (starting with a space or tab) are appended to the
    previous field's value, joined with a newline.
    """
    fields: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is not None:
                fields[last] += "\n" + line
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        last = key.strip()
        fields[last] = value.strip()
    if fields:
        yield fields


def strip_component(section: str) -> str:
    """`contrib/games` -> `games`; `non-free/x` -> `x`; `net` -> `net`."""
    return section.rsplit("/", 1)[-1].strip()


def collect(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """Return {section: [(package, short_description, arch), ...]}."""
    seen: set[str] = set()
    by_section: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SECTIONS}
    for st in iter_stanzas(text):
        name = st.get("Package", "").strip()
        if not name or name in seen:
            continue
        seen.add(name)  # first stanza per package name wins
        desc = st.get("Description", "").split("\n", 1)[0].strip()
        if not desc:
            continue
        section = strip_component(st.get("Section", ""))
        if section not in by_section:
            continue
        arch = "all" if st.get("Architecture", "").strip() == "all" else "any"
        by_section[section].append((name, desc, arch))
    return by_section


def build_rows(text: str, per_section: int, seed: int) -> tuple[list[dict], Counter]:
    rng = random.Random(seed)
    by_section = collect(text)
    picked: list[tuple[str, str, str, str]] = []
    counts: Counter = Counter()
    for section in SECTIONS:
        pool = sorted(by_section[section])
        chosen = rng.sample(pool, min(per_section, len(pool)))
        counts[section] = len(chosen)
        picked.extend((name, desc, section, arch) for name, desc, arch in chosen)
    rng.shuffle(picked)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Package: {name}\nDescription: {desc}"},
                {
                    "role": "assistant",
                    "content": json.dumps({"section": section, "architecture": arch}),
                },
            ]
        }
        for name, desc, section, arch in picked
    ]
    return rows, counts


def read_input(path: str | None) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    proc = subprocess.run(
        ["apt-cache", "dumpavail"], check=True, capture_output=True
    )
    return proc.stdout.decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", metavar="PATH", default=None,
                    help="dumpavail text file (default: run `apt-cache dumpavail`)")
    ap.add_argument("--output", metavar="PATH", default=str(here / "packages.jsonl"),
                    help="output JSONL (default: packages.jsonl next to this script)")
    ap.add_argument("--per-section", type=int, default=250,
                    help="max packages sampled per section (default: 250)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default: 0)")
    args = ap.parse_args(argv)

    rows, counts = build_rows(read_input(args.input), args.per_section, args.seed)

    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, args.output)

    for section in SECTIONS:
        print(f"{section:10s} {counts[section]:5d}", file=sys.stderr)
    print(f"{'total':10s} {len(rows):5d} -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
