"""Data-stage benchmark: `tunewise data prepare` cost at 10k and 100k examples, semantic dedup, and
streaming (peak memory against the file's size, next to pandas reading the same file).

Run: .venv/bin/python bench/data_prepare.py [--sizes 10000 100000] [--semantic 20000] [--stream 5000 20000]

Each size runs in a fresh subprocess (so peak RSS is that run's own) on rows whose words are
drawn, seeded, from the vocabulary of the shipped Debian task: realistic lengths, few
accidental duplicates. Prepare runs without embeddings (semantic_threshold off) but with
reading, validation, chat-template token counting, exact + MinHash near-dup, stratified split
and 13-gram + MinHash decontamination, and writes everything including the HTML report.
Targets (issue 3): 100k in under 60 s with peak memory under 2 GiB, roughly linear growth;
semantic dedup of 20k in under 3 minutes.

Streaming (issue 13): every row also carries a 20 KB field no format uses (a scraped page, say),
so the file grows ~20 KB a row while the examples kept stay small. `prepare` (validation, exact
and MinHash dedup, split, decontamination; no tokenizer, no embeddings) should peak far below
the file's size; `pandas.read_json(lines=True)`, the usual way to load such a file, holds it
all. `--strict` on the same file with a bad second row shows how soon the first check fails.
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
    from tunewise.data import DataSettings, prepare
    from tunewise.models import load_chat, resolve_base
    from tunewise.pipeline import write_data_folder

    # the model's ChatFormat counts tokens as training will see them (ChatFormat.count: the chat
    # encoded with its masks), so its cost is inside the timed prepare
    chat = load_chat(resolve_base("smollm2-135m-instruct"), model="smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n)))
        settings = DataSettings(semantic_threshold=None)
        started = time.perf_counter()
        prepared = prepare([path], settings, chat=chat)
        write_data_folder(prepared, Path(tmp) / "out", settings, chat)  # splits, manifest and the data report
        seconds = time.perf_counter() - started
    return {"n": n, "seconds": round(seconds, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "near_duplicates": prepared.counts.get("near_duplicates", 0), "train": prepared.counts["train"]}


PAD = 20_000  # characters of an unused field per row in the streaming files


def write_wide(path: Path, n: int, bad_line: int | None = None, pad: int = PAD) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for i, row in enumerate(make_rows(n), start=1):
            if i == bad_line:
                fh.write("{not json\n")
                continue
            if pad:
                row["page_html"] = "<p>" + "x" * pad + "</p>"
            fh.write(json.dumps(row) + "\n")


def _status_mib(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024)
    return 0


def run_stream(tool: str, path: Path) -> dict:
    """In this process: read the wide file at `path` with `tool`; seconds, peak RSS and rows kept."""
    import pandas as pd

    from tunewise.data import DataSettings, prepare
    from tunewise.errors import TunewiseError

    before = _status_mib("VmRSS")
    started = time.perf_counter()
    if tool == "pandas":
        kept = len(pd.read_json(path, lines=True))
    else:
        try:
            prepared = prepare([path], DataSettings(semantic_threshold=None, strict=tool == "tunewise-strict"))
            kept = sum(prepared.counts[k] for k in ("train", "val", "test"))
        except TunewiseError:
            kept = 0
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "peak_rss_mib": _status_mib("VmHWM"), "start_rss_mib": before, "kept": kept}


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
    parser.add_argument("--stream", type=int, nargs="*", default=[5_000, 20_000],
                        help="rows of the wide files for the streaming comparison (none: skip it)")
    parser.add_argument("--child", choices=["prepare", "semantic", "tunewise", "tunewise-strict", "pandas"])
    parser.add_argument("--n", type=int)
    parser.add_argument("--path", type=Path)
    args = parser.parse_args()
    if args.child:
        result = run_prepare(args.n) if args.child == "prepare" else run_semantic(args.n) \
            if args.child == "semantic" else run_stream(args.child, args.path)
        print(json.dumps(result))
        return

    def child(kind: str, n: int, path: Path | None = None) -> dict:
        extra = ["--path", str(path)] if path else []
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--n", str(n), *extra],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    if args.stream:
        print(f"streaming: JSONL rows with an unused {PAD // 1000} KB field each (peak RSS of a fresh process; "
              "'start' is its RSS before reading)")
        print(f"{'tool':>16} {'rows':>7} {'file MiB':>9} {'seconds':>8} {'start MiB':>10} {'peak MiB':>9} "
              f"{'rows kept':>10}")
        for n in args.stream:
            with tempfile.TemporaryDirectory() as tmp:
                wide, bad, narrow = Path(tmp) / "wide.jsonl", Path(tmp) / "bad.jsonl", Path(tmp) / "narrow.jsonl"
                write_wide(wide, n)
                write_wide(bad, n, bad_line=2)
                write_wide(narrow, n, pad=0)  # the same examples without the unused field
                for tool, path in (("tunewise", wide), ("pandas", wide), ("tunewise-strict", bad),
                                   ("tunewise", narrow)):
                    r = child(tool, n, path)
                    print(f"{tool:>16} {n:>7,} {path.stat().st_size / 2**20:>9.0f} {r['seconds']:>8} "
                          f"{r['start_rss_mib']:>10} {r['peak_rss_mib']:>9} {r['kept']:>10}", flush=True)

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
