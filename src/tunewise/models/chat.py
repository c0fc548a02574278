"""A model family's chat format, resolved once and used by training, evaluation, export and serving.

`ChatFormat.build(tokenizer, ...)` reads everything tunewise needs from the chat template itself,
by rendering probe conversations, so no family is special-cased:

- which template: the user's (`model.chat_template`), the model's, or an explicit default for a
  base model (the family's own turn tokens when its vocabulary has them), recorded in the run;
- the template's settings (`model.chat_template_kwargs`: `enable_thinking`, `date_string`, ...),
  checked against the variables the template really reads, with fixed defaults where a template
  would otherwise change from day to day (`date_string`) or think by default (`enable_thinking`);
- the system prompt: passed as a system turn where the template renders one in place, folded into
  the first user turn where it drops it (Phi-3), raises on it (Gemma 2) or moves it (Mistral v0.3);
- the end-of-turn token that closes an assistant answer (`<|im_end|>`, `<|eot_id|>`,
  `<end_of_turn>`, `<|end|>`, `</s>`), and every token id generation stops at: that one, the
  generation config's and tokenizer's eos, and the special token that opens the next user turn;
- the reasoning block (`<think>` ... `</think>`) a template uses, stripped from answers before scoring.

Training masks come from character spans: the conversation is rendered once, each message's text
is found in order, and the tokens overlapping an assistant answer and its end-of-turn token carry
labels (offsets from the fast tokenizer). Template scaffolding, and reasoning tags the user did not
write (Qwen3's empty `<think></think>`), stay unlabeled, also in multi-turn chats where a template
renders earlier turns differently from the last one. A template where that cannot be done exactly
is refused at build time, before any stage runs.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta

from tunewise.errors import TunewiseError

IGNORE = -100
Message = dict[str, str]

# Template settings that would make a prompt change with the calendar or think by default:
# tunewise fixes them unless the user sets them (Llama 3.2's template calls strftime_now).
FIXED_DEFAULTS: dict[str, Any] = {"date_string": "26 Jul 2024", "enable_thinking": False}
REASONING_TAGS = ("<think>", "</think>")

# Probe conversation: distinctive words that survive every template's trim/strip.
_SYSTEM = "Probe system rules"
_USER = ("Probe first question", "Probe second question")
_ANSWER = ("Probe first answer", "Probe second answer")

# Default templates for a base model, chosen by the turn tokens its vocabulary already has.
DEFAULT_TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("plain", ()),
)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE everywhere but the assistant's answer and its end-of-turn token

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Answer:
    """A generated answer as it is scored: text without reasoning, and the reasoning shown apart."""

    text: str
    reasoning: str | None = None


def default_template(name: str) -> str:
    return resources.files("tunewise.models").joinpath(f"templates/{name}.jinja").read_text(encoding="utf-8")


def read_template(value: str, where: str = "model.chat_template") -> str:
    """`model.chat_template` is Jinja text or the path of a .jinja file."""
    if "{" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise TunewiseError(f"no such template file '{value}'", field=where,
                                fix="give the path of a .jinja file or the template text itself")
        return path.read_text(encoding="utf-8")
    return value


def template_variables(template: str) -> set[str]:
    """The names a Jinja template reads from its context (messages, bos_token, enable_thinking...)."""
    try:
        return meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError as err:
        raise TunewiseError(f"the chat template is not valid Jinja (line {err.lineno}: {err.message})",
                            field="model.chat_template", fix="fix the template text") from None


@dataclass
class ChatFormat:
    """How one model family turns chats into tokens and generated tokens back into answers."""

    tokenizer: Any
    template: str
    source: str  # "model", "config", or "default:<name>" (a base model without a template)
    kwargs: dict[str, Any]
    fold_system: bool
    end_of_turn: tuple[str, ...]  # token strings that close an assistant answer
    stop_ids: tuple[int, ...]  # generation stops at any of these
    stop_strings: tuple[str, ...] = ()  # plain-text turn openers (templates without special tokens)
    reasoning: tuple[str, str] | None = None
    opener_id: int | None = None  # the special token that opens a user turn (a stop, not an end of turn)
    add_bos: bool = False  # the tokenizer adds bos and the template does not write it
    warnings: list[str] = field(default_factory=list)
    model: str = "model.base"

    # ---- building --------------------------------------------------------------------------

    @classmethod
    def build(cls, tokenizer, *, model: str, template: str | None = None, kwargs: dict | None = None,
              generation_eos: list[int] = ()) -> "ChatFormat":
        """Resolve and check the chat format of `tokenizer`; a TunewiseError naming `model`, the
        reason and the fix when it cannot be used exactly."""
        warnings: list[str] = []
        if template is not None:
            text, source = read_template(template), "config"
        elif isinstance(tokenizer.chat_template, str) and tokenizer.chat_template.strip():
            text, source = tokenizer.chat_template, "model"
        elif isinstance(tokenizer.chat_template, dict) and "default" in tokenizer.chat_template:
            text, source = tokenizer.chat_template["default"], "model"
        else:
            name = _default_for(tokenizer)
            text, source = default_template(name), f"default:{name}"
            warnings.append(
                f"{model} has no chat template (a base model): tunewise uses its default '{name}' template, "
                f"recorded in the run and written into the exported tokenizer; set model.chat_template to choose one")
        variables = template_variables(text)
        given = dict(kwargs or {})
        ignored = sorted(k for k in given if k not in variables)
        if ignored:
            raise TunewiseError(
                f"the chat template of {model} does not read {', '.join(ignored)}, so setting it would change nothing",
                field="model.chat_template_kwargs",
                fix=f"remove {', '.join(ignored)}; the template reads: "
                    f"{', '.join(sorted(variables - {'messages', 'add_generation_prompt'})) or 'no settings'}")
        settings = {k: v for k, v in FIXED_DEFAULTS.items() if k in variables} | given
        chat = cls(tokenizer=tokenizer, template=text, source=source, kwargs=settings, fold_system=False,
                   end_of_turn=(), stop_ids=(), warnings=warnings, model=model)
        chat.add_bos = chat._tokenizer_adds_bos()
        chat._probe(list(generation_eos))
        return chat

    def _tokenizer_adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return False
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        rendered = self._render([{"role": "user", "content": _USER[0]}], generation_prompt=True, probe=True)
        return bool(probe) and probe[0] == bos and not rendered.startswith(self.tokenizer.bos_token or "\0")

    def _probe(self, generation_eos: list[int]) -> None:
        one = [{"role": "user", "content": _USER[0]}, {"role": "assistant", "content": _ANSWER[0]}]
        two = [*one, {"role": "user", "content": _USER[1]}, {"role": "assistant", "content": _ANSWER[1]}]
        text = self._render(one, generation_prompt=False, probe=True)
        after = text[text.index(_ANSWER[0]) + len(_ANSWER[0]):] if _ANSWER[0] in text else None
        if after is None:
            self._refuse("the assistant's answer does not appear in the rendered chat")
        special = self._special_ids()
        tail = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        closing = next((i for i in tail if i in special), None)
        if closing is None:
            self._refuse(f"no special token closes the assistant's turn (after the answer the template writes "
                         f"{after[:40]!r}), so generation would never stop",
                         fix="use a template whose assistant turn ends with an end-of-turn or eos token")
        eot = self.tokenizer.convert_ids_to_tokens(closing)
        self.end_of_turn = (eot,)
        self.fold_system = self._system_must_fold()
        multi = self._render(two, generation_prompt=False, probe=True)
        opener = multi[multi.index(_ANSWER[0]) + len(_ANSWER[0]):multi.index(_USER[1])]
        opener = opener.split(eot, 1)[-1]
        special.discard(self.tokenizer.unk_token_id)
        opener_ids = [i for i in self.tokenizer(opener, add_special_tokens=False)["input_ids"] if i in special]
        self.opener_id = opener_ids[0] if opener_ids else None
        ids = [closing, *generation_eos, self.tokenizer.eos_token_id, self.opener_id]
        self.stop_ids = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.stop_strings = () if opener_ids or not opener.strip() else (opener.strip(),)
        self.reasoning = REASONING_TAGS if REASONING_TAGS[0] in self.template else None
        self._check_masks(two)

    def _system_must_fold(self) -> bool:
        """True where the template drops, rejects or moves a system turn (then it is folded)."""
        chat = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER[0]},
                {"role": "assistant", "content": _ANSWER[0]}, {"role": "user", "content": _USER[1]}]
        try:
            text = self._render(chat, generation_prompt=True)
        except jinja2.TemplateError:  # Gemma 2: raise_exception('System role not supported')
            return True
        return _SYSTEM not in text or text.index(_SYSTEM) > text.index(_USER[0])

    def _check_masks(self, chat: list[Message]) -> None:
        """The labeled tokens of a probe chat must decode to exactly each answer plus end-of-turn."""
        chat = [{"role": "system", "content": _SYSTEM}, *chat]
        try:
            encoded = self.encode(chat)
        except TunewiseError as err:
            self._refuse(err.message)
        runs, current = [], []
        for token, label in zip(encoded.input_ids, encoded.labels):
            if label != IGNORE:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        got = [self.tokenizer.decode(run).strip() for run in runs]
        want = [answer + self.end_of_turn[0] for answer in _ANSWER]
        if [g.replace(" ", "") for g in got] != [w.replace(" ", "") for w in want]:
            self._refuse(f"the labeled tokens of a probe chat decode to {got}, not the answers {want}")

    def _refuse(self, reason: str, fix: str | None = None):
        raise TunewiseError(
            f"tunewise cannot train {self.model} exactly with its chat template: {reason}",
            field="model.chat_template",
            fix=fix or "set model.chat_template to a standard template for this family (a .jinja file or text)")

    def _special_ids(self) -> set[int]:
        tok = self.tokenizer
        return set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}

    # ---- rendering ---------------------------------------------------------------------------

    def conversation(self, messages: list[Message]) -> list[Message]:
        """`messages` the way this family takes them: a system turn folded into the first user turn
        where the template has no place for it."""
        if not self.fold_system or not messages or messages[0]["role"] != "system":
            return list(messages)
        system, rest = messages[0]["content"], list(messages[1:])
        for i, message in enumerate(rest):
            if message["role"] == "user":
                rest[i] = {**message, "content": f"{system}\n\n{message['content']}"}
                return rest
        return [{"role": "user", "content": system}, *rest]

    def _render(self, messages: list[Message], *, generation_prompt: bool, probe: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt,
                **self.kwargs)
        except jinja2.TemplateError as err:
            if probe:
                self._refuse(f"the template raises on a plain user/assistant chat ({err})")
            raise

    def render(self, messages: list[Message], *, generation_prompt: bool) -> str:
        """The chat as text under the template (system prompt placed the family's way)."""
        try:
            return self._render(self.conversation(messages), generation_prompt=generation_prompt)
        except jinja2.TemplateError as err:
            raise TunewiseError(f"the chat template of {self.model} raises on a chat: {err}",
                                field="model.chat_template",
                                fix="check the roles of the chat (user and assistant turns alternate)") from None

    def prompt(self, messages: list[Message]) -> str:
        """The text a model completes: the chat, ready for the assistant's turn."""
        return self.render(messages, generation_prompt=True)

    def ids(self, text: str) -> list[int]:
        """Token ids of rendered text: template tokens as written, bos where the tokenizer adds one."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.tokenizer.bos_token_id, *ids] if self.add_bos else ids

    def count(self, messages: list[Message]) -> int:
        """Tokens of the whole chat as training sees it."""
        return len(self.encode(messages))

    # ---- training masks ----------------------------------------------------------------------

    def encode(self, messages: list[Message], *, final_only: bool = False) -> Encoded:
        """Token ids of the chat with labels on each assistant answer and its end-of-turn token
        (the final answer only with `final_only`, as preference training needs).

        The text is tokenized in pieces cut where each answer's prompt ends, so the tokens before
        an answer are exactly the tokens of the prompt that evaluation and the server send
        (in one piece, byte-level BPE would merge a prompt's trailing "\n\n" differently)."""
        chat = self.conversation(messages)
        text = self.render(messages, generation_prompt=False)
        spans = self._answer_spans(chat, text)
        cuts = self._prompt_ends(chat, text, spans)
        ids, offsets = self._tokenize(text, cuts)
        # what the model must write between its prompt and the answer (Mistral's " ") is labeled too
        spans = [(cut, end) if cut <= start and not text[cut:start].strip() else (start, end)
                 for cut, (start, end) in zip(cuts, spans)]
        if final_only:
            spans = spans[-1:]
        ends = [end for _, end in offsets]
        labels = [IGNORE] * len(ids)
        for start, stop in spans:
            k = bisect.bisect_right(ends, start)  # first token ending after the span starts
            while k < len(ids) and offsets[k][0] < stop:
                if offsets[k][1] > offsets[k][0]:
                    labels[k] = ids[k]
                k += 1
        return Encoded(ids, labels)

    def _prompt_ends(self, chat: list[Message], text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Where the prompt of each assistant answer ends: its generation prompt's length where the
        template renders the chat so far as a prefix, else where the answer starts."""
        cuts, turn = [], 0
        for i, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            prompt = self._render(chat[:i], generation_prompt=True) if i else ""
            cuts.append(len(prompt) if prompt and text.startswith(prompt) else spans[turn][0])
            turn += 1
        return cuts

    def _tokenize(self, text: str, cuts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        bounds = sorted({0, *cuts, len(text)})
        for a, b in zip(bounds, bounds[1:]):
            enc = self.tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            offsets += [(s + a, e + a) for s, e in enc["offset_mapping"]]
        if self.add_bos:
            ids, offsets = [self.tokenizer.bos_token_id, *ids], [(0, 0), *offsets]
        return ids, offsets

    def _answer_spans(self, chat: list[Message], text: str) -> list[tuple[int, int]]:
        """Character spans of each assistant answer plus its end-of-turn token, found in order."""
        spans, cursor = [], 0
        for number, message in enumerate(chat, 1):
            if message["role"] != "assistant":
                cursor = _find(text, message["content"], cursor, number)[1]
                continue
            start, cursor = self._find_answer(text, message["content"], cursor, number)
            close = min(((text.find(t, cursor), t) for t in self.end_of_turn if t in text[cursor:]), default=None)
            if close is None or text[cursor:close[0]].strip():
                raise TunewiseError(f"turn {number}: the answer is not followed by {self.end_of_turn[0]}",
                                    field="model.chat_template")
            cursor = close[0] + len(close[1])
            spans.append((start, cursor))
        return spans

    def _find_answer(self, text: str, content: str, cursor: int, number: int) -> tuple[int, int]:
        """Where an assistant message's text is: its reasoning (if the template kept it and the
        user wrote one, from the user's own opening tag) through its answer."""
        if not self.reasoning or self.reasoning[1] not in content:
            return _find(text, content, cursor, number)
        opening, closing = self.reasoning
        thought = content.split(closing, 1)[0].split(opening)[-1].strip()
        answer = content.split(closing, 1)[1].strip()
        at = text.find(thought, cursor) if thought else -1
        if at >= 0:
            start, end = _find(text, answer, at + len(thought), number)
            before = text[cursor:at].rstrip()
            if opening in content and before.endswith(opening):
                at = cursor + len(before) - len(opening)
            return at, end
        return _find(text, answer, cursor, number)  # the template dropped this turn's reasoning

    # ---- answers -----------------------------------------------------------------------------

    def text(self, ids: list[int]) -> str:
        """Generated ids -> text: cut at the first stop token or turn opener, special tokens
        dropped, stripped (a reasoning block stays in; `split` takes it apart)."""
        ids = list(ids)
        stops = set(self.stop_ids)
        cut = next((k for k, i in enumerate(ids) if i in stops), len(ids))
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True)
        for stop in self.stop_strings:
            text = text.split(stop, 1)[0]
        return text.strip()

    def answer(self, ids: list[int]) -> Answer:
        """Generated ids -> the answer as evaluation scores it and the server returns it."""
        return self.split(self.text(ids))

    def split(self, text: str) -> Answer:
        """Generated text -> Answer: cut at a turn opener, the reasoning block taken apart."""
        for stop in self.stop_strings:
            text = text.split(stop, 1)[0]
        return split_reasoning(text, self.reasoning or REASONING_TAGS)

    def template_for_export(self) -> str:
        """The template with this run's settings as its defaults, so a tool that renders it without
        tunewise (transformers, llama.cpp, vLLM) prompts the model the way it was trained."""
        defaults = "".join(f"{{%- if {k} is not defined %}}{{%- set {k} = {json.dumps(v)} %}}{{%- endif %}}\n"
                           for k, v in self.kwargs.items())
        return defaults + self.template

    def record(self) -> dict:
        """What the run records: enough to rebuild this format and to see what was chosen."""
        return {"source": self.source, "template": self.template, "kwargs": self.kwargs,
                "fold_system": self.fold_system, "end_of_turn": list(self.end_of_turn),
                "stop_ids": list(self.stop_ids), "stop_strings": list(self.stop_strings),
                "reasoning": list(self.reasoning) if self.reasoning else None}


def split_reasoning(text: str, tags: tuple[str, str] = REASONING_TAGS) -> Answer:
    """"<think>steps</think> answer" -> Answer("answer", "steps"); text without a block unchanged.
    Also for endpoint arms, whose reasoning models answer the same way."""
    opening, closing = tags
    if closing not in text:
        return Answer(text.strip())
    thought, answer = text.split(closing, 1)
    return Answer(answer.strip(), thought.replace(opening, "", 1).strip() or None)


def generation_eos(folder: Path) -> list[int]:
    """The eos ids of a model folder's generation_config.json (Llama 3.1: end_of_text, eom, eot)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    return [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]


def saved_kwargs(folder: Path) -> dict[str, Any] | None:
    """The template settings training recorded next to an adapter or a merged model (tunewise.json)."""
    path = Path(folder) / "tunewise.json"
    if not path.is_file():
        return None
    chat = json.loads(path.read_text(encoding="utf-8")).get("chat")
    return dict(chat["kwargs"]) if isinstance(chat, dict) and isinstance(chat.get("kwargs"), dict) else None


def load_chat(folder: Path, *, model: str, template: str | None = None, kwargs: dict | None = None,
              trust_remote_code: bool = False, tokenizer_folder: Path | None = None) -> ChatFormat:
    """The chat format of the model in `folder` (its tokenizer from `tokenizer_folder`, e.g. an adapter's)."""
    from tunewise.models.resolve import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_folder or folder, trust_remote_code=trust_remote_code)
    if kwargs is None and tokenizer_folder is not None:
        kwargs = saved_kwargs(tokenizer_folder)
    return ChatFormat.build(tokenizer, model=model, template=template, kwargs=kwargs,
                            generation_eos=generation_eos(folder))


def base_chat(settings) -> ChatFormat:
    """The chat format of the configured base model (`settings`: the config's `model` section)."""
    from tunewise.models.resolve import resolve_base

    return load_chat(resolve_base(settings.base), model=settings.base, template=settings.chat_template,
                     kwargs=settings.chat_template_kwargs)


def _find(text: str, piece: str, cursor: int, number: int) -> tuple[int, int]:
    """(start, end) of `piece` in `text` at or after `cursor`; templates may trim it."""
    for candidate in (piece, piece.strip(), piece.strip("\n")):
        at = text.find(candidate, cursor)
        if at >= 0:
            return at, at + len(candidate)
    raise TunewiseError(f"turn {number}: its text is not in the rendered chat (the template rewrites it)",
                        field="model.chat_template")


def _default_for(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return next(name for name, tokens in DEFAULT_TEMPLATES if all(t in vocab for t in tokens))
