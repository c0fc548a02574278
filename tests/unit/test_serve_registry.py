"""tunewise serve with the adapter registry over real HTTP: routes, canary shares, promotion and
rollback taking effect without a restart, and the admin endpoints' path confinement."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import write_verdict
from tests.unit.test_server import KEY, MAX_TOKENS, PROMPTS, client, make_adapter, request, running
from tunewise.deploy import create_app
from tunewise.deploy.registry import Registry
from tunewise.errors import TunewiseError


def fake_run(root: Path, adapter: Path, decision: str) -> Path:
    """A run folder as the registry reads it: the adapter and a verdict."""
    import shutil

    root.mkdir(parents=True)
    shutil.copytree(adapter, root / "adapter")
    write_verdict(root / "verdict.json", decision)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tokenizer):
    root = tmp_path_factory.mktemp("reg")
    a = make_adapter(tiny_model_dir, tokenizer, root / "a", seed=1)
    b = make_adapter(tiny_model_dir, tokenizer, root / "b", seed=2)
    registry = Registry(root / "registry")
    registry.add("sec", fake_run(root / "run1", a, "SHIP"))
    registry.add("sec", fake_run(root / "run2", b, "DO NOT SHIP"))
    registry.promote("sec", 1)
    return registry, root


def answer(url: str, model: str = "sec") -> tuple[str, str]:
    reply = client(url).chat.completions.create(model=model, messages=PROMPTS[0], max_tokens=MAX_TOKENS)
    return reply.model, reply.choices[0].message.content


def test_canary_promote_and_rollback_follow_the_registry_without_restart(setup, tiny_model_dir):
    registry, root = setup
    with running(create_app(str(tiny_model_dir), {}, registry=registry, api_key=KEY)) as url:
        ids = [m.id for m in client(url).models.list().data]
        assert ids == ["base", "sec", "sec@v1"]
        v1 = answer(url)
        assert v1[0] == "sec@v1"
        assert answer(url, "sec@v2")[0] == "sec@v2"  # a version by number, loaded on first use
        v2 = answer(url, "sec@v2")
        assert v1[1] != v2[1]  # the two versions are different adapters

        with pytest.raises(TunewiseError, match="DO NOT SHIP"):
            registry.canary("sec", 2, 0.3)
        registry.canary("sec", 2, 0.3, force=True)
        seen = Counter(answer(url) for _ in range(40))
        assert set(seen) == {v1, v2}  # each version answers with its own adapter
        assert 3 <= seen[v2] <= 25  # ~30% of 40 (p > 0.999 for this band)
        metrics = urllib_get(url + "/metrics")
        for model, _ in seen:  # per-version request counts in Prometheus' text format
            line = f'tunewise_requests_total{{model="{model}",status="200",version="{model}"}}'
            assert any(row.startswith(line) and float(row.split()[-1]) >= seen[(model, _)]
                       for row in metrics.splitlines()), line

        registry.rollback("sec")  # drop the canary: all traffic to v1 again
        assert {answer(url) for _ in range(8)} == {v1}
        registry.promote("sec", 2, force=True)
        assert {answer(url) for _ in range(4)} == {v2}
        registry.rollback("sec")  # back to the previous promotion
        assert {answer(url) for _ in range(4)} == {v1}


def test_admin_loads_only_from_the_registry_folder(setup, tiny_model_dir):
    registry, root = setup
    with running(create_app(str(tiny_model_dir), {}, registry=registry, api_key=KEY)) as url:
        def post(body: dict) -> tuple[int, dict]:
            return request(url, "/admin/adapters", json.dumps(body).encode())

        status, body = post({"name": "x", "path": "../a"})
        assert status == 400 and body["error"]["code"] == "path_not_allowed"
        status, body = post({"name": "x", "path": str(root / "a")})  # absolute: refused too
        assert status == 400 and body["error"]["code"] == "path_not_allowed"
        assert request(url, "/admin/adapters", b"{}", key=None)[0] == 401
        status, body = post({"name": "sec", "version": 2})
        assert (status, body) == (200, {"loaded": "sec@v2"})
        folder = registry.path_of("sec", 2).relative_to(registry.root.resolve())
        assert post({"name": "copy", "path": str(folder)}) == (200, {"loaded": "copy"})
        assert answer(url, "copy")[1] == answer(url, "sec@v2")[1]
        status, body = request(url, "/admin/adapters", key=KEY)
        assert {"copy", "sec@v1", "sec@v2"} <= {a["name"] for a in body["adapters"]}
        assert body["routes"]["sec"]["current"] in ("sec@v1", "sec@v2")
        current = body["routes"]["sec"]["current"]
        status, body = delete(url, f"/admin/adapters/{current}")
        assert status == 409  # routed: roll back or promote first
        assert delete(url, "/admin/adapters/copy") == (200, {"unloaded": "copy"})
        assert request(url, "/v1/chat/completions", json.dumps(
            {"model": "copy", "messages": PROMPTS[0]}).encode())[0] == 404


def urllib_get(url: str) -> str:
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
    return urllib.request.urlopen(req, timeout=30).read().decode()


def delete(url: str, path: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {KEY}"}, method="DELETE")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
