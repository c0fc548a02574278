"""Generation cache: outputs keyed by model + prompt + generation settings, in one SQLite file.

Re-running an evaluation (another metric, a judge, a new arm, a second run on the same data)
reuses every output whose model weights, rendered prompt and settings are unchanged, so only
what is new is generated. The model key hashes the weight files themselves, so retraining an
adapter into the same folder never returns stale outputs.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

from tunewise.models import tunewise_home

SCHEMA = """CREATE TABLE IF NOT EXISTS generations (
  key TEXT PRIMARY KEY, model TEXT NOT NULL, output TEXT NOT NULL, created REAL NOT NULL)"""


def default_path() -> Path:
    return tunewise_home() / "cache" / "generations.sqlite"


def _hash_file(path: Path, digest) -> None:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def model_fingerprint(*folders: Path) -> str:
    """sha256 over the config, weight and tokenizer files of each folder (base, then adapter)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and (path.suffix in (".safetensors", ".json", ".jinja", ".model", ".txt")):
                digest.update(path.name.encode())
                _hash_file(path, digest)
    return digest.hexdigest()


def item_key(model: str, prompt: str, settings: dict) -> str:
    payload = json.dumps({"model": model, "prompt": prompt, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class GenerationCache:
    """Outputs by key; `path=None` turns caching off (every lookup misses, nothing is stored)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db, db:
                db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get_many(self, keys: list[str]) -> dict[str, str]:
        if self.path is None or not keys:
            return {}
        found: dict[str, str] = {}
        with closing(self._connect()) as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = db.execute(
                    f"SELECT key, output FROM generations WHERE key IN ({','.join('?' * len(chunk))})", chunk
                )
                found.update(rows.fetchall())
        return found

    def put_many(self, model: str, items: dict[str, str]) -> None:
        if self.path is None or not items:
            return
        now = time.time()
        with closing(self._connect()) as db, db:
            db.executemany(
                "INSERT OR REPLACE INTO generations (key, model, output, created) VALUES (?, ?, ?, ?)",
                [(k, model, v, now) for k, v in items.items()],
            )


def cached_generate(
    cache: GenerationCache,
    model: str,
    settings: dict,
    prompts: list[str],
    generate: Callable[[list[int], Callable[[dict[int, str]], None]], list[str]],
) -> tuple[list[str], int]:
    """Outputs for `prompts` (rendered prompt texts); `generate(indices, keep)` is called once for
    the misses only and calls `keep({position in indices: output})` as outputs arrive, which
    stores them at once: a failure at item N keeps the outputs before it, and a rerun generates
    only the rest. Returns the outputs in order and how many came from the cache."""
    keys = [item_key(model, p, settings) for p in prompts]
    found = cache.get_many(keys)
    missing = [i for i, k in enumerate(keys) if k not in found]

    def keep(done: dict[int, str]) -> None:
        cache.put_many(model, {keys[missing[j]]: out for j, out in done.items()})

    fresh = generate(missing, keep) if missing else []
    keep(dict(enumerate(fresh)))  # whatever `generate` did not hand to keep itself
    outputs = dict(zip(missing, fresh))
    return [outputs[i] if i in outputs else found[keys[i]] for i in range(len(prompts))], len(prompts) - len(missing)
