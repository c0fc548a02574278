"""Detect the record format of each file, validate rows, normalize them to `Example`.

Formats: chat `messages`; ShareGPT `conversations` (`from`/`value`); preference
`prompt`/`chosen`/`rejected` (strings or chats); Alpaca `instruction`/`input`/`output`;
`prompt`/`completion`; raw `text`. The format of a file is the format of its first usable row;
rows in another format are reported, not guessed. Every bad row becomes a `Problem` with its
line number and reason; nothing in the input is modified and nothing is dropped silently.

Text cells (CSV/TSV) are decoded as JSON only where a structured value is expected: a
`messages` / `conversations` cell always, a `prompt` / `chosen` / `rejected` cell when it is a
JSON list of message objects. A `completion` or `output` that is a JSON answer stays text.
Strings that are not valid Unicode (a lone surrogate from a `\\ud800` escape) are rejected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunewise.data.readers import iter_rows
from tunewise.data.records import Example, Message
from tunewise.errors import TunewiseError


@dataclass(frozen=True)
class Problem:
    """A rejected input row and why; `kind` groups problems for --strict and the report."""

    file: str
    line: int
    reason: str
    kind: str = "invalid"

    def __post_init__(self) -> None:
        # a reason may quote the row (a key, a role); it must still be writable as UTF-8
        for name in ("file", "reason"):
            object.__setattr__(self, name, _printable(getattr(self, name)))

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "kind": self.kind, "reason": self.reason}


class BadRow(ValueError):
    """A row that cannot become an example; the message is the reason shown to the user."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _printable(text: str) -> str:
    """`text` with lone surrogates written as escapes (so it encodes as UTF-8)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(text) else text


def _check_unicode(value: str, field: str) -> None:
    found = _SURROGATE.search(value)
    if found:
        raise BadRow(f"field '{field}' is not valid Unicode: a lone surrogate U+{ord(found.group()):04X} at character "
                     f"{found.start() + 1} (a \\u escape without its pair); fix the text or remove the row")


def _check_unicode_deep(value: Any, field: str) -> None:
    if isinstance(value, str):
        _check_unicode(value, field)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(str(key), field)
            _check_unicode_deep(item, field)
    elif isinstance(value, list):
        for item in value:
            _check_unicode_deep(item, field)


def _text(row: dict, key: str, *, optional: bool = False) -> str:
    if key not in row or row[key] is None:
        if optional:
            return ""
        raise BadRow(f"field '{key}' is missing")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"field '{key}' must be a string, got {type(value).__name__}")
    _check_unicode(value, key)
    if not value.strip() and not optional:
        raise BadRow(f"field '{key}' is empty")
    return value


def _messages(items: Any, field: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise BadRow(f"field '{field}' must be a non-empty list of {{{role_key}, {content_key}}}")
    out: list[Message] = []
    for i, msg in enumerate(items):
        if not isinstance(msg, dict):
            raise BadRow(f"{field}[{i}] must be an object with '{role_key}' and '{content_key}'")
        try:
            role, content = _text(msg, role_key), _text(msg, content_key)
        except BadRow as err:
            raise BadRow(f"{field}[{i}]: {err}")
        role = (roles or {}).get(role.lower(), role)
        if role not in ("system", "user", "assistant"):
            known = ", ".join(sorted(roles)) if roles else "system, user, assistant"
            raise BadRow(f"{field}[{i}].{role_key} '{msg[role_key]}' must be one of {known}")
        out.append({"role": role, "content": content})
    return out


def check_order(messages: list[Message]) -> None:
    """Optional system first, then user/assistant alternating, ending with the assistant."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise BadRow("only a system message; add user and assistant turns")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise BadRow(
                f"role order: turn {i + 1} is '{msg['role']}', expected '{expected}' "
                "(optional system first, then user/assistant alternating)"
            )
    if turns[-1]["role"] != "assistant":
        raise BadRow("the chat must end with an assistant turn (the output to learn)")


Normalized = tuple[list[Message], str | None]  # (messages, rejected completion)


def _from_chat(row: dict) -> Normalized:
    messages = _messages(row["messages"], "messages")
    check_order(messages)
    return messages, None


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant", "bard": "assistant"}


