"""tunewise serve against its own OpenAPI schema: schemathesis finds no 5xx.

schemathesis reads /openapi.json from the app (behind the bearer key) and, for every operation,
sends its coverage cases (boundary values, missing and wrong-typed fields, unexpected methods)
and FUZZED generated ones, valid and invalid, in process (ASGI); no answer may be a 5xx, and a
JSON answer must match the response schema. The app serves the tiny random llama with two LoRA
adapters and an empty registry, so the admin endpoints run their registry paths too. The fuzzed
examples are random (Hypothesis' default): a failure prints a curl line that reproduces it.

Two edits keep the requests that reach the model fast and useful. Both are made before the call,
and `case.meta` is re-read after them, so schemathesis judges the request that is really sent:
- a string `model` is swapped, by a stable hash of the body, for an adapter, the base, or kept
  as generated (an unknown name: the 404 and registry-version paths), so generation runs;
- a valid token budget (<= MAX_TOKENS) becomes at most BUDGET tokens, and a body without one
  gets one (the default budget is 256 tokens).

schemathesis' other default checks, and why they are off here:
- status_code_conformance: the server answers as OpenAI does (400 for a bad body where the
  generated schema says 422; 401, 404 for an unknown model, 405, 413), none of it in the schema;
- content_type_conformance: a stream is text/event-stream, the schema names application/json;
- positive_data_acceptance: valid by the schema is not enough (an unknown model is a 404);
- negative_data_rejection: pydantic's lax mode accepts `"max_tokens": "4"`, `"stream": "false"`,
  `"seed": false`, `"echo": 0` (coerced), where OpenAI answers 400;
- unsupported_method and allow_header_conformance: their own test below (a 405 carries `Allow`
  with every method of the path), so that they do not stop the search for 5xx at the first
  unexpected-method case of every operation.

The 500s found while this file was written are replayed as fixed requests (EDGES and the test
after it), since a bounded random search finds each of them only now and then.
"""

from __future__ import annotations

import json
import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.unit.test_server import KEY, make_adapter
from tunewise.deploy import create_app
from tunewise.deploy.registry import Registry
from tunewise.deploy.server import MAX_TOKENS

AUTH = {"Authorization": f"Bearer {KEY}"}
BUDGET = 4  # tokens a generated request may ask the model for
MODELS = ("a", "b", "base", None)  # None: the generated name, as it is
FUZZED = 50  # generated examples per operation, on top of the coverage cases
HELLO = [{"role": "user", "content": "hi"}]

CONFIG = {
    "headers": AUTH,
    "generation": {"mode": "all", "max-examples": FUZZED},
    "phases": {"examples": {"enabled": False}, "coverage": {"enabled": True},
               "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
    "checks": {
        "not_a_server_error": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
        "status_code_conformance": {"enabled": False},
        "content_type_conformance": {"enabled": False},
        "positive_data_acceptance": {"enabled": False},
        "negative_data_rejection": {"enabled": False},
        "unsupported_method": {"enabled": False},
        "allow_header_conformance": {"enabled": False},
    },
}


@pytest.fixture(autouse=True)
def _nodeid(request):
    """schemathesis 4.32 renames the running test through `node._nodeid`, which pytest 9.2 no
    longer has (it is `node._id` there); without it the parametrized test fails at once."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir, tokenizer):
    root = tmp_path_factory.mktemp("schema")
    return {name: make_adapter(tiny_model_dir, tokenizer, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


def serve(tiny_model_dir, adapters, registry_root):
    """The app and its schema, as schemathesis loads it (with the key)."""
    app = create_app(str(tiny_model_dir), adapters, registry=Registry(registry_root), api_key=KEY, max_batch=4)
    return app, schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict(CONFIG),
                                               headers=AUTH)


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir, adapters):
    app, schema = serve(tiny_model_dir, adapters, tmp_path_factory.mktemp("registry"))
    yield schema
    app.state.engine.close()


schema = schemathesis.pytest.from_fixture("api")


def shrink(body: dict) -> None:
    """The edits described at the top, in place."""
    if isinstance(body.get("model"), str):
        model = MODELS[zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()) % len(MODELS)]
        body["model"] = model or body["model"]
    budgets = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
    for k in budgets:
        value = body[k]
        if isinstance(value, int) and not isinstance(value, bool) and BUDGET < value <= MAX_TOKENS:
            body[k] = BUDGET
    if not budgets and ("messages" in body or "prompt" in body):
        body["max_tokens"] = BUDGET


def test_openapi_schema_is_served_behind_the_key(api):
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
            "/admin/adapters"} <= set(api.raw_schema["paths"])


@schema.parametrize()
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    if isinstance(case.body, dict):
        shrink(case.body)
        case.meta  # noqa: B018 - re-validates the edited body, so the checks judge what is sent
    case.call_and_validate()


# ---- requests that schemathesis (or a reading of the code) found answered with a 500, replayed ----

CHAT, TEXT, ADMIN = "/v1/chat/completions", "/v1/completions", "/admin/adapters"
EDGES = {
    "temperature so small that logits / temperature overflow": (
        CHAT, {"model": "a", "messages": HELLO, "max_tokens": BUDGET, "temperature": 1e-129}),
    "seed beyond 64 bits with sampling": (
        CHAT, {"model": "a", "messages": HELLO, "max_tokens": BUDGET, "temperature": 1, "seed": 2**70}),
    "registry version whose number is a unicode digit": (CHAT, {"model": "x@v\u00b2", "messages": HELLO}),
    "lone surrogate in a message": (
        CHAT, {"model": "a", "messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": BUDGET}),
    "lone surrogate in a prompt": (TEXT, {"model": "base", "prompt": "hi \ud800", "max_tokens": BUDGET}),
    "NUL in an admin path": (ADMIN, {"name": "new", "path": "a\u0000b"}),
}


@pytest.mark.parametrize("path, body", list(EDGES.values()), ids=list(EDGES))
def test_edge_requests_are_not_server_errors(api, path, body):
    response = api[path]["POST"].Case(body=body).call(headers=AUTH)
    assert response.status_code in (200, 400, 404), response.text


def test_base_still_answers_after_every_adapter_is_unloaded(tmp_path, tiny_model_dir, adapters):
    app, own = serve(tiny_model_dir, adapters, tmp_path / "registry")  # its own app: this one unloads
    try:
        for name in adapters:
            unload = own["/admin/adapters/{name}"]["DELETE"].Case(path_parameters={"name": name})
            assert unload.call(headers=AUTH).status_code == 200
        response = own[CHAT]["POST"].Case(body={"model": "base", "messages": HELLO, "max_tokens": BUDGET}).call(
            headers=AUTH)
        assert response.status_code == 200, response.text
    finally:
        app.state.engine.close()


def test_method_not_allowed_names_every_allowed_method(api):
    """RFC 9110: a 405 carries `Allow`, listing every method the path serves (schemathesis'
    unsupported_method and allow_header_conformance checks, for every path of the schema)."""
    wrong = {}
    for path, methods in api.raw_schema["paths"].items():
        documented = {m.upper() for m in methods if m != "parameters"}
        names = {part[1:-1]: "x" for part in path.split("/") if part.startswith("{")}
        response = api[path][next(iter(methods))].Case(method="TRACE", path_parameters=names).call(headers=AUTH)
        allowed = {m.strip().upper() for v in response.headers.get("allow", []) for m in v.split(",") if m.strip()}
        if response.status_code != 405 or not documented <= allowed:
            wrong[path] = f"{response.status_code}, Allow: {sorted(allowed)}, documented: {sorted(documented)}"
    assert not wrong, wrong
