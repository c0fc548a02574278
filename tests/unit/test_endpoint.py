"""chat_many against a real local OpenAI-compatible server: order, concurrency, and clear errors."""

from __future__ import annotations

import io
import random
import threading
import time

import pytest
from rich.console import Console

from tests.openai_server import free_port, serve
from tunewise.errors import TunewiseError
from tunewise.evaluate.endpoint import Endpoint, chat_many


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def ask(endpoint: Endpoint, texts: list[str]) -> list[str]:
    prompts = [[{"role": "user", "content": t}] for t in texts]
    return chat_many(endpoint, prompts, max_tokens=8, console=quiet(), label="test")


def test_order_preserved_with_concurrent_requests():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def echo(request: dict) -> str:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(random.uniform(0.0, 0.05))
        with lock:
            in_flight -= 1
        return f"  echo {request['messages'][-1]['content']}\n"

    with serve(echo) as url:
        assert url.endswith("/v1")
        endpoint = Endpoint(url=url, model="test-model", concurrency=4, max_retries=0)
        texts = [f"id-{i}" for i in range(24)]
        out = ask(endpoint, texts)
        assert out == [f"echo id-{i}" for i in range(24)]  # order kept, whitespace stripped
        assert len(url.requests) == 24
        body = url.requests[0]
        assert body["model"] == "test-model" and body["max_tokens"] == 8 and body["temperature"] == 0.0
    assert peak > 1  # requests really overlapped


def test_bad_or_missing_key_is_a_clear_error():
    with serve(lambda r: "ok", api_key="right-key") as url:
        assert ask(Endpoint(url=url, model="m", api_key="right-key"), ["hi"]) == ["ok"]
        for key in ("wrong-key", None):
            with pytest.raises(TunewiseError) as err:
                ask(Endpoint(url=url, model="m", api_key=key, max_retries=0), ["hi"])
            text = str(err.value)
            assert "API key" in text and url in text and "'m'" in text
            assert "api_key_env" in text
            assert "wrong-key" not in text  # the key itself is never printed


def test_unreachable_server_is_cannot_reach():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(TunewiseError) as err:
        ask(Endpoint(url=url, model="m", max_retries=0, timeout=5), ["hi"])
    assert "cannot reach" in str(err.value) and url in str(err.value)
    assert err.value.fix and "url" in err.value.fix


def test_unknown_model_lists_the_servers_models():
    with serve(lambda r: "ok", models=["judge-a", "judge-b"]) as url:
        with pytest.raises(TunewiseError) as err:
            ask(Endpoint(url=url, model="nope", max_retries=0), ["hi"])
    text = str(err.value)
    assert "'nope'" in text and "not found" in text and "judge-a, judge-b" in text


def test_fingerprint_names_url_and_model_never_the_key():
    a = Endpoint(url="http://h:1/v1/", model="m", api_key="secret")
    b = Endpoint(url="http://h:1/v1", model="m", api_key="other", concurrency=9)
    assert a.fingerprint() == b.fingerprint()
    assert "secret" not in a.fingerprint() and "secret" not in repr(a)
    assert a.fingerprint() != Endpoint(url="http://h:1/v1", model="m2").fingerprint()
