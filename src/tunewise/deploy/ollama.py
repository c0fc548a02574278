"""An Ollama Modelfile for an exported GGUF: FROM, the chat template as a Go template, the stops,
the system prompt.

Ollama does not run Jinja; its TEMPLATE is a Go text/template over `.Messages`. tunewise does not
translate Jinja. It renders probe chats through the run's own ChatFormat (the template, its
settings and the family's system-prompt folding, exactly as training saw them) and reads off the
text the template writes around each message: before the first message, between two messages
(by the two roles), and after the last user turn (the generation prompt). The Go template writes
those same pieces, and `render_like_ollama` (the same pieces in Python) must reproduce the Jinja
rendering of chats it was not derived from before a Modelfile is written. The tests execute the
TEMPLATE with Go's own text/template (tests/fixtures/gotemplate) for every family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunewise.errors import TunewiseError

_PH = {"system": "\x00S{}\x00", "user": "\x00U{}\x00", "assistant": "\x00A{}\x00"}


@dataclass(frozen=True)
class Pieces:
    """The text a chat template writes around messages (bos removed: llama.cpp adds it)."""

    begin: dict[str, str]  # before the first message, by its role
    between: dict[str, str]  # "prev>next" -> text between the two messages
    tail: str  # after the last user message: the generation prompt
    fold_system: bool  # the family takes the system prompt inside the first user turn


def _placeholder(role: str, n: int) -> str:
    return _PH[role].format(n)


def _split(text: str, marks: list[str]) -> list[str]:
    """`text` cut at each of `marks` in order: the pieces between them (len(marks) + 1)."""
    pieces, cursor = [], 0
    for mark in marks:
        at = text.find(mark, cursor)
        if at < 0:
            raise ValueError(mark)
        pieces.append(text[cursor:at])
        cursor = at + len(mark)
    return [*pieces, text[cursor:]]


def pieces(chat, *, add_bos: bool) -> Pieces:
    """Derive the pieces from chats rendered by `chat` (a ChatFormat); a TunewiseError when the
    template writes something that depends on more than the two neighbouring roles. `add_bos`:
    the GGUF adds bos itself, so the bos the template writes comes off."""
    bos = (chat.tokenizer.bos_token or "") if add_bos else ""
    u, a = [_placeholder("user", i) for i in range(3)], [_placeholder("assistant", i) for i in range(2)]
    s = _placeholder("system", 0)
    plain = [{"role": "user", "content": u[0]}, {"role": "assistant", "content": a[0]},
             {"role": "user", "content": u[1]}, {"role": "assistant", "content": a[1]},
             {"role": "user", "content": u[2]}]
    try:
        no_system = _split(chat.render(plain, generation_prompt=True), [u[0], a[0], u[1], a[1], u[2]])
        system = [{"role": "system", "content": s}, *plain]
        with_system = _split(chat.render(system, generation_prompt=True), [s, u[0], a[0], u[1], a[1], u[2]])
    except ValueError as err:
        raise TunewiseError(f"the chat template of {chat.model} does not write a message's text as given "
                            f"({err!s:.20}), so it has no Ollama TEMPLATE", field="model.chat_template") from None
    if no_system[2] != no_system[4] or with_system[3] != with_system[5] or no_system[5] != with_system[6]:
        raise TunewiseError(f"the chat template of {chat.model} writes turns differently by position, which "
                            f"an Ollama TEMPLATE cannot do", field="model.chat_template")
    return Pieces(
        begin={"user": _strip(no_system[0], bos), "system": _strip(with_system[0], bos)},
        between={"system>user": with_system[1], "user>assistant": no_system[1], "assistant>user": no_system[2]},
        tail=no_system[5], fold_system=chat.fold_system)


def _strip(text: str, bos: str) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def render_like_ollama(p: Pieces, messages: list[dict]) -> str:
    """What the Go template below writes for `messages` (same pieces, in Python)."""
    out, prev = [], ""
    for message in messages:
        role = message["role"]
        out.append(p.begin[role] if not prev else p.between[f"{prev}>{role}"])
        out.append(message["content"])
        prev = role
    if prev == "user":
        out.append(p.tail)
    return "".join(out)


def _go(text: str) -> str:
    """A Go template string literal (JSON escapes are valid Go escapes for these)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(p: Pieces) -> str:
    """The Ollama TEMPLATE: a range over .Messages writing the pieces by the previous role."""
    lines = ['{{- $prev := "" }}', "{{- range .Messages }}",
             f'{{{{- if eq $prev "" }}}}{{{{ if eq .Role "system" }}}}{_go(p.begin["system"])}'
             f'{{{{ else }}}}{_go(p.begin["user"])}{{{{ end }}}}']
    for pair, text in p.between.items():
        prev, role = pair.split(">")
        lines.append(f'{{{{- else if and (eq $prev "{prev}") (eq .Role "{role}") }}}}{_go(text)}')
    lines += ["{{- end }}{{ .Content }}", "{{- $prev = .Role }}", "{{- end }}",
              f'{{{{- if eq $prev "user" }}}}{_go(p.tail)}{{{{ end }}}}']
    return "\n".join(lines)


def modelfile(chat, gguf_name: str, *, add_bos: bool, system: str | None, adapter: str | None = None) -> str:
    """The Modelfile text: `FROM ./<gguf>` (and `ADAPTER` for a LoRA GGUF), TEMPLATE, stops, SYSTEM."""
    p = check(chat, add_bos=add_bos, system=system)
    stops = [chat.tokenizer.convert_ids_to_tokens(i) for i in chat.stop_ids] + list(chat.stop_strings)
    lines = [f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter}"] if adapter else [])
    lines += ['TEMPLATE """' + go_template(p) + '"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(stops)]
    if system:
        if '"""' in system:
            raise TunewiseError('the system prompt contains """, which a Modelfile cannot quote',
                                field="task.system_prompt")
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def check(chat, *, add_bos: bool, system: str | None = None) -> Pieces:
    """The pieces, after checking they reproduce the Jinja rendering of chats they were not
    derived from (one and two turns, with and without the system prompt)."""
    p = pieces(chat, add_bos=add_bos)
    probe = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3+3?"}]
    for chat_messages in (probe[:1], probe, *([[{"role": "system", "content": system}, *probe]] if system else [])):
        want = _strip(chat.prompt(chat_messages), (chat.tokenizer.bos_token or "") if add_bos else "")
        got = render_like_ollama(p, chat_messages)  # Ollama sends the system prompt as its own message
        if got != want:
            raise TunewiseError(f"an Ollama TEMPLATE cannot reproduce the chat template of {chat.model}: "
                                f"{got[:200]!r} != {want[:200]!r}", field="model.chat_template")
    return p
