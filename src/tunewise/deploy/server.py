"""tunewise's OpenAI-compatible server: one base model and several LoRA adapters, loaded at once.

    serve("smollm2-135m-instruct", {"sections": Path("runs/<run>/adapter")}, registry=Registry.default())
    # POST http://127.0.0.1:8000/v1/chat/completions  {"model": "sections", "messages": [...]}

A request's `model` names the base (`base`, or the base's own name), an adapter given at start,
a registry name (routed: the canary's share of requests goes to the canary version, the rest to
the current one), or one registry version (`name@v3`). The registry is re-read whenever it
changed, so `tunewise registry promote|canary|rollback` takes effect without a restart.

Generation is evaluation's own (models/generate.py, via engine.py): the adapter's chat template, greedy decoding,
stop at the end-of-turn token. Bad requests get OpenAI's error body and a 4xx status, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from starlette.exceptions import HTTPException

from tunewise.deploy.engine import Engine, Job
from tunewise.errors import TunewiseError
from tunewise.models.chat import split_reasoning

BASE = "base"
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 4096
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_BODY = 1 << 20  # bytes
MIN_TEMPERATURE = 1e-3
PUBLIC = ("/health",)


# ---- requests ----------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted, not shown to the model

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class Sampling(BaseModel):
    """The fields chat and text completions share; any field not declared is a 400, and so is a
    value of the wrong JSON type ("4" for a number, "false" for a boolean), as at OpenAI."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI's
    user: str | None = None  # accepted, not used

    def budget(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    def sampling(self) -> dict | None:
        """None (greedy: the evaluated behavior) unless a temperature of at least MIN_TEMPERATURE
        is asked for; below it, logits / temperature overflow and greedy is what it tends to."""
        if not self.temperature or self.temperature < MIN_TEMPERATURE:
            return None
        return {"temperature": self.temperature} | ({"top_p": self.top_p} if self.top_p else {})


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # the newer name of max_tokens

    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool | None = Field(None, description="only false")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class AdapterLoad(BaseModel):
    """Load a registry version (`name` and `version`), or a folder inside the registry's folder."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(@v[0-9]+)?$")
    version: int | None = Field(None, ge=1)
    path: str | None = None


# ---- errors --------------------------------------------------------------------------------------


class Refused(Exception):
    """A request tunewise cannot answer, as OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        self.status, self.message, self.code, self.param = status, message, code, param


def error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = ("server_error" if status >= 500 else "authentication_error" if status == 401
            else "permission_error" if status == 403 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def validation_error(err: dict) -> JSONResponse:
    """A FastAPI/pydantic validation error as OpenAI's 400 body."""
    if err["type"] == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        return error(400, f"the request body is not valid JSON ({reason})".replace(" ()", ""))
    loc = [str(p) for p in err["loc"] if p != "body"]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        return error(400, f"unsupported parameter '{param}'", "unsupported_parameter", param)
    if err["type"] == "missing" and param is None:
        return error(400, "the request needs a JSON body")
    return error(400, f"{param}: {err['msg']}" if param else err["msg"], None, param)


def key_refusal(request: Request, api_key: str) -> JSONResponse | None:
    header = request.headers.get("authorization", "")
    if not header:
        return error(401, "You didn't provide an API key: send the header 'Authorization: Bearer <key>'.",
                     "invalid_api_key")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
        return error(401, "Incorrect API key provided.", "invalid_api_key")
    return None


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes (declared or streamed) is a 413 before any parsing.

    A body without a declared length (chunked) is read here, up to the limit, and handed on whole.
    A body up to DRAIN_FACTOR times the limit is read to its end (and dropped) before the 413 goes
    out: closing a connection with unread bytes makes the kernel reset it, and the client, still
    sending, would see "connection reset" instead of the 413. A larger one is answered at once."""

    DRAIN_FACTOR = 8

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.limit:
                drain = declared.isdigit() and int(declared) <= self.DRAIN_FACTOR * self.limit
                return await self._too_large(scope, receive, send, drain=drain, seen=0)
            return await self.app(scope, receive, send)  # the server holds the client to its declared length
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.limit:
                return await self._too_large(scope, receive, send, drain=more, seen=seen)
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal whole
            if whole is None:
                return await receive()
            message, whole = whole, None
            return message

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, drain: bool, seen: int):
        while drain and seen <= self.DRAIN_FACTOR * self.limit:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        response = error(413, f"the request body is larger than {self.limit} bytes", "request_too_large")
        await response(scope, receive, send)


# ---- routing: which loaded adapter answers a model name -----------------------------------------


@dataclass(frozen=True)
class Target:
    key: str | None  # the engine's adapter key; None: the base
    model: str  # the id the response names (a registry version resolves to name@vN)
    version: str  # the metrics label


class Router:
    """Model names -> loaded adapters: the base, adapters given at start, and the registry's routes
    (re-read when its stamp changes; versions no route needs any more are unloaded)."""

    def __init__(self, engine: Engine, base: str, adapters: dict[str, Path], registry=None) -> None:
        self.engine, self.base, self.registry = engine, base, registry
        self.fixed = set(adapters)
        self.routes: dict = {}
        self.pinned: set[str] = set()  # registry versions loaded by name@vN or the admin endpoint
        self.stamp = None
        self.lock = threading.Lock()
        for name, folder in adapters.items():
            if not name.strip() or name in (BASE, base) or "@" in name:
                raise TunewiseError(f"adapter name '{name}' is empty, has '@', or is taken by the base model",
                                    fix=f"name the adapter something other than '{BASE}' or '{base}'")
            engine.load(name, folder)
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        if self.registry is None:
            return
        with self.lock:
            if self.registry.stamp() == self.stamp and not force:
                return
            stamp, routes = self.registry.snapshot()  # both from one transaction
            wanted = {f"{v.name}@v{v.version}": v for r in routes.values() for v in (r.current, r.canary) if v}
            for key, version in wanted.items():
                if key not in self.engine.loaded:  # resolve checks the path and the files' digests
                    self.engine.load(key, self.registry.resolve(version.name, version.version).path)
            for key in [k for k in self.engine.loaded if "@" in k and k not in wanted and k not in self.pinned]:
                self.engine.unload(key)
            self.routes = {name: r for name, r in routes.items() if r.current is not None}
            self.stamp = stamp

    def names(self) -> list[dict]:
        """/v1/models: the base, then every adapter name a request may use, each with its parent."""
        rows = [(BASE, None)] + [(name, BASE) for name in sorted(self.fixed)]
        rows += [(name, BASE) for name in sorted(self.routes)]
        rows += [(key, BASE) for key in sorted(k for k in self.engine.loaded if "@" in k)]
        return [{"id": i, "parent": p} for i, p in rows]

    def target(self, name: str) -> Target:
        try:
            self.refresh()
        except TunewiseError as err:  # a routed version no longer loads (files changed, wrong base)
            raise Refused(503, f"the registry's routes could not be loaded: {err}", "registry_error") from None
        if name in (BASE, self.base):
            return Target(None, name, BASE)
        if name in self.fixed:
            return Target(name, name, name)
        if name in self.routes:
            from tunewise.deploy.registry import pick

            version = pick(self.routes[name], random.random())
            key = f"{version.name}@v{version.version}"
            return Target(key, key, key)
        if self.registry is not None and re.fullmatch(r"[^@]+@v[0-9]{1,9}", name):
            return self.pin(*name.split("@v", 1))
        known = ", ".join(row["id"] for row in self.names())
        raise Refused(404, f"The model '{name}' does not exist; this server serves: {known}", "model_not_found",
                      "model")

    def routed(self) -> set[str]:
        """The engine keys the registry's routes send traffic to (current and canary versions)."""
        return {f"{v.name}@v{v.version}" for r in self.routes.values() for v in (r.current, r.canary) if v}

    def listing(self) -> dict:
        """/admin/adapters: what is loaded, from where, and the registry's routes."""
        return {"adapters": [{"name": k, "path": str(v.folder)} for k, v in self.engine.loaded.items()],
                "routes": {n: {"current": _v(r.current), "canary": _v(r.canary), "share": r.share}
                           for n, r in self.routes.items()}}

    def load(self, name: str, folder: Path) -> str:
        """An adapter from the registry's folder under a new name, kept until unloaded."""
        if "@" in name or name in self.fixed or name in (BASE, self.base):
            raise Refused(400, f"the name '{name}' is taken or has '@'", None, "name")
        try:
            self.engine.load(name, folder)
        except TunewiseError as err:
            raise Refused(400, err.message, None, "path") from None
        self.fixed.add(name)
        return name

    def unload(self, name: str) -> str:
        """Unload an adapter no route needs; a routed version stays (roll the route back first)."""
        if name not in self.engine.loaded:
            raise Refused(404, f"no adapter '{name}' is loaded", "model_not_found", "name")
        if name in self.routed():
            raise Refused(409, f"'{name}' is routed by the registry: roll it back or promote another version first")
        self.engine.unload(name)
        self.fixed.discard(name)
        self.pinned.discard(name)
        return name

    def pin(self, name: str, version: str | int) -> Target:
        """A registry version by number, loaded on first use and kept."""
        key = f"{name}@v{version}"
        if key not in self.engine.loaded:
            try:
                self.engine.load(key, self.registry.resolve(name, int(version)).path)
            except TunewiseError as err:
                raise Refused(404, f"The model '{key}' does not exist: {err.message}", "model_not_found",
                              "model") from None
        self.pinned.add(key)
        return Target(key, key, key)


# ---- the app -------------------------------------------------------------------------------------


class Metrics:
    """Prometheus series per model version: requests by status, latency, generated tokens, batches."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tunewise_requests", "Requests answered", ["model", "version", "status"],
                                registry=self.registry)
        self.latency = Histogram("tunewise_request_seconds", "Time from request to the last token",
                                 ["model", "version"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.tokens = Counter("tunewise_generated_tokens", "Completion tokens generated", ["version"],
                              registry=self.registry)
        self.batch = Histogram("tunewise_batch_size", "Requests per generation batch", ["version"],
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32))
        self.queued = Gauge("tunewise_queued_requests", "Requests waiting for the model", registry=self.registry)

    def on_batch(self, key: str | None, size: int, seconds: float) -> None:
        self.batch.labels(key or BASE).observe(size)


def _completion_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


class Service:
    """What the handlers serve from, one per app: the engine, the router, the metrics, the key."""

    def __init__(self, base: str, adapters: dict[str, Path], *, registry=None, api_key: str | None = None,
                 max_batch: int = 8, trust_remote_code: bool = False) -> None:
        self.metrics = Metrics()
        self.engine = Engine(base, max_batch=max_batch, trust_remote_code=trust_remote_code,
                             on_batch=self.metrics.on_batch)
        self.router = Router(self.engine, base, dict(adapters), registry)
        self.metrics.queued.set_function(self.engine.pending)
        self.base, self.registry, self.api_key = base, registry, api_key
        self.created = int(time.time())

    def jobs_for(self, target: Target, body: Sampling, texts: list[str]) -> list[Job]:
        """The request's prompts as engine jobs, refused (400) when a text is not Unicode or too long."""
        engine, budget, field = self.engine, body.budget(), "messages" if isinstance(body, ChatRequest) else "prompt"
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON allows "\ud800"; no tokenizer does
                raise Refused(400, "the text holds a lone UTF-16 surrogate, which is not a character: send valid "
                              "Unicode", None, field) from None
        lengths = engine.render(target.key, lambda chat: [len(chat.ids(t)) for t in texts])
        for tokens in lengths:
            if engine.context and tokens + budget > engine.context:
                raise Refused(400, f"This model's maximum context length is {engine.context} tokens. However, you "
                              f"requested {tokens + budget} tokens ({tokens} in the prompt, {budget} in the "
                              "completion). Please reduce the length of the prompt or completion.",
                              "context_length_exceeded", field)
        tags = engine.render(target.key, lambda chat: chat.reasoning) if isinstance(body, ChatRequest) else None
        return [engine.submit(Job(target.key, text, budget, body.stops(), body.sampling(), body.seed,
                                  bool(body.stream), prompt_tokens=n, reasoning=tags,
                                  thinking=bool(tags) and text.rstrip().endswith(tags[0])))
                for text, n in zip(texts, lengths)]

    async def answer(self, body: Sampling, texts_of, kind: str):
        """Route, submit, then the whole answer or a stream of server-sent events."""
        started = time.perf_counter()
        target = await asyncio.to_thread(self.router.target, body.model)  # may load a registry version
        jobs = await asyncio.to_thread(lambda: self.jobs_for(target, body, texts_of(target)))
        if body.stream:
            return StreamingResponse(self.stream(jobs, body, target, kind, started), media_type="text/event-stream")
        try:
            results = [await asyncio.wrap_future(job.done) for job in jobs]
        except TunewiseError as err:  # the adapter was unloaded while the request waited
            self.observe(target, jobs, started, "503")
            raise Refused(503, err.message, "model_unloaded", "model") from None
        self.observe(target, jobs, started)
        choices = [_choice(kind, i, text, reason, job.reasoning) for i, ((text, reason), job) in
                   enumerate(zip(results, jobs))]
        return {"id": _completion_id("chatcmpl" if kind == "chat" else "cmpl"),
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": target.model, "choices": choices, "usage": _usage(jobs)}

    def observe(self, target: Target, jobs: list[Job], started: float, status: str = "200") -> None:
        metrics = self.metrics
        metrics.requests.labels(target.model, target.version, status).inc()
        metrics.latency.labels(target.model, target.version).observe(time.perf_counter() - started)
        metrics.tokens.labels(target.version).inc(sum(len(j.ids) for j in jobs))

    def stream(self, jobs: list[Job], body: Sampling, target: Target, kind: str, started: float):
        """Server-sent events, OpenAI's chunk format; a sync generator, which Starlette runs in a thread."""
        ident, made = _completion_id("chatcmpl" if kind == "chat" else "cmpl"), int(time.time())
        head = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": made, "model": target.model}

        def chunk(choices: list, usage: dict | None = None) -> str:
            return "data: " + json.dumps(head | {"choices": choices} | ({"usage": usage} if usage else {})) + "\n\n"

        [job] = jobs  # one prompt per streamed request (n is 1; a prompt list cannot stream)
        if kind == "chat":
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        splitter = ReasoningStream(job.reasoning, thinking=job.thinking) if kind == "chat" and job.reasoning else None
        while (delta := job.events.get()) is not None:
            if kind != "chat":
                yield chunk([{"index": 0, "text": delta, "finish_reason": None, "logprobs": None}])
                continue
            for piece in (splitter.feed(delta) if splitter else [{"content": delta}]):
                yield chunk([{"index": 0, "delta": piece, "finish_reason": None}])
        try:
            _, reason = job.done.result()
        except Exception as err:  # noqa: BLE001 - the stream has started: report inside it
            self.observe(target, jobs, started, "500")
            yield "data: " + json.dumps({"error": {"message": f"internal error ({type(err).__name__})",
                                                   "type": "server_error", "param": None, "code": None}}) + "\n\n"
            return
        self.observe(target, jobs, started)
        yield chunk([{"index": 0, "delta": {}, "finish_reason": reason} if kind == "chat"
                     else {"index": 0, "text": "", "finish_reason": reason, "logprobs": None}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], _usage(jobs))
        yield "data: [DONE]\n\n"


def _service(request: Request) -> Service:
    return request.app.state.service


# ---- handlers: plain functions of the request and the app's Service ----

async def require_key(request: Request, call_next):
    api_key, path = _service(request).api_key, request.url.path
    if path.startswith("/admin") and api_key is None:
        return error(403, "the admin endpoints need an API key: start the server with one (--api-key-env)",
                     "admin_disabled")
    if api_key is not None and path not in PUBLIC:
        refused = key_refusal(request, api_key)
        if refused is not None:
            return refused
    return await call_next(request)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc.errors()[0])


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    response = error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:  # Starlette names the first matching route's methods; name every route's
        methods = {m for r in request.app.routes if getattr(r, "methods", None)
                   and r.path_regex.match(request.url.path) for m in r.methods}
        response.headers["Allow"] = ", ".join(sorted(methods))
    return response


async def refused(request: Request, exc: Refused) -> JSONResponse:
    return error(exc.status, exc.message, exc.code, exc.param)


async def crash(request: Request, exc: Exception) -> JSONResponse:  # a bug in tunewise; uvicorn logs it
    return error(500, f"internal error ({type(exc).__name__}); the server log has the traceback")


def health() -> dict:
    return {"status": "ok"}


def prometheus(request: Request) -> Response:
    return Response(generate_latest(_service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def list_models(request: Request) -> dict:
    service = _service(request)
    data = [{"object": "model", "created": service.created, "owned_by": "tunewise", **row}
            for row in service.router.names()]
    return {"object": "list", "data": data}


async def chat(body: ChatRequest, request: Request):
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise Refused(400, "max_tokens and max_completion_tokens differ: send one of them", None, "max_tokens")
    service = _service(request)
    messages = [m.plain() for m in body.messages]

    def texts(target: Target) -> list[str]:
        try:
            return [service.engine.render(target.key, lambda chat: chat.prompt(messages))]
        except (TemplateError, TunewiseError) as err:  # e.g. a template that wants turns to alternate
            raise Refused(400, f"the chat template of '{target.model}' refuses these messages: {err}",
                          None, "messages") from None

    return await service.answer(body, texts, "chat")


async def completions(body: CompletionRequest, request: Request):
    if body.echo:
        raise Refused(400, "echo is not supported: send echo false or leave it out", "unsupported_value", "echo")
    prompts = body.prompts()
    if len(prompts) > MAX_PROMPTS or (body.stream and len(prompts) > 1):
        raise Refused(400, f"send at most {MAX_PROMPTS} prompts, and one prompt when streaming", None, "prompt")
    if any(not p for p in prompts):
        raise Refused(400, "prompt: an empty prompt has nothing to complete", None, "prompt")
    return await _service(request).answer(body, lambda target: prompts, "text")


# ---- admin: load and unload adapters at run time (an API key is required) ----

def admin_list(request: Request) -> dict:
    return _service(request).router.listing()


def admin_load(body: AdapterLoad, request: Request) -> dict:
    service = _service(request)
    if service.registry is None:
        raise Refused(400, "this server has no registry: adapters load from the registry's folder only",
                      "no_registry")
    if (body.version is None) == (body.path is None):
        raise Refused(400, "send either version (a registry version) or path (inside the registry folder)")
    if body.version is not None:
        return {"loaded": service.router.pin(body.name.split("@")[0], body.version).key}
    return {"loaded": service.router.load(body.name, _inside(Path(service.registry.root), body.path))}


def admin_unload(name: str, request: Request) -> dict:
    return {"unloaded": _service(request).router.unload(name)}


def admin_reload(request: Request) -> dict:
    router = _service(request).router
    router.refresh(force=True)
    return router.listing()


ROUTES = [("/health", health, "GET"), ("/metrics", prometheus, "GET"), ("/v1/models", list_models, "GET"),
          ("/v1/chat/completions", chat, "POST"), ("/v1/completions", completions, "POST"),
          ("/admin/adapters", admin_list, "GET"), ("/admin/adapters", admin_load, "POST"),
          ("/admin/adapters/{name}", admin_unload, "DELETE"), ("/admin/reload", admin_reload, "POST")]


def create_app(base: str, adapters: dict[str, Path] | None = None, *, registry=None, api_key: str | None = None,
               max_batch: int = 8, trust_remote_code: bool = False) -> FastAPI:
    """Load `base`, every adapter and the registry's routed versions (a TunewiseError for a bad
    one), then the app that serves them."""
    service = Service(base, dict(adapters or {}), registry=registry, api_key=api_key, max_batch=max_batch,
                      trust_remote_code=trust_remote_code)
    app = FastAPI(title="tunewise serve", version="1", docs_url=None, redoc_url=None)
    app.state.service, app.state.engine, app.state.router = service, service.engine, service.router
    app.middleware("http")(require_key)
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    for kind, handler in ((RequestValidationError, invalid), (HTTPException, http_error), (Refused, refused),
                          (Exception, crash)):
        app.add_exception_handler(kind, handler)
    for path, handler, method in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app


def _inside(root: Path, relative: str) -> Path:
    """`relative` under `root`, or a 400: no absolute paths, no '..', no symlink out of the folder."""
    root = root.resolve()
    try:
        candidate = (root / relative).resolve()
    except (ValueError, OSError) as err:  # a NUL byte, a name too long, a symlink loop
        raise Refused(400, f"path '{relative}' is not usable ({err})", "path_not_allowed", "path") from None
    if Path(relative).is_absolute() or not candidate.is_relative_to(root):
        raise Refused(400, f"path '{relative}' is outside the registry folder", "path_not_allowed", "path")
    return candidate


def _v(version) -> str | None:
    return f"{version.name}@v{version.version}" if version else None


def _usage(jobs: list[Job]) -> dict:
    prompt, completion = sum(j.prompt_tokens for j in jobs), sum(len(j.ids) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(kind: str, index: int, text: str, reason: str, tags: tuple[str, str] | None = None) -> dict:
    """A chat answer of a reasoning family comes as `content` (what evaluation scores) and
    `reasoning_content` (the block, as vLLM and DeepSeek's API return it)."""
    if kind == "chat":
        message = {"role": "assistant", "content": text}
        if tags:
            answer = split_reasoning(text, tags)
            message = {"role": "assistant", "content": answer.text} | (
                {"reasoning_content": answer.reasoning} if answer.reasoning else {})
        return {"index": index, "message": message, "finish_reason": reason, "logprobs": None}
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}


class ReasoningStream:
    """Streamed text of a reasoning family -> `reasoning_content` deltas while the block is open,
    `content` deltas after it, as the final answer splits (`split_reasoning`). Text that could
    still become the opening tag is held back until it is decided."""

    def __init__(self, tags: tuple[str, str], *, thinking: bool = False):
        self.opening, self.closing = tags
        self.text, self.sent = "", {"reasoning_content": 0, "content": 0}
        self.thinking = thinking  # the prompt opened the block: the output starts inside it

    def _parts(self) -> dict[str, str]:
        text, lead = self.text, self.text.lstrip()
        if self.closing in text:
            thought, answer = text.split(self.closing, 1)
            return {"reasoning_content": thought.replace(self.opening, "", 1).strip(), "content": answer.lstrip()}
        if self.thinking or lead.startswith(self.opening):
            thought = lead[len(self.opening):] if lead.startswith(self.opening) else text
            keep = next((k for k in range(len(self.closing) - 1, 0, -1) if thought.endswith(self.closing[:k])), 0)
            return {"reasoning_content": thought[: len(thought) - keep].lstrip(), "content": ""}
        if self.opening.startswith(lead):  # "", "<", "<thi": not decided yet
            return {"reasoning_content": "", "content": ""}
        return {"reasoning_content": "", "content": text}

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        pieces = []
        for field, text in self._parts().items():
            if len(text) > self.sent[field]:
                pieces.append({field: text[self.sent[field]:]})
                self.sent[field] = len(text)
        return pieces


def serve(base: str, adapters: dict[str, Path], *, registry=None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 8, trust_remote_code: bool = False,
          console: Console | None = None) -> None:
    """Load the models, then answer requests on http://host:port/v1 until Ctrl-C (blocking)."""
    import uvicorn

    console = console or Console()
    console.print(f"loading {base} and {len(adapters)} adapter(s) ...")
    app = create_app(base, adapters, registry=registry, api_key=api_key, max_batch=max_batch,
                     trust_remote_code=trust_remote_code)
    names = ", ".join(row["id"] for row in app.state.router.names())
    console.print(f"serving on http://{host}:{port}/v1 (models: {names}); metrics at /metrics")
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] {host} is reachable from other machines and no API key is set")
    uvicorn.run(app, host=host, port=port, log_level="info")
