"""A real local OpenAI-compatible HTTP server for tests, with scripted replies.

    with serve(lambda request: "hello", api_key="k", models=["judge"]) as base_url:
        ...  # base_url == "http://127.0.0.1:<port>/v1"
        base_url.requests  # every JSON body POSTed to /v1/chat/completions, in arrival order

FastAPI served by uvicorn in a background thread on a free port of 127.0.0.1. Supports
`POST /v1/chat/completions` (non-streaming) and `GET /v1/models`. With `api_key` set, a
request without `Authorization: Bearer <api_key>` gets OpenAI's 401 error body; with `models`
set, a request for any other model gets OpenAI's 404 `model_not_found`. The responder runs in
a worker thread per request, so it may sleep to simulate latency while others are served.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

Responder = Callable[[dict], str]


class BaseURL(str):
    """The server's base URL (ends in /v1), carrying the request bodies it has received."""

    requests: list[dict]


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def make_app(responder: Responder, requests: list[dict], *, api_key: str | None, models: list[str] | None) -> FastAPI:
    app = FastAPI()
    lock = threading.Lock()
    listed = list(models) if models else ["test-model"]

    def authorized(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    def unauthorized() -> JSONResponse:
        return _error(401, "Incorrect API key provided.", "invalid_api_key")

    @app.get("/v1/models")
    def list_models(request: Request):
        if not authorized(request):
            return unauthorized()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tests"} for m in listed]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    def chat(request: Request, body: dict):  # sync: FastAPI runs it in a worker thread
        with lock:
            requests.append(body)
        if not authorized(request):
            return unauthorized()
        model = body.get("model")
        if models is not None and model not in models:
            return _error(404, f"The model '{model}' does not exist or you do not have access to it.",
                          "model_not_found", "model")
        text = responder(body)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    return app


@contextmanager
def running(app, name: str = "the server") -> Iterator[str]:
    """Serve an ASGI `app` with uvicorn in a background thread on a free loopback port; yields
    the root URL (http://127.0.0.1:PORT)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serve(responder: Responder, api_key: str | None = None, *, models: list[str] | None = None) -> Iterator[BaseURL]:
    """Run the server for the duration of the block; yields its base URL (with `.requests`)."""
    requests: list[dict] = []
    with running(make_app(responder, requests, api_key=api_key, models=models), "the test OpenAI server") as root:
        url = BaseURL(f"{root}/v1")
        url.requests = requests
        yield url


def free_port() -> int:
    """A port nothing listens on (bound, then released): connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
