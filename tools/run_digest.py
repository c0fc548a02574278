"""Digest of one whole `tunewise run` on a tiny seeded model: every predictions file, every arm's
metrics and the verdict, with their provenance (run name, time, library versions, paths) taken
out. A refactor that must keep behaviour (issue 15: "byte-identical predictions, metrics and
verdict before and after") runs this at both commits on the same machine and compares.

Run: .venv/bin/python tools/run_digest.py [--keep DIR]    (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOLATILE = {"provenance", "model"}  # run name, time, versions; "model" fingerprints hold folder paths


def stable(path: Path) -> bytes:
    data = json.loads(path.read_text(encoding="utf-8"))
    return json.dumps({k: v for k, v in data.items() if k not in VOLATILE}, sort_keys=True).encode()


def digest(run: Path) -> dict[str, str]:
    files = {f"predictions/{p.name}": p.read_bytes() for p in sorted((run / "predictions").glob("*.jsonl"))}
    files |= {f"metrics/{p.name}": stable(p) for p in sorted((run / "metrics").glob("*.json"))}
    files["verdict.json"] = stable(run / "verdict.json")
    return {name: hashlib.sha256(data).hexdigest()[:16] for name, data in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args()
    from rich.console import Console

    from tests.helpers import label_rows, tiny_model, write_jsonl
    from tunewise.models import load_tokenizer, resolve_base
    from tunewise.pipeline import run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = tiny_model(root / "tiny", load_tokenizer(resolve_base("smollm2-135m-instruct")))
        write_jsonl(root / "data.jsonl", label_rows(60))
        (root / "tunewise.yaml").write_text(
            "task: {name: tiny, system_prompt: Reply with JSON.}\n"
            "data: {path: data.jsonl, near_dup_threshold: null, semantic_threshold: null}\n"
            f"model: {{base: {model}}}\n"
            "train: {epochs: 2, batch_size: 8, lr: 0.01}\n"
            "eval: {max_new_tokens: 8, bootstrap_samples: 200, forgetting: false}\n"
            "track: none\n", encoding="utf-8")
        run, verdict = run_pipeline(root / "tunewise.yaml", [], root / "runs", Console(quiet=True))
        result = digest(run.root)
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name:<{width}}  {value}")
    print(f"{'all':<{width}}  {hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
