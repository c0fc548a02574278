"""Client for any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, tunewise serve, ...).

One `openai.OpenAI` client is shared by `concurrency` worker threads; completions come back in
the prompts' order. Every failure a user can fix (wrong URL, server down, bad key, unknown
model, a request the server refuses) becomes a `TunewiseError` that names the URL and model.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

import openai
from rich.console import Console

from tunewise.data.records import Message
from tunewise.errors import TunewiseError
from tunewise.progress import progress_bar


@dataclass(frozen=True)
class Endpoint:
    """Where to send chat requests. `api_key` is the key itself (read from the environment by the caller)."""

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never printed
    timeout: float = 60.0
    concurrency: int = 4
    max_retries: int = 2

    def fingerprint(self) -> str:
        """Stable id of url + model for an output cache; never contains the key."""
        return f"openai-compatible:{self.url.rstrip('/')}#{self.model}"


def chat_many(
    endpoint: Endpoint,
    prompts: list[list[Message]],
    *,
    max_tokens: int,
    temperature: float = 0.0,
    console: Console,
    label: str,
    on_outputs: Callable[[dict[int, str]], None] | None = None,
) -> list[str]:
    """Completions in the prompts' order, `endpoint.concurrency` requests in flight; outputs stripped.
    `on_outputs({position: text})` gets each completion as it arrives (the cache stores it at once)."""
    client = _client(endpoint)
    outputs: list[str] = [""] * len(prompts)

    def one(i: int) -> tuple[int, str]:
        reply = client.chat.completions.create(
            model=endpoint.model, messages=prompts[i], max_tokens=max_tokens, temperature=temperature
        )
        content = reply.choices[0].message.content if reply.choices else None
        return i, (content or "").strip()

    with progress_bar(console) as progress, ThreadPoolExecutor(max(1, endpoint.concurrency)) as pool:
        task = progress.add_task(label, total=len(prompts), status="")
        futures = [pool.submit(one, i) for i in range(len(prompts))]
        try:
            for future in as_completed(futures):
                i, text = future.result()
                outputs[i] = text
                if on_outputs is not None:
                    on_outputs({i: text})
                progress.update(task, advance=1)
        except openai.APIError as err:
            for f in futures:
                f.cancel()
            user_error = explain(err, endpoint, client)
            if user_error is err:
                raise
            raise user_error from None
        except BaseException:  # Ctrl-C: do not wait for the queued requests
            for f in futures:
                f.cancel()
            raise
    return outputs


def _client(endpoint: Endpoint) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=endpoint.url,
        api_key=endpoint.api_key or "unused",
        timeout=endpoint.timeout,
        max_retries=endpoint.max_retries,
    )


def explain(err: openai.APIError, endpoint: Endpoint, client: openai.OpenAI | None = None) -> TunewiseError | openai.APIError:
    """The user-facing error for a failed request; an unexpected kind of failure is returned as is."""
    where = f"{endpoint.url} (model '{endpoint.model}')"
    if isinstance(err, openai.APITimeoutError):
        return TunewiseError(
            f"cannot reach {where}: no reply within {endpoint.timeout:g}s",
            fix="check the eval endpoint url and that the server runs; raise the endpoint timeout for a slow server",
        )
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err.__context__
        detail = f": {cause}" if cause else ""
        return TunewiseError(
            f"cannot reach {where}{detail}",
            fix="check the eval endpoint url (host, port, the /v1 suffix) and that the server runs",
        )
    if not isinstance(err, openai.APIStatusError):
        return err
    status, message = err.status_code, _server_message(err)
    if status in (401, 403):
        sent = "the API key sent was refused" if endpoint.api_key else "no API key was sent"
        return TunewiseError(
            f"{where} answered {status}: bad or missing API key ({sent}): {message}",
            fix="set the key in the environment variable named by api_key_env (the key itself never goes in the config)",
        )
    if status == 404:
        models = _list_models(client) if client is not None else None
        if models is not None:
            listed = ", ".join(models) if models else "(none)"
            return TunewiseError(
                f"model '{endpoint.model}' not found at {endpoint.url} ({message.rstrip('.')}); the server lists: {listed}",
                fix="set the eval endpoint model to one of the listed models",
            )
        return TunewiseError(
            f"{where} answered 404: {message}",
            fix="check the eval endpoint url (it usually ends in /v1) and the model name",
        )
    if 400 <= status < 500:
        return TunewiseError(
            f"{where} refused the request ({status}): {message}",
            fix="check the eval endpoint settings against what the server accepts",
        )
    return TunewiseError(
        f"{where} failed with {status} after {endpoint.max_retries} retries: {message}",
        fix="check the server's log; retry when it is healthy",
    )


def _server_message(err: openai.APIStatusError) -> str:
    body = err.body  # the openai client already unwraps {"error": {...}}
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if body.get(key):
                value = body[key]
                return value.get("message", str(value)) if isinstance(value, dict) else str(value)
    if body:
        return str(body)[:500]
    return err.message


def _list_models(client: openai.OpenAI) -> list[str] | None:
    """Model ids from GET /models, or None when the server does not answer that."""
    try:
        return sorted(m.id for m in client.models.list())
    except openai.OpenAIError:
        return None
