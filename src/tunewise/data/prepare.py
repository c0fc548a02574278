"""The data stage: read and validate, remove exact duplicates, split, write splits + manifest."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunewise import __version__
from tunewise.data.clean import drop_exact_duplicates
from tunewise.data.formats import Problem, read_examples
from tunewise.data.records import Example
from tunewise.data.split import split_examples
from tunewise.runs import atomic_write_json, atomic_write_jsonl, replace_dir, sha256_file

SPLITS = ("train", "val", "test")


@dataclass
class Collected:
    """Examples read from the inputs, before splitting."""

    examples: list[Example]
    problems: list[Problem]
    duplicates: list[dict]
    formats: dict[str, str]
    inputs: dict[str, str]  # path -> sha256
    n_read: int
    n_sampled_out: int


def collect(paths: list[Path], *, seed: int, max_examples: int | None) -> Collected:
    """Read every file (raising TunewiseError on unusable input), dedupe, optionally sample."""
    examples: list[Example] = []
    problems: list[Problem] = []
    formats: dict[str, str] = {}
    for path in paths:
        found, bad, fmt = read_examples(path)
        examples += found
        problems += bad
        formats[str(path)] = fmt
    n_read = len(examples) + len(problems)
    kept, duplicates = drop_exact_duplicates(examples)
    n_sampled_out = 0
    if max_examples is not None and len(kept) > max_examples:
        n_sampled_out = len(kept) - max_examples
        kept = random.Random(seed).sample(kept, max_examples)
    return Collected(
        examples=kept,
        problems=problems,
        duplicates=duplicates,
        formats=formats,
        inputs={str(p): sha256_file(p) for p in paths},
        n_read=n_read,
        n_sampled_out=n_sampled_out,
    )


def write_dataset(
    collected: Collected, out_dir: Path, *, val_fraction: float, test_fraction: float, seed: int
) -> dict:
    """Split and write {train,val,test}.jsonl, rejected.jsonl and manifest.json atomically."""
    splits = split_examples(collected.examples, val_fraction, test_fraction, seed)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SPLITS:
        atomic_write_jsonl(tmp / f"{name}.jsonl", (e.to_json() for e in splits[name]))
    atomic_write_jsonl(
        tmp / "rejected.jsonl", ({"file": p.file, "line": p.line, "reason": p.reason} for p in collected.problems)
    )
    manifest = {
        "tunewise_version": __version__,
        "inputs": collected.inputs,
        "formats": collected.formats,
        "settings": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
        "counts": {
            "read": collected.n_read,
            "rejected": len(collected.problems),
            "exact_duplicates": len(collected.duplicates),
            "sampled_out": collected.n_sampled_out,
            **{name: len(splits[name]) for name in SPLITS},
        },
        "sha256": {name: sha256_file(tmp / f"{name}.jsonl") for name in SPLITS},
        "duplicates": collected.duplicates,
    }
    canonical = json.dumps(manifest, sort_keys=True).encode()
    manifest["version"] = hashlib.sha256(canonical).hexdigest()[:16]
    atomic_write_json(tmp / "manifest.json", manifest)
    replace_dir(tmp, out_dir)
    return manifest


def load_split(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as fh:
        return [Example.from_json(json.loads(line)) for line in fh if line.strip()]
