"""Count what DESIGN.md's "Stage boundaries" forbids (issue 15's "done when"): functions over 80
lines, components outside the wiring that take the root `Config`, and imports that cross a
boundary the wrong way. tests/unit/test_boundaries.py keeps all three at zero.

    .venv/bin/python tools/boundaries.py [--list]

Wiring modules (allowed to take `Config`): pipeline.py, sweep.py, cli.py, config.py, settings.py.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "tunewise"
WIRING = {"pipeline.py", "sweep.py", "cli.py", "config.py", "settings.py"}
LONG = 80
# (importing package or module prefix, imported prefix): a lower room never imports a higher one
WRONG_WAY = [
    ("deploy", "tunewise.evaluate"),  # generation shared by evaluate and serve lives in models/
    ("models", "tunewise.evaluate"),
    ("data", "tunewise.report"),  # the data stage does not call the report; the pipeline does
    ("config.py", "tunewise.decide"),  # the decide answers' schema lives with the config
    ("cli.py", "tunewise.train"),  # the CLI parses, calls one function, prints
    ("cli.py", "tunewise.evaluate"),
    ("artifacts.py", "tunewise.train"),
    ("artifacts.py", "tunewise.config"),
]


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def takes_config(fn: ast.FunctionDef) -> bool:
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    for a in args:
        ann = ast.unparse(a.annotation) if a.annotation is not None else ""
        if ann.strip("'\"") in ("Config", "config.Config") or (a.arg in ("config", "cfg") and not ann):
            return True
    return False


def imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def survey() -> tuple[list[int], list[str], list[str], list[str]]:
    """Function sizes, long functions, Config-taking components, wrong-way imports."""
    long_fns, config_fns, wrong, sizes = [], [], [], []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        for fn in functions(tree):
            n = fn.end_lineno - fn.lineno + 1
            sizes.append(n)
            if n > LONG:
                long_fns.append(f"{rel}::{fn.name} ({n} lines)")
            if rel not in WIRING and takes_config(fn):
                config_fns.append(f"{rel}::{fn.name}")
        for module in imported(tree):
            wrong += [f"{rel} imports {module}" for room, target in WRONG_WAY
                      if (rel == room or rel.startswith(room + "/")) and module.startswith(target)]
    return sorted(sizes), long_fns, config_fns, wrong


def main() -> int:
    show = "--list" in sys.argv
    sizes, long_fns, config_fns, wrong = survey()
    print(f"functions: {len(sizes)}, median {sizes[len(sizes) // 2]} lines, longest {sizes[-1]}")
    print(f"over {LONG} lines: {len(long_fns)}")
    if show:
        print("".join(f"  {x}\n" for x in long_fns), end="")
    print(f"components taking Config (outside {', '.join(sorted(WIRING))}): {len(config_fns)}")
    if show:
        print("".join(f"  {x}\n" for x in config_fns), end="")
    print(f"imports crossing a boundary the wrong way: {len(wrong)}")
    if show:
        print("".join(f"  {x}\n" for x in wrong), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