def _from_sharegpt(row: dict) -> Normalized:
    messages = _messages(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    check_order(messages)
    return messages, None


def _from_alpaca(row: dict) -> Normalized:
    instruction, extra = _text(row, "instruction"), _text(row, "input", optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _with_row_system(row, [{"role": "user", "content": user},
                                  {"role": "assistant", "content": _text(row, "output")}]), None


def _with_row_system(row: dict, messages: list[Message]) -> list[Message]:
    system = _text(row, "system", optional=True)
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _from_prompt_completion(row: dict) -> Normalized:
    return _with_row_system(row, [{"role": "user", "content": _text(row, "prompt")},
                                  {"role": "assistant", "content": _text(row, "completion")}]), None


def _from_text(row: dict) -> Normalized:
    # Raw text has no prompt: one assistant turn, all of it supervised.
    return [{"role": "assistant", "content": _text(row, "text")}], None


def _final_assistant(value: Any, field: str) -> list[Message]:
    """A preference side: a string, one assistant message (Axolotl's chat_template.default rows), or
    a chat whose last turn is the assistant's."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"field '{field}' is empty")
        return [{"role": "assistant", "content": value}]
    messages = _messages([value] if isinstance(value, dict) else value, field)
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"field '{field}' must end with an assistant turn")
    return messages


def _from_preference(row: dict) -> Normalized:
    chosen = _final_assistant(row.get("chosen"), "chosen")
    rejected = _final_assistant(row.get("rejected"), "rejected")
    if "prompt" in row:
        prompt = row["prompt"]
        prompt_msgs = [{"role": "user", "content": _text(row, "prompt")}] if isinstance(prompt, str) \
            else _messages(prompt, "prompt")
        messages = prompt_msgs + chosen
    else:  # implicit prompt: chosen and rejected are whole chats sharing everything but the end
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            raise BadRow("without 'prompt', 'chosen' and 'rejected' must be chats that differ only in the last turn")
        messages = chosen
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise BadRow("'chosen' and 'rejected' are the same answer")
    check_order(messages)
    return messages, rejected[-1]["content"]


@dataclass(frozen=True)
class Format:
    keys: frozenset[str]
    normalize: Callable[[dict], Normalized]


# Detection order matters: preference rows also have 'prompt'.
FORMATS: dict[str, Format] = {
    "chat": Format(frozenset({"messages"}), _from_chat),
    "sharegpt": Format(frozenset({"conversations"}), _from_sharegpt),
    "preference": Format(frozenset({"chosen", "rejected"}), _from_preference),
    "alpaca": Format(frozenset({"instruction", "output"}), _from_alpaca),
    "prompt_completion": Format(frozenset({"prompt", "completion"}), _from_prompt_completion),
    "text": Format(frozenset({"text"}), _from_text),
}

# --map targets: a canonical role, or any key a known format uses.
ROLE_TARGETS = {"user": "prompt", "assistant": "completion", "system": "system"}
MAP_TARGETS = set(ROLE_TARGETS) | {k for f in FORMATS.values() for k in f.keys} | {"input", "prompt"}


def parse_mapping(spec: str | None) -> dict[str, str]:
    """'question=user,answer=assistant' -> {'question': 'prompt', 'answer': 'completion'}."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        source, sep, target = (s.strip() for s in part.partition("="))
        if not sep or not source or not target:
            raise TunewiseError(f"mapping '{part}' is not of the form field=target", field="--map",
                                fix="e.g. --map question=user,answer=assistant")
        if target not in MAP_TARGETS:
            raise TunewiseError(f"mapping target '{target}' is unknown", field="--map",
                                fix=f"one of: {', '.join(sorted(MAP_TARGETS))}")
        mapping[source] = ROLE_TARGETS.get(target, target)
    return mapping


def apply_mapping(row: dict, mapping: dict[str, str]) -> dict:
    """Rename mapped fields (the input dict is not modified)."""
    if not mapping:
        return row
    out = {k: v for k, v in row.items() if k not in mapping}
    for source, target in mapping.items():
        if source in row:
            out[target] = row[source]
    return out


STRUCTURED_CELLS = ("messages", "conversations")  # a chat: always JSON in a text cell
CHAT_OR_TEXT_CELLS = ("prompt", "chosen", "rejected")  # a chat (JSON list of objects) or plain text


def decode_text_cells(row: dict) -> dict:
    """A CSV row's cells as the format expects them (see the module docstring); `row` is not modified."""
    out = dict(row)
    for key in STRUCTURED_CELLS:
        if isinstance(out.get(key), str):
            try:
                out[key] = json.loads(out[key])
            except (ValueError, RecursionError) as err:
                raise BadRow(f"column '{key}' must hold the chat as JSON, e.g. "
                             f'[{{"role": "user", "content": "..."}}] ({err})') from None
    for key in CHAT_OR_TEXT_CELLS:
        value = out.get(key)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):
                continue
            if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
                out[key] = parsed
    return out


def detect_format(row: dict) -> str | None:
    for name, fmt in FORMATS.items():
        if fmt.keys <= row.keys():
            return name
    return None


def read_examples(
    path: str | Path, *, mapping: dict[str, str] | None = None, keep: tuple[str, ...] = (), strict: bool = False
) -> tuple[list[Example], list[Problem], str]:
    """Read one file (any container `readers` knows). Returns (examples, problems, format).

    The file is streamed: memory grows with the examples kept, not with the file. `keep` names
    raw fields copied into `Example.meta` (group / time keys for the split). With `strict`, the
    first bad row raises at once. Raises TunewiseError when the file is missing, unreadable,
    empty, or has no usable row.
    """
    path = Path(path)
    examples: list[Example] = []
    problems: list[Problem] = []
    file_format: str | None = None
    n_rows = 0
    for row in iter_rows(path):
        n_rows += 1
        problem, found = _example_of(row, path, mapping or {}, keep, file_format)
        if problem is not None:
            if strict:
                raise TunewiseError(f"--strict: the row is '{problem.kind}': {problem.reason}", file=path,
                                    line=problem.line, field="data.strict",
                                    fix="fix the row, or drop --strict to skip bad rows "
                                    "(they are listed in rejected.jsonl)")
            problems.append(problem)
            continue
        example, fmt = found
        file_format = file_format or fmt
        examples.append(example)

    if n_rows == 0:
        raise TunewiseError("data file is empty", file=path, field="data.path", fix="add one JSON example per line")
    if not examples:
        shown = "\n    ".join(str(p) for p in problems[:5])
        raise TunewiseError(
            f"none of the {n_rows} rows is a usable example; first problems:\n    {shown}",
            file=path,
            field="data.path",
            fix="one object per row in a known format (chat 'messages', 'conversations', 'instruction'/'output', "
            "'prompt'/'completion', 'text', 'prompt'/'chosen'/'rejected'), or map your fields with --map",
        )
    return examples, problems, file_format or "unknown"


def _example_of(row, path: Path, mapping: dict[str, str], keep: tuple[str, ...],
                file_format: str | None) -> tuple[Problem | None, tuple[Example, str] | None]:
    """One read row as (None, (example, its format)), or (the problem, None)."""
    if row.error is not None:
        return Problem(str(path), row.line, row.error, "unreadable"), None
    if not isinstance(row.value, dict):
        reason = f"expected a JSON object, got {type(row.value).__name__}"
        return Problem(str(path), row.line, reason, "not_object"), None
    value = apply_mapping(row.value, mapping)
    found = detect_format(value)
    if found is None:
        known = "; ".join(f"{n}: {', '.join(sorted(f.keys))}" for n, f in FORMATS.items())
        return Problem(str(path), row.line,
                       f"unknown format (keys: {', '.join(sorted(value)) or 'none'}; known: {known}; "
                       "or map your fields with --map question=user,answer=assistant)", "unknown_format"), None
    if file_format is not None and found != file_format:
        reason = f"row is in {found} format, but the file is {file_format} (from its first row)"
        return Problem(str(path), row.line, reason, "mixed_format"), None
    missing = [key for key in keep if key not in value]
    if missing:
        return Problem(str(path), row.line, f"field '{missing[0]}' (the split key) is missing", "invalid"), None
    try:
        if row.text_cells:
            value = decode_text_cells(value)
        messages, rejected = FORMATS[found].normalize(value)
        meta = {key: value[key] for key in keep}
        _check_unicode_deep(meta, ", ".join(keep))
    except BadRow as err:
        return Problem(str(path), row.line, str(err), "invalid"), None
    return None, (Example(messages=messages, source=f"{path.name}:{row.line}", rejected=rejected, meta=meta), found)
