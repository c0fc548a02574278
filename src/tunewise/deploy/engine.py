"""The serving engine: one base model, several LoRA adapters in one PeftModel, and one worker
thread that batches queued requests sharing an adapter.

Every forward pass runs on the worker thread, so the active adapter (global to a PeftModel)
never changes under a running batch; loading and unloading adapters take the same lock. A batch
goes through the evaluate stage's own `generate_batch` (same chat template, left padding, greedy,
end-of-turn stop), so a served adapter answers what the evaluate stage recorded for it.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tunewise.artifacts import WeightsKind, weights_in
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat, load_chat, load_model, resolve_base
from tunewise.models.device import placement
from tunewise.models.generate import generate_batch

HOLD = "\ufffd"  # the decoder's placeholder for a character whose bytes have not all arrived


def check_adapter(name: str, path: Path) -> Path:
    """The adapter folder if it holds a PEFT adapter in safetensors, else a TunewiseError."""
    path = Path(path).expanduser()
    fix = "pass a run's adapter folder, e.g. runs/<run>/adapter"
    if not path.is_dir():
        raise TunewiseError(f"adapter '{name}': {'not a folder' if path.exists() else 'no such folder'}",
                            file=path, fix=fix)
    try:
        weights = weights_in(path)
    except TunewiseError as err:
        raise TunewiseError(f"adapter '{name}': {err.message}", file=path / "adapter_config.json", fix=fix) from None
    if not weights.is_adapter:
        whole = (" (it holds a whole model: a full fine-tune; serve it as the base: tunewise serve --base FOLDER)"
                 if weights.kind is WeightsKind.WHOLE_MODEL else "")
        raise TunewiseError(f"adapter '{name}': not a PEFT adapter folder (no adapter_config.json){whole}",
                            file=path, fix=fix)
    if not weights.safetensors:
        pickled = " (adapter_model.bin is a pickle, which tunewise never loads)" if (
            path / "adapter_model.bin").exists() else ""
        raise TunewiseError(
            f"adapter '{name}': no adapter_model.safetensors{pickled}", file=path,
            fix="save the adapter as safetensors: model.save_pretrained(folder, safe_serialization=True)",
        )
    if weights.kind is not WeightsKind.LORA:
        what = f"a {weights.peft_type} adapter" if weights.peft_type else "adapter_config.json names no peft_type"
        raise TunewiseError(
            f"adapter '{name}': {what}; the server batches LoRA/DoRA adapters on one base and "
            f"cannot mix prompt-learning adapters with them", file=path / "adapter_config.json",
            fix="evaluate it with tunewise eval (PEFT runs it there), or train with method: lora to serve it",
        )
    return path


# ---- one request's output, token by token ------------------------------------------------------


@dataclass
class Job:
    """One prompt to complete. The worker fills `ids`, streams text deltas to `events` (when
    `stream`), and resolves `done` with (text, finish_reason)."""

    key: str | None  # the loaded adapter that answers; None: the base model
    text: str  # the rendered prompt
    max_tokens: int
    stop: tuple[str, ...] = ()
    sampling: dict | None = None  # None: greedy
    seed: int | None = None
    stream: bool = False
    prompt_tokens: int = 0
    ids: list[int] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    done: Future = field(default_factory=Future)
    finish_reason: str | None = None
    reasoning: tuple[str, str] | None = None  # the family's reasoning tags (chat completions split on them)
    thinking: bool = False  # the prompt itself opens a reasoning block
    _sent: int = 0  # characters of the visible text already streamed

    def group(self) -> tuple:
        """Jobs with the same group may share a batch."""
        if not self.sampling:
            return (self.key, None, None)  # greedy: the seed changes nothing
        return (self.key, tuple(sorted(self.sampling.items())), self.seed)


class _Rows(StoppingCriteria):
    """Feeds each row's new token to its job (the streamer role) and says which rows are done:
    one of the family's stop tokens, the job's own max_tokens, or one of its stop strings."""

    def __init__(self, jobs: list[Job], chat: ChatFormat) -> None:
        self.jobs, self.chat = jobs, chat
        self.stops = set(chat.stop_ids)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, last):
            if job.finish_reason is not None:
                continue
            job.ids.append(token)
            if token in self.stops:
                job.finish_reason = "stop"
            elif self._hit_stop(job):
                job.finish_reason = "stop"
            elif len(job.ids) >= job.max_tokens:
                job.finish_reason = "length"
            if job.stream:
                _push(job, self.chat, final=job.finish_reason is not None)
        return torch.tensor([job.finish_reason is not None for job in self.jobs], device=input_ids.device)

    def _hit_stop(self, job: Job) -> bool:
        if not job.stop:
            return False
        return any(s in self.chat.text(job.ids) for s in job.stop)


def _visible(job: Job, chat: ChatFormat) -> str:
    """The answer so far as the client sees it: decoded like the evaluate stage, cut at a stop string."""
    text = chat.text(job.ids)
    cuts = [text.find(s) for s in job.stop if s in text]
    return text[: min(cuts)] if cuts else text


def _push(job: Job, chat: ChatFormat, *, final: bool) -> None:
    """Stream the newly visible text. Held back until final: a half-decoded character, trailing
    whitespace (the final answer is stripped), and a tail that could start a stop string."""
    text = _visible(job, chat)
    if final:
        text = text.rstrip()
    else:
        keep = len(text.rstrip(HOLD).rstrip())
        for s in job.stop:
            for k in range(min(len(s) - 1, keep), 0, -1):
                if text[:keep].endswith(s[:k]):
                    keep -= k
                    break
        text = text[:keep]
    if len(text) > job._sent:
        job.events.put(text[job._sent:])
        job._sent = len(text)


# ---- the engine --------------------------------------------------------------------------------


@dataclass
class Loaded:
    key: str
    peft_name: str | None  # None: the bare base (all adapters disabled)
    chat: ChatFormat
    folder: Path | None


class Engine:
    """Owns the model; `submit` queues a job, the worker thread answers it in a batch."""

    def __init__(self, base: str, *, max_batch: int = 8, trust_remote_code: bool = False,
                 on_batch=None) -> None:
        path = resolve_base(base)
        self.base = base
        self.trust_remote_code = trust_remote_code
        self.path = path
        self.chat = load_chat(path, model=base, trust_remote_code=trust_remote_code)
        self.front = {None: copy.deepcopy(self.chat)}  # request threads' own copies (see `render`)
        self.front_lock = threading.Lock()
        place = placement()
        self.model = load_model(path, dtype=place.dtype, trust_remote_code=trust_remote_code, place=place, spread=True)
        self.model.eval()
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.vocab_rows = self.model.get_input_embeddings().num_embeddings
        self.max_batch = max_batch
        self.loaded: dict[str, Loaded] = {}
        self.lock = threading.RLock()  # the model: one batch, load or unload at a time
        self.queue: list[Job] = []
        self.wake = threading.Condition()
        self.on_batch = on_batch  # called with (key, batch size) after each batch, for metrics
        self._counter = 0
        self._stop = False
        self.worker = threading.Thread(target=self._loop, name="tunewise-engine", daemon=True)
        self.worker.start()

    # -- adapters --

    def load(self, key: str, folder: Path) -> Loaded:
        """Load a PEFT adapter (safetensors only) under `key`; a TunewiseError if it does not fit the base."""
        from peft import PeftModel

        folder = check_adapter(key, folder)
        chat = self._adapter_chat(key, folder)
        with self.lock:
            if key in self.loaded:
                return self.loaded[key]
            self._counter += 1
            peft_name = f"adapter{self._counter}"  # PEFT keys are module names (no dots)
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(folder, adapter_name=peft_name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=peft_name)
                    self.model.eval()
            except (ValueError, RuntimeError, KeyError, OSError) as err:  # another base: shapes or modules differ
                reason = (str(err).strip().splitlines() or [""])[0][:300]
                raise TunewiseError(
                    f"adapter '{key}' does not load onto '{self.base}' ({type(err).__name__}: {reason})", file=folder,
                    fix="serve the adapter with the base model it was trained on",
                ) from None
            self.loaded[key] = Loaded(key, peft_name, chat, folder)
            with self.front_lock:
                self.front[key] = copy.deepcopy(chat)
            return self.loaded[key]

    def unload(self, key: str) -> None:
        with self.lock:
            entry = self.loaded.pop(key)
            if self.loaded:
                self.model.delete_adapter(entry.peft_name)
            else:  # the last one: back to the plain base model (PEFT keeps no adapter-less wrapper working)
                self.model = self.model.unload()
                self.model.eval()
            with self.front_lock:
                self.front.pop(key, None)

    def _adapter_chat(self, key: str, folder: Path) -> ChatFormat:
        """The chat format saved with the adapter (tunewise's train stage saves the tokenizer and
        template it trained with, and the template's settings in tunewise.json); the base's for a
        folder without a tokenizer, as in evaluation."""
        if not (folder / "tokenizer_config.json").is_file():
            return self.chat
        chat = load_chat(self.path, model=f"adapter '{key}'", trust_remote_code=self.trust_remote_code,
                         tokenizer_folder=folder)
        if len(chat.tokenizer) > self.vocab_rows:
            raise TunewiseError(
                f"adapter '{key}': its tokenizer has {len(chat.tokenizer)} tokens, the base model's embeddings "
                f"{self.vocab_rows}", file=folder, fix="serve the adapter with the base model it was trained on",
            )
        return chat

    def render(self, key: str | None, fn):
        """`fn(chat)` with a request-side copy of `key`'s chat format (None: the base's). The
        worker's tokenizers stay its own: a Rust tokenizer used by two threads at once fails
        ("Already borrowed") when one of them changes its padding."""
        with self.front_lock:
            return fn(self.front[key])

    # -- requests --

    def submit(self, job: Job) -> Job:
        with self.wake:
            self.queue.append(job)
            self.wake.notify()
        return job

    def pending(self) -> int:
        return len(self.queue)

    def close(self) -> None:
        with self.wake:
            self._stop = True
            self.wake.notify()

    def _take(self) -> list[Job] | None:
        """The oldest job and the queued jobs that may share its batch (same adapter and settings)."""
        with self.wake:
            while not self.queue and not self._stop:
                self.wake.wait()
            if self._stop:
                return None
            group = self.queue[0].group()
            batch = [j for j in self.queue if j.group() == group][: self.max_batch]
            self.queue = [j for j in self.queue if j not in batch]
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except BaseException as err:  # a bug or an out-of-memory: fail these jobs, keep serving
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(err)
                        job.events.put(None)

    def _run(self, batch: list[Job]) -> None:
        from peft import PeftModel

        started = time.perf_counter()
        with self.lock:
            key = batch[0].key
            entry = None if key is None else self.loaded.get(key)
            if key is not None and entry is None:
                raise TunewiseError(f"the model '{key}' was unloaded while the request waited")
            chat = entry.chat if entry else self.chat
            if isinstance(self.model, PeftModel) and entry is None:
                context = self.model.disable_adapter()
            else:
                if entry is not None:
                    self.model.set_adapter(entry.peft_name)
                context = nullcontext()
            texts = [job.text for job in batch]
            rows = _Rows(batch, chat)
            if batch[0].sampling and batch[0].seed is not None:
                torch.manual_seed(batch[0].seed)
            with context:
                generate_batch(self.model, chat, texts, max_new_tokens=max(j.max_tokens for j in batch),
                               stopping_criteria=StoppingCriteriaList([rows]), sampling=batch[0].sampling)
        for job in batch:
            if job.finish_reason is None:  # generate stopped for all rows at max_new_tokens
                job.finish_reason = "length"
            if job.stream:
                _push(job, chat, final=True)
                job.events.put(None)
            job.done.set_result((_visible(job, chat).rstrip(), job.finish_reason))
        if self.on_batch:
            self.on_batch(batch[0].key, len(batch), time.perf_counter() - started)
