"""Data-stage benchmark: `tunewise data prepare` cost at 10k and 100k examples, and semantic dedup.

Run: .venv/bin/python bench/data_prepare.py [--sizes 10000 100000] [--semantic 20000]

Each size runs in a fresh subprocess (so peak RSS is that run's own) on rows whose words are
drawn, seeded, from the vocabulary of the shipped Debian task: realistic lengths, few
accidental duplicates. Prepare runs without embeddings (semantic_threshold off) but with
reading, validation, chat-template token counting, exact + MinHash near-dup, stratified split
and 13-gram + MinHash decontamination, and writes everything including the HTML report.
Targets (issue 3): 100k in under 60 s with peak memory under 2 GiB, roughly linear growth;
semantic dedup of 20k in under 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "debian-sections" / "packages.jsonl"
SECTIONS = ["admin", "devel", "doc", "games", "graphics", "net", "python", "science", "sound", "utils"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = sorted({w for line in DEMO.read_text().splitlines()
                    for w in re.findall(r"[a-z][a-z0-9+-]+", json.loads(line)["messages"][0]["content"].lower())})
    rows = []
    for i in range(n):
        name = "-".join(rng.choices(words, k=rng.randint(1, 3))) + f"-{i}"
        desc = " ".join(rng.choices(words, k=rng.randint(4, 14)))
        answer = json.dumps({"section": rng.choice(SECTIONS), "architecture": rng.choice(["all", "any"])})
        rows.append({"messages": [{"role": "user", "content": f"Package: {name}\nDescription: {desc}"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def run_prepare(n: int) -> dict:
    """In this process: write n rows, prepare them, return seconds and peak RSS."""
    from tunewise.data import DataSettings, prepare, preview_rows, write_prepared
    from tunewise.models import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n)))
        settings = DataSettings(semantic_threshold=None)
        started = time.perf_counter()
        prepared = prepare([path], settings, tokenizer=tokenizer)
        write_prepared(prepared, Path(tmp) / "out", settings, preview=preview_rows(tokenizer, prepared.splits["train"], ""))
        seconds = time.perf_counter() - started
    return {"n": n, "seconds": round(seconds, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "near_duplicates": prepared.counts.get("near_duplicates", 0), "train": prepared.counts["train"]}


def run_semantic(n: int) -> dict:
    from tunewise.data.similar import semantic_duplicate_clusters

    texts = [r["messages"][0]["content"] + "\n" + r["messages"][1]["content"] for r in make_rows(n)]
    started = time.perf_counter()
    clusters = semantic_duplicate_clusters(texts, threshold=0.95)
    return {"n": n, "seconds": round(time.perf_counter() - started, 1), "clusters": len(clusters),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--semantic", type=int, default=20_000, help="0 skips the semantic benchmark")
    parser.add_argument("--child", choices=["prepare", "semantic"])
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_prepare(args.n) if args.child == "prepare" else run_semantic(args.n)))
        return

    def child(kind: str, n: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--n", str(n)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = [child("prepare", n) for n in args.sizes]
    print("data prepare without embeddings (target: 100k < 60 s, < 2048 MiB, ~linear)")
    print(f"{'examples':>10} {'seconds':>9} {'us/example':>11} {'peak MiB':>9} {'near-dups':>10}")
    for r in results:
        print(f"{r['n']:>10,} {r['seconds']:>9} {1e6 * r['seconds'] / r['n']:>11.0f} {r['peak_rss_mib']:>9} "
              f"{r['near_duplicates']:>10}")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"cost ratio {b['seconds'] / a['seconds']:.1f}x for {b['n'] / a['n']:.0f}x the examples")
    if args.semantic:
        s = child("semantic", args.semantic)
        print(f"semantic dedup (all-MiniLM-L6-v2, cosine > 0.95) of {s['n']:,} examples: {s['seconds']} s "
              f"(target < 180 s), peak {s['peak_rss_mib']} MiB, {s['clusters']} clusters")


if __name__ == "__main__":
    main()
