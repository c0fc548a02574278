"""What the data stage keeps of real users' data: one line per case of issue 13, with default settings.

Run: .venv/bin/python bench/data_cases.py [--skip-demo]

Cases (all built here from the shipped Debian rows, nothing downloaded):
- alpaca-shared-instruction: 400 Alpaca rows sharing one 20-word instruction, `input` = the package,
  `output` = its section;
- csv-json-answers: a CSV whose `completion` column holds JSON objects;
- csv-open-quote: a CSV with a quote left open on one row (4 data rows);
- lone-surrogate: a JSONL row with a `\\ud800` escape among valid rows;
- ids-and-duplicates: 200 distinct rows "q<i>" -> "a<i>" plus 100 exact/case duplicates;
- demo: the shipped debian-sections data with the demo config's data settings.
A case that raises prints the message instead of counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "debian-sections" / "packages.jsonl"
INSTRUCTION = ("Read the Debian package name and its short description below and answer with the one archive "
               "section it belongs to")  # 20 words


def demo_rows() -> list[tuple[str, str]]:
    """(package text, section) of the shipped demo rows."""
    out = []
    for line in DEMO.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.append((row["messages"][0]["content"], json.loads(row["messages"][1]["content"])["section"]))
    return out


def alpaca_shared(folder: Path) -> tuple[list[Path], dict]:
    rows = [{"instruction": INSTRUCTION, "input": text, "output": section} for text, section in demo_rows()[:400]]
    path = folder / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return [path], {}


def csv_json_answers(folder: Path) -> tuple[list[Path], dict]:
    path = folder / "answers.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        for text, section in demo_rows()[:100]:
            writer.writerow([text, json.dumps({"section": section})])
    return [path], {"near_dup_threshold": None, "semantic_threshold": None}


def csv_open_quote(folder: Path) -> tuple[list[Path], dict]:
    path = folder / "open.csv"
    path.write_text('prompt,completion\n"first question,first answer\nsecond question,second answer\n'
                    'third question,"third answer"\nfourth question,fourth answer\n', encoding="utf-8")
    return [path], {"near_dup_threshold": None, "semantic_threshold": None}


def lone_surrogate(folder: Path) -> tuple[list[Path], dict]:
    path = folder / "surrogate.jsonl"
    lines = [json.dumps({"prompt": f"question number {i}", "completion": f"answer {i}"}) for i in range(30)]
    lines.insert(3, '{"prompt": "broken \\ud800 text", "completion": "x"}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [path], {"split": "random"}


def ids_and_duplicates(folder: Path) -> tuple[list[Path], dict]:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(200)]
    rng = random.Random(0)
    for i in rng.sample(range(200), 100):
        rows.append({"prompt": f"Q{i}" if i % 2 else f"q{i} ", "completion": f"A{i}" if i % 2 else f"a{i}"})
    path = folder / "ids.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return [path], {"decontaminate": False}


CASES = {"alpaca-shared-instruction": alpaca_shared, "csv-json-answers": csv_json_answers,
         "csv-open-quote": csv_open_quote, "lone-surrogate": lone_surrogate, "ids-and-duplicates": ids_and_duplicates}
KEYS = ("read", "rejected", "exact_duplicates", "near_duplicates", "semantic_duplicates", "conflicts",
        "contaminated", "train", "val", "test")


def run_case(name: str, paths: list[Path], overrides: dict) -> str:
    from tunewise.data import DataSettings, prepare
    from tunewise.errors import TunewiseError

    try:
        prepared = prepare(paths, DataSettings(**overrides))
    except TunewiseError as err:
        return f"{name:<26} error: {str(err).splitlines()[0]}"
    except Exception as err:  # noqa: BLE001 - the point of this script is to show a crash as a crash
        return f"{name:<26} crash: {type(err).__name__}: {err}"
    c = prepared.counts
    return f"{name:<26} " + " ".join(f"{k}={c[k]}" for k in KEYS if k in c)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in CASES.items():
            folder = Path(tmp) / name
            folder.mkdir()
            print(run_case(name, *build(folder)), flush=True)
        if not args.skip_demo:
            # the demo config's data settings: defaults plus max_examples 1500
            print(run_case("demo (1500 of 2500)", [DEMO], {"max_examples": 1500}), flush=True)
            print(run_case("demo (all 2500)", [DEMO], {}), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
