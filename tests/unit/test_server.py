"""tunewise serve over real HTTP: a tiny random llama with two LoRA adapters loaded at once.

Each served model must answer exactly what tunewise's own generation gives for the same model
(token for token), and every bad request must get OpenAI's error body with a 4xx status.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import openai
import pytest
import torch
from rich.console import Console

from tests.openai_server import running as run_app
from tunewise.deploy import check_adapter, create_app
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat, compute_dtype, load_model
from tunewise.models.generate import generate, generate_batch

KEY = "test-key"
MAX_TOKENS = 10
PROMPTS = [
    [{"role": "user", "content": "Package: zsh\nDescription: shell with lots of features"}],
    [{"role": "system", "content": "Reply with JSON."}, {"role": "user", "content": "Package: gimp"}],
    [{"role": "user", "content": "hi"}],
]
RAW = "Package: vim\nSection:"


def make_adapter(base_dir: Path, tokenizer, out: Path, seed: int) -> Path:
    """A LoRA adapter with random non-zero B matrices, so that it changes the model's outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_peft_model(load_model(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, tokenizer, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, tokenizer, adapters) -> dict[str, list[str]]:
    """Direct generation, no server: the same base and dtype, both adapters in one PeftModel."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(tiny_model_dir, dtype=compute_dtype()), adapters["a"],
                                      adapter_name="a")
    model.load_adapter(adapters["b"], adapter_name="b")

    chat = ChatFormat.build(tokenizer, model="tiny")

    def run() -> list[str]:
        return generate(model, chat, PROMPTS, max_new_tokens=MAX_TOKENS, batch_size=1,
                        console=Console(quiet=True), label="direct")

    def raw() -> str:  # /v1/completions: the prompt as it is, no chat template
        [ids] = generate_batch(model, chat, [RAW], max_new_tokens=MAX_TOKENS)
        return chat.text(ids.tolist())

    outputs = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        outputs[name] = run()
        outputs[f"{name}:raw"] = raw()
    with model.disable_adapter():
        outputs["base"] = run()
    return outputs


def running(app):
    """tunewise serve's app on a free loopback port (yields the root URL)."""
    return run_app(app, "tunewise serve")


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters) -> Iterator[str]:
    with running(create_app(str(tiny_model_dir), adapters, api_key=KEY)) as url:
        yield url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def request(url: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON body) of a raw GET, or POST of `body` as it is, valid JSON or not."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + path, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat(url: str, **fields) -> tuple[int, dict]:
    body = {"model": "a", "messages": PROMPTS[0], "max_tokens": MAX_TOKENS} | fields
    return request(url, "/v1/chat/completions", json.dumps(body).encode())


def test_models_lists_base_and_adapters(server):
    models = client(server).models.list().data
    assert [(m.id, getattr(m, "parent", None)) for m in models] == [("base", None), ("a", "base"), ("b", "base")]
    assert request(server, "/health", key=None) == (200, {"status": "ok"})  # no key needed


def test_outputs_equal_direct_generation_token_for_token(server, expected, tokenizer, tiny_model_dir):
    assert len({tuple(expected[n]) for n in ("a", "b", "base")}) == 3  # the adapters really change the outputs
    api = client(server)
    for name, outputs in [(n, expected[n]) for n in ("a", "b", "base")] + [(str(tiny_model_dir), expected["base"])]:
        for prompt, want in zip(PROMPTS, outputs):
            reply = api.chat.completions.create(model=name, messages=prompt, max_tokens=MAX_TOKENS, temperature=0)
            choice = reply.choices[0]
            assert choice.message.content == want, name
            assert reply.object == "chat.completion" and reply.model == name and choice.message.role == "assistant"
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            assert reply.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
            assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
            if choice.finish_reason == "length":
                assert reply.usage.completion_tokens == MAX_TOKENS
            else:
                assert choice.finish_reason == "stop" and reply.usage.completion_tokens <= MAX_TOKENS


def test_concurrent_requests_each_get_their_own_model(server, expected):
    api = client(server)
    jobs = [(name, i) for name in ("a", "base", "b") for i in range(len(PROMPTS))] * 2

    def one(job):
        name, i = job
        return api.chat.completions.create(model=name, messages=PROMPTS[i], max_tokens=MAX_TOKENS)

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(one, jobs))
    assert [r.choices[0].message.content for r in replies] == [expected[name][i] for name, i in jobs]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, expected):
    def rejected(status: int, code: tuple[int, dict], *words: str) -> dict:
        got, body = code
        assert got == status, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert all(w in err["message"] for w in words), err["message"]
        return err

    err = rejected(404, chat(server, model="nope"), "'nope'", "base", "a", "b")
    assert err["code"] == "model_not_found" and err["param"] == "model"
    rejected(401, request(server, "/v1/models", key="wrong"), "API key")
    rejected(401, request(server, "/v1/chat/completions", b"{}", key=None), "API key")
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    rejected(400, request(server, "/v1/chat/completions", b'{"model": "a", "messages": ['), "JSON")
    rejected(400, request(server, "/v1/chat/completions", b'["a"]'))
    assert rejected(400, chat(server, messages=[{"role": "robot", "content": "hi"}]))["param"] == "messages.0.role"
    assert rejected(400, chat(server, messages=[{"role": "user"}]))["param"] == "messages.0.content"
    assert rejected(400, chat(server, messages=[]))["param"] == "messages"
    assert rejected(400, chat(server, messages="hi"))["param"] == "messages"
    assert rejected(400, chat(server, temperature=3))["param"] == "temperature"
    assert rejected(400, chat(server, n=2))["param"] == "n"
    assert rejected(400, chat(server, max_tokens=0))["param"] == "max_tokens"
    assert rejected(400, chat(server, max_tokens=5000))["param"] == "max_tokens"
    rejected(413, request(server, "/v1/chat/completions", b" " * ((1 << 20) + 16)), "larger than")  # just over: no reset mid-send
    assert rejected(400, chat(server, logprobs=True), "logprobs")["code"] == "unsupported_parameter"
    rejected(400, chat(server, max_tokens=4000), "context length")  # the tiny llama has 512 positions
    rejected(404, request(server, "/v1/nothing-here"))
    assert rejected(400, request(server, "/v1/completions", json.dumps({"model": "a", "prompt": ""}).encode())
                    )["param"] == "prompt"
    assert rejected(400, request(server, "/v1/completions", json.dumps({"model": "a", "prompt": ["x", ""]}).encode()),
                    "empty")["param"] == "prompt"
    rejected(400, request(server, "/v1/completions", json.dumps({"model": "a", "prompt": "x", "echo": True}).encode()))
    rejected(400, request(server, "/admin/adapters", json.dumps({"name": "c", "path": "../a"}).encode()), "registry")
    status, body = chat(server, n=1, top_p=1, temperature=0.0, seed=3)  # defaults are accepted; still up
    assert status == 200 and body["choices"][0]["message"]["content"] == expected["a"][0]


