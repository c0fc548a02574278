"""Read JSONL in the known formats, detect the format per file, validate, normalize.

Formats: chat `messages`, Alpaca `instruction`/`input`/`output`, `prompt`/`completion`.
Every bad line is reported as a `Problem` with its line number and reason; nothing in the
input is modified and nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunewise.data.records import Example, Message
from tunewise.errors import TunewiseError


@dataclass(frozen=True)
class Problem:
    """A rejected input line and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class _BadRow(ValueError):
    pass


def _text(row: dict, key: str, *, optional: bool = False) -> str:
    if key not in row or row[key] is None:
        if optional:
            return ""
        raise _BadRow(f"field '{key}' is missing")
    value = row[key]
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip() and not optional:
        raise _BadRow(f"field '{key}' is empty")
    return value


def _from_chat(row: dict) -> list[Message]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise _BadRow("field 'messages' must be a non-empty list of {role, content}")
    out: list[Message] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _BadRow(f"messages[{i}] must be an object with 'role' and 'content'")
        try:
            role, content = _text(msg, "role"), _text(msg, "content")
        except _BadRow as err:
            raise _BadRow(f"messages[{i}]: {err}")
        if role not in ("system", "user", "assistant"):
            raise _BadRow(f"messages[{i}].role '{role}' must be system, user or assistant")
        out.append({"role": role, "content": content})
    _check_order(out)
    return out


def _check_order(messages: list[Message]) -> None:
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise _BadRow("messages has only a system message; add user and assistant turns")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise _BadRow(
                f"role order: turn {i + 1} is '{msg['role']}', expected '{expected}' "
                "(optional system first, then user/assistant alternating)"
            )
    if turns[-1]["role"] != "assistant":
        raise _BadRow("messages must end with an assistant turn (the output to learn)")


def _from_alpaca(row: dict) -> list[Message]:
    instruction, extra = _text(row, "instruction"), _text(row, "input", optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]


def _from_prompt_completion(row: dict) -> list[Message]:
    return [
        {"role": "user", "content": _text(row, "prompt")},
        {"role": "assistant", "content": _text(row, "completion")},
    ]


# name -> (keys that identify the format, normalizer)
FORMATS: dict[str, tuple[frozenset[str], Callable[[dict], list[Message]]]] = {
    "chat": (frozenset({"messages"}), _from_chat),
    "alpaca": (frozenset({"instruction", "output"}), _from_alpaca),
    "prompt_completion": (frozenset({"prompt", "completion"}), _from_prompt_completion),
}


def detect_format(row: dict) -> str | None:
    for name, (keys, _) in FORMATS.items():
        if keys <= row.keys():
            return name
    return None


def read_examples(path: str | Path) -> tuple[list[Example], list[Problem], str]:
    """Parse one JSONL file. Returns (examples, problems, detected format).

    Raises TunewiseError when the file is missing, unreadable, empty, or has no usable line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TunewiseError("data file not found", file=path, field="data.path", fix="check the path")
    except OSError as err:
        raise TunewiseError(f"cannot read data file: {err.strerror}", file=path, field="data.path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise TunewiseError("not UTF-8 text", file=path, line=line, fix="save the file as UTF-8")

    examples: list[Example] = []
    problems: list[Problem] = []
    file_format: str | None = None
    n_lines = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n_lines += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(str(path), lineno, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(str(path), lineno, f"expected a JSON object, got {type(row).__name__}"))
            continue
        found = detect_format(row)
        if found is None:
            known = "; ".join(f"{n}: {', '.join(sorted(k))}" for n, (k, _) in FORMATS.items())
            problems.append(
                Problem(str(path), lineno, f"unknown format (keys: {', '.join(sorted(row)) or 'none'}; known: {known})")
            )
            continue
        if file_format is None:
            file_format = found
        elif found != file_format:
            problems.append(
                Problem(str(path), lineno, f"row is in {found} format, but the file is {file_format} (from its first row)")
            )
            continue
        try:
            messages = FORMATS[found][1](row)
        except _BadRow as err:
            problems.append(Problem(str(path), lineno, str(err)))
            continue
        examples.append(Example(messages=messages, source=f"{path.name}:{lineno}"))

    if n_lines == 0:
        raise TunewiseError("data file is empty", file=path, field="data.path", fix="add one JSON example per line")
    if not examples:
        shown = "\n    ".join(str(p) for p in problems[:5])
        raise TunewiseError(
            f"none of the {n_lines} lines is a usable example; first problems:\n    {shown}",
            file=path,
            field="data.path",
            fix="one JSON object per line with 'messages', or 'instruction'/'output', or 'prompt'/'completion'",
        )
    return examples, problems, file_format or "unknown"
