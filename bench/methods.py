"""Every training method on the embedded model: tokens/s and peak memory, measured in one run.

Run: .venv/bin/python bench/methods.py [--examples N] [--batch-size B] [--methods lora,dora,...]

The data is the demo task (src/tunewise/examples/debian-sections/packages.jsonl): the first
N+val examples are prepared once by tunewise's data stage; the preference methods (dpo, orpo) get
the same examples as pairs (chosen: the right JSON answer; rejected: the same JSON with a wrong
section, so the pair differs in exactly the fact being learned). Each method trains one epoch of
N examples at batch B in its own subprocess, through the real train stage
(`tunewise.train.loop.train_model`), so peak RSS (`ru_maxrss`) is that method's own: model,
optimizer state, activations. tokens/s counts every token processed (prompt and answer; both
answers of a pair) over the time inside optimizer steps; wall tokens/s adds the validation and
checkpoint writes inside the loop.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src" / "tunewise" / "examples" / "debian-sections"
SECTIONS = ("admin", "devel", "doc", "games", "graphics", "net", "python", "science", "sound", "utils")

CHILD = """
import json, sys
from rich.console import Console
from tunewise.config import load_config
from tunewise.runs import open_run_dir
from tunewise.settings import track_settings, train_settings
from tunewise.train.loop import train_model
from dataclasses import asdict
run = open_run_dir(sys.argv[1])
config = load_config(run.config)
print(json.dumps(asdict(train_model(run, train_settings(config), Console(quiet=True), track_settings(config)))))
"""


def preference_rows(rows: list[dict], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for row in rows:
        answer = json.loads(row["messages"][-1]["content"])
        wrong = dict(answer, section=rng.choice([s for s in SECTIONS if s != answer["section"]]))
        out.append({"prompt": row["messages"][0]["content"], "chosen": json.dumps(answer),
                    "rejected": json.dumps(wrong)})
    return out


def prepare(workdir: Path, examples: int, batch_size: int, preference: bool) -> Path:
    from rich.console import Console

    from tunewise.pipeline import start_run

    rows = [json.loads(line) for line in (EXAMPLE / "packages.jsonl").read_text().splitlines()]
    rows = rows[: int(examples / 0.8) + 1]
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / ("pairs.jsonl" if preference else "chats.jsonl")
    data.write_text("".join(json.dumps(r) + "\n" for r in (preference_rows(rows) if preference else rows)))
    config = (EXAMPLE / "tunewise.yaml").read_text().replace("path: packages.jsonl", f"path: {data}")
    (workdir / "tunewise.yaml").write_text(config)
    overrides = [f"data.max_examples={len(rows)}", "train.epochs=1", f"train.batch_size={batch_size}",
                 "train.evals_per_epoch=1", "train.patience=null", "train.lr=null", "track=none", "data.val_fraction=0.1",
                 "data.test_fraction=0.1", "data.semantic_threshold=null", "data.near_dup_threshold=null",
                 f"method={'dpo' if preference else 'lora'}"]
    run, _ = start_run(workdir / "tunewise.yaml", overrides, workdir / "runs", Console(quiet=True))
    return run.root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    from tunewise.config import METHODS

    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    methods = args.methods.split(",")

    from rich.console import Console
    from rich.table import Table

    from tunewise.config import PREFERENCE_METHODS, dump_config, load_config
    from tunewise.runs import RunDir

    workdir = Path(tempfile.mkdtemp(prefix="tunewise-methods-"))
    prepared = {kind: prepare(workdir / kind, args.examples, args.batch_size, kind == "pairs")
                for kind in ("chats", "pairs") if any((m in PREFERENCE_METHODS) == (kind == "pairs") for m in methods)}
    results = {}
    for method in methods:
        source = prepared["pairs" if method in PREFERENCE_METHODS else "chats"]
        run = Path(shutil.copytree(source, workdir / f"run-{method}"))
        config_file = RunDir(run).config
        config_file.write_text(dump_config(load_config(config_file, [f"method={method}"])))
        print(f"training {method} ...", flush=True)
        done = subprocess.run([sys.executable, "-c", CHILD, str(run)], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:])
            results[method] = None
            continue
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])

    table = Table(title=f"training methods on the embedded SmolLM2-135M-Instruct: {args.examples} examples "
                        f"(pairs for dpo/orpo), batch {args.batch_size}, 1 epoch")
    for col in ("method", "trainable params", "steps", "tokens/s (steps)", "tokens/s (wall)", "peak RSS MiB",
                "val loss start -> best", "dtype"):
        table.add_column(col)
    for method, r in results.items():
        if r is None:
            table.add_row(method, "failed", *[""] * 6)
            continue
        table.add_row(method, f"{r['trainable_params']:,}", str(r["steps"]), f"{r['step_tokens_per_second']:.0f}",
                      f"{r['tokens_per_second']:.0f}", f"{r['peak_memory_mib']:,.0f}",
                      f"{r['first_val_loss']:.4f} -> {r['best_val_loss']:.4f}", r["dtype"])
    Console(width=160).print(table)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