def test_base_only_server(tiny_model_dir, expected):
    with running(create_app(str(tiny_model_dir), {})) as url:
        assert [m.id for m in client(url, key="any").models.list().data] == ["base"]
        reply = client(url, key="any").chat.completions.create(model="base", messages=PROMPTS[0],
                                                                 max_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == expected["base"][0]


def test_bad_adapters_are_clear_errors(tmp_path, tiny_model_dir, adapters):
    with pytest.raises(TunewiseError, match="no such folder"):
        check_adapter("x", tmp_path / "missing")
    with pytest.raises(TunewiseError, match="adapter_config.json"):
        check_adapter("x", tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(TunewiseError, match="pickle"):
        check_adapter("x", tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "adapter_config.json").write_text("[1]")
    with pytest.raises(TunewiseError, match="not a JSON object"):
        check_adapter("x", tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(TunewiseError, match="a PREFIX_TUNING adapter; the server batches LoRA"):
        check_adapter("x", tmp_path)
    with pytest.raises(TunewiseError, match="taken by the base"):
        create_app(str(tiny_model_dir), {"base": adapters["a"]})


def test_oversized_bodies_get_a_413_not_a_connection_reset(server):
    """The server reads an oversized body to its end before answering 413 (up to 8x the limit), so a
    client still sending gets the answer instead of a reset: declared lengths and chunked bodies."""
    import http.client
    from urllib.parse import urlsplit

    for size in ((1 << 20) + 1, 3 << 20, 3 << 20):
        got, body = request(server, "/v1/chat/completions", b" " * size)
        assert got == 413 and body["error"]["code"] == "request_too_large"
    host = urlsplit(server)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    try:
        chunks = (b" " * (1 << 16) for _ in range(24))  # 1.5 MiB, no Content-Length
        conn.request("POST", "/v1/chat/completions", body=chunks, encode_chunked=True,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        payload = response.read()
        assert response.status == 413 and json.loads(payload)["error"]["code"] == "request_too_large", payload[:300]
        valid = json.dumps({"model": "a", "messages": PROMPTS[0], "max_tokens": 2}).encode()
        conn.request("POST", "/v1/chat/completions", body=iter([valid[:10], valid[10:]]), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"]  # a chunked body under the limit
    finally:
        conn.close()
    assert request(server, "/v1/models")[0] == 200  # and it still serves


def test_streaming_gives_the_same_text_in_pieces(server, expected):
    api = client(server)
    for name in ("a", "b"):
        chunks = list(api.chat.completions.create(model=name, messages=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                  stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == expected[name][0] and len([p for p in pieces if p]) > 1
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish in (["stop"], ["length"])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_text_completions_and_stop_strings(server, expected):
    api = client(server)
    reply = api.completions.create(model="a", prompt=RAW, max_tokens=MAX_TOKENS)
    assert reply.choices[0].text == expected["a:raw"] and reply.object == "text_completion"
    many = api.completions.create(model="a", prompt=[RAW, RAW], max_tokens=MAX_TOKENS)
    assert [c.text for c in many.choices] == [expected["a:raw"]] * 2 and [c.index for c in many.choices] == [0, 1]
    full = expected["a"][0]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip() and stop in full
    cut = api.chat.completions.create(model="a", messages=PROMPTS[0], max_tokens=MAX_TOKENS, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(model="a", messages=PROMPTS[0], max_tokens=MAX_TOKENS, stop=stop,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.choices[0].message.content


def test_sampling_is_seeded_and_metrics_count_each_version(server, expected):
    api = client(server)
    runs = [api.chat.completions.create(model="b", messages=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=1.5,
                                        seed=7).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]  # same seed, same sample
    text = urllib.request.urlopen(urllib.request.Request(
        server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})).read().decode()
    count = [line for line in text.splitlines() if line.startswith('tunewise_requests_total{model="b",status="200",version="b"}')]
    assert count and float(count[0].split()[-1]) >= 2
    assert "tunewise_request_seconds_bucket" in text and "tunewise_batch_size" in text


def test_admin_needs_a_key_on_the_server(tiny_model_dir):
    with running(create_app(str(tiny_model_dir), {})) as url:
        status, body = request(url, "/admin/adapters", key=None)
        assert status == 403 and "API key" in body["error"]["message"]
