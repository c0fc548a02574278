"""The adapter registry on a real SQLite file: versions, the verdict rule, canary, rollback, safety.

Run folders are faked: a PEFT-like adapter folder (adapter_config.json + a safetensors file of a few
small tensors), tunewise.json provenance, a data manifest and a verdict.json. No model is loaded.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import train_summary, write_manifest, write_verdict, write_weights_record
from tunewise.deploy.registry import NO_SHIP, SHIP, Registry, Route, check_name, pick
from tunewise.errors import TunewiseError
from tunewise.runs import RunDir


def make_run(folder: Path, *, seed: int = 0, decision: str | None = SHIP, dataset: str | None = "ds-1111",
             manifest_version: str | None = None, weights: str = "safetensors", extra: dict[str, bytes] = {}) -> Path:
    """A fake run folder with an adapter whose weights depend on `seed`."""
    run = RunDir(folder)
    run.adapter.mkdir(parents=True)
    (run.root / "config.yaml").write_text("task: {name: fake}\n")
    (run.adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    (run.adapter / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    write_weights_record(run.adapter, dataset_version=dataset, train=train_summary(base="tiny-llama"))
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=gen),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2, generator=gen),
    }
    if weights == "safetensors":
        save_file(tensors, run.adapter / "adapter_model.safetensors")
    elif weights == "pickle":
        torch.save(tensors, run.adapter / "adapter_model.bin")
    elif weights == "renamed-pickle":
        torch.save(tensors, run.adapter / "adapter_model.safetensors")
    for name, data in extra.items():
        (run.adapter / name).write_bytes(data)
    if manifest_version is not None:
        run.data.mkdir()
        write_manifest(run.manifest, manifest_version)
    if decision is not None:
        write_verdict(run.verdict, decision, primary="exact_match", best="few_shot",
                      reason="few-shot prompting reaches 0.600 on exact_match; the fine-tune reaches 0.550"
                      if decision == NO_SHIP else "significant and at least the margin of 0.02.",
                      means={"finetuned": 0.8 if decision == SHIP else 0.55, "few_shot": 0.6, "zero_shot": 0.3})
    return folder


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"


def ship_versions(reg: Registry, runs: Path, name: str, n: int, decision: str = SHIP) -> None:
    for i in range(n):
        reg.add(name, make_run(runs / f"{name}-{i}", seed=i, decision=decision))


# --- add and list


def test_add_copies_adapter_and_records_run_and_verdict(reg, runs):
    run = make_run(runs / "r1", seed=1, extra={"training_args.bin": b"\x80\x04pickle", "optimizer.pt": b"x"})
    v1 = reg.add("sections", run)
    v2 = reg.add("sections", make_run(runs / "r2", seed=2, decision=NO_SHIP, dataset=None, manifest_version="ds-2222"))

    assert (v1.name, v1.version, v2.version) == ("sections", 1, 2)
    assert v1.run == str(run.resolve())
    assert (v1.dataset_version, v1.base, v1.decision) == ("ds-1111", "tiny-llama", SHIP)
    assert v1.primary_metric == "exact_match"
    assert (v1.finetuned, v1.best_baseline, v1.baseline) == (0.8, "few_shot", 0.6)
    assert v1.ships and not v2.ships
    assert v2.decision == NO_SHIP and "0.550" in v2.reason
    assert v2.dataset_version == "ds-2222"  # from data/manifest.json when the adapter's provenance lacks it

    # a copy inside the registry, with the safetensors weights intact and no pickle file
    folder = reg.path_of("sections", 1)
    assert folder == reg.root / "adapters" / "sections" / "v1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tunewise.json"]
    original = load_file(run / "adapter" / "adapter_model.safetensors")
    copied = load_file(folder / "adapter_model.safetensors")
    assert original.keys() == copied.keys()
    for key in original:
        torch.testing.assert_close(copied[key], original[key])
    assert list((reg.root / "tmp").iterdir()) == []  # the staging copy was renamed, nothing left behind

    assert [(v.name, v.version) for v in reg.versions()] == [("sections", 1), ("sections", 2)]
    assert reg.versions("sections") == [v1, v2]
    assert reg.names() == ["sections"]
    added = reg.history("sections")
    assert [(e.action, e.version) for e in added] == [("add", 2), ("add", 1)]  # newest first
    assert "left out optimizer.pt, training_args.bin" in added[1].detail
    assert added[0].who and added[0].at


def test_add_refuses_the_same_adapter_twice(reg, runs):
    run = make_run(runs / "r1", seed=1)
    reg.add("a", run)
    with pytest.raises(TunewiseError, match="already 'a' v1") as err:
        reg.add("a", run)
    assert "promote" in err.value.fix
    assert [v.version for v in reg.versions("a")] == [1]
    assert not (reg.root / "adapters" / "a" / "v2").exists()
    assert list((reg.root / "tmp").iterdir()) == []  # the refused copy was cleaned up


def test_run_without_verdict_is_added_without_decision(reg, runs):
    v = reg.add("a", make_run(runs / "r", decision=None))
    assert v.decision is None and v.finetuned is None and not v.ships


# --- names and paths


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "/abs", "A", "", ".hidden", "-x", "x@1", "a..b", "base",
                                 "x" * 65, "a b", "a\\b"])
def test_unsafe_names_are_refused(reg, runs, tmp_path, bad):
    run = make_run(runs / "r")
    with pytest.raises(TunewiseError, match="invalid adapter name"):
        reg.add(bad, run)
    with pytest.raises(TunewiseError, match="invalid adapter name"):
        reg.path_of(bad, 1)
    assert reg.versions() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry", "runs"]  # nothing written beside the root
    assert list((reg.root / "adapters").iterdir()) == []


def test_good_names_pass():
    for good in ("sections", "a", "support-bot.v2", "x_1", "9" * 64):
        assert check_name(good) == good


def tamper(reg: Registry, sql: str, args: tuple) -> None:
    with sqlite3.connect(reg.db) as con:
        con.execute(sql, args)


def test_path_tampered_to_outside_the_root_is_refused(reg, runs, tmp_path):
    reg.add("a", make_run(runs / "r"))
    outside = tmp_path / "outside"
    shutil.copytree(reg.path_of("a", 1), outside)  # a perfectly valid adapter, just not in the registry
    for stored in ("../outside", "adapters/../../outside", str(outside), "adapters"):
        tamper(reg, "UPDATE versions SET path = ? WHERE name = 'a'", (stored,))
        with pytest.raises(TunewiseError, match="outside the registry"):
            reg.path_of("a", 1)
        with pytest.raises(TunewiseError, match="outside the registry"):
            reg.resolve("a", 1)
        with pytest.raises(TunewiseError, match="outside the registry"):
            reg.promote("a", 1)
    assert reg.routes() == {}


def test_symlink_out_of_the_root_is_refused(reg, runs, tmp_path):
    reg.add("a", make_run(runs / "r"))
    folder = reg.path_of("a", 1)
    outside = tmp_path / "outside"
    shutil.move(folder, outside)
    folder.symlink_to(outside, target_is_directory=True)
    with pytest.raises(TunewiseError, match="outside the registry"):
        reg.resolve("a", 1)


def test_files_changed_after_add_are_refused(reg, runs):
    reg.add("a", make_run(runs / "r1", seed=1))
    reg.add("b", make_run(runs / "r2", seed=2))
    assert reg.resolve("a", 1).path == reg.root / "adapters" / "a" / "v1"

    (reg.path_of("a", 1) / "adapter_model.bin").write_bytes(b"\x80\x04evil pickle")
    with pytest.raises(TunewiseError, match="changed since it was added"):
        reg.resolve("a", 1)

    weights = reg.path_of("b", 1) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TunewiseError, match="changed since it was added"):
        reg.resolve("b", 1)


def test_pickle_only_adapter_is_refused(reg, runs):
    with pytest.raises(TunewiseError, match=r"no adapter_model.safetensors.*adapter_model.bin: pickle") as err:
        reg.add("a", make_run(runs / "r1", weights="pickle"))
    assert "safe_serialization=True" in err.value.fix
    with pytest.raises(TunewiseError, match="not a valid safetensors file"):
        reg.add("a", make_run(runs / "r2", weights="renamed-pickle"))
    with pytest.raises(TunewiseError, match="no adapter folder"):
        reg.add("a", runs / "nowhere")
    assert reg.names() == [] and reg.versions() == []
    assert list((reg.root / "adapters").iterdir()) == []
    assert not (reg.root / "tmp").exists() or list((reg.root / "tmp").iterdir()) == []


# --- unknown names and versions


def test_unknown_name_and_version_messages(reg, runs):
    with pytest.raises(TunewiseError, match="the registry is empty"):
        reg.promote("a")
    ship_versions(reg, runs, "alpha", 2)
    ship_versions(reg, runs, "beta", 1)
    with pytest.raises(TunewiseError, match="no adapter named 'gamma'.*known: alpha, beta") as err:
        reg.versions("gamma")
    assert "registry add" in err.value.fix
    with pytest.raises(TunewiseError, match="no adapter named 'gamma'.*known: alpha, beta"):
        reg.rollback("gamma")
    with pytest.raises(TunewiseError, match="'alpha' has no version 7; it has v1, v2"):
        reg.promote("alpha", 7)
    with pytest.raises(TunewiseError, match="'beta' has no version 3; it has v1\n"):
        reg.resolve("beta", 3)


# --- promote and the verdict rule


def test_promote_needs_a_ship_verdict_unless_forced(reg, runs):
    reg.add("a", make_run(runs / "good", seed=1, decision=SHIP))
    reg.add("a", make_run(runs / "bad", seed=2, decision=NO_SHIP))
    reg.add("a", make_run(runs / "none", seed=3, decision=None))

    assert reg.promote("a", 1).version == 1
    stamp = reg.stamp()
    with pytest.raises(TunewiseError, match="v2 has the verdict DO NOT SHIP: few-shot prompting reaches") as err:
        reg.promote("a", 2)
    assert "--force" in err.value.fix and "tunewise registry promote a 2 --force" in err.value.fix
    with pytest.raises(TunewiseError, match="v3 has no verdict"):
        reg.promote("a")  # newest is v3
    assert reg.route("a").current.version == 1 and reg.stamp() == stamp  # refusals wrote nothing

    assert reg.promote("a", 2, force=True).version == 2
    assert reg.route("a").current.version == 2
    last = reg.history("a", limit=1)[0]
    assert (last.action, last.version, last.forced) == ("promote", 2, True)
    assert "v1 -> v2" in last.detail and NO_SHIP in last.detail
    assert reg.promote("a", 3, force=True).version == 3


def test_promote_defaults_to_newest_and_clears_its_canary(reg, runs):
    ship_versions(reg, runs, "a", 3)
    assert reg.promote("a").version == 3
    reg.promote("a", 1)
    route = reg.canary("a", 2, 0.25)
    assert (route.current.version, route.canary.version, route.share) == (1, 2, 0.25)
    reg.promote("a", 2)
    route = reg.route("a")
    assert (route.current.version, route.canary, route.share) == (2, None, 0.0)
    assert "was the canary at 25%" in reg.history("a", limit=1)[0].detail


def test_promote_of_current_version_is_a_no_op(reg, runs):
    ship_versions(reg, runs, "a", 1)
    reg.promote("a")
    events, stamp = len(reg.history()), reg.stamp()
    assert reg.promote("a", 1).version == 1
    assert len(reg.history()) == events and reg.stamp() == stamp


# --- canary


def test_canary_routes_its_share(reg, runs):
    ship_versions(reg, runs, "a", 2)
    with pytest.raises(TunewiseError, match="no current version"):
        reg.canary("a", None, 0.1)
    reg.promote("a", 1)
    route = reg.canary("a", None, 0.1)  # the newest: v2
    assert (route.current.version, route.canary.version, route.share) == (1, 2, 0.1)
    assert reg.routes() == {"a": route}
    assert (route.role(1), route.role(2)) == ("current", "canary")

    for key, expected in [(0.0, 2), (0.05, 2), (0.0999, 2), (0.1, 1), (0.5, 1), (0.9999, 1)]:
        assert pick(route, key).version == expected, key

    rng = random.Random(1234)
    to_canary = sum(pick(route, rng.random()).version == 2 for _ in range(10_000))
    assert 900 <= to_canary <= 1100  # binomial(10000, 0.1): sd 30

    route = reg.canary("a", 2, 0.3)
    rng = random.Random(99)
    to_canary = sum(pick(route, rng.random()).version == 2 for _ in range(10_000))
    assert 2850 <= to_canary <= 3150
    assert "replaces canary v2 at 10%" in reg.history("a", limit=1)[0].detail


def test_canary_checks_share_version_and_verdict(reg, runs):
    ship_versions(reg, runs, "a", 1)
    reg.add("a", make_run(runs / "bad", seed=9, decision=NO_SHIP))
    reg.promote("a", 1)
    for share in (0, 1, 1.5, -0.1, float("nan"), True):
        with pytest.raises(TunewiseError, match="share must be between 0 and 1"):
            reg.canary("a", 2, share, force=True)
    with pytest.raises(TunewiseError, match="already the current version"):
        reg.canary("a", 1, 0.1)
    with pytest.raises(TunewiseError, match="DO NOT SHIP") as err:
        reg.canary("a", 2, 0.1)
    assert "--force" in err.value.fix
    assert reg.route("a").canary is None
    assert reg.canary("a", 2, 0.1, force=True).canary.version == 2
    assert reg.history("a", limit=1)[0].forced


def test_pick_without_current_or_with_a_bad_key(reg, runs):
    with pytest.raises(TunewiseError, match="no promoted version"):
        pick(Route("a", None, None, 0.0), 0.5)
    ship_versions(reg, runs, "a", 1)
    route = Route("a", reg.versions("a")[0], None, 0.0)
    assert pick(route, 0.0).version == 1
    for key in (-0.1, 1.0):
        with pytest.raises(ValueError):
            pick(route, key)


# --- rollback


def test_rollback_drops_the_canary_then_undoes_promotions(reg, runs):
    ship_versions(reg, runs, "a", 3)
    with pytest.raises(TunewiseError, match="nothing to roll back to: nothing is promoted"):
        reg.rollback("a")
    reg.promote("a", 1)
    with pytest.raises(TunewiseError, match="nothing to roll back to: v1 is the only version promoted"):
        reg.rollback("a")
    reg.promote("a", 2)
    reg.canary("a", 3, 0.1)

    route = reg.rollback("a")  # the canary goes first: all traffic back to the current version
    assert (route.current.version, route.canary, route.share) == (2, None, 0.0)
    assert all(pick(route, k / 100).version == 2 for k in range(100))
    route = reg.rollback("a")  # then the last promotion
    assert (route.current.version, route.canary) == (1, None)
    with pytest.raises(TunewiseError, match="nothing to roll back to"):
        reg.rollback("a")

    # the promotion history is a stack: promote 2, 3, rollback -> 2, promote 3, rollback -> 2, rollback -> 1
    reg.promote("a", 2)
    reg.promote("a", 3)
    assert reg.rollback("a").current.version == 2
    reg.promote("a", 3)
    assert reg.rollback("a").current.version == 2
    assert reg.rollback("a").current.version == 1

    actions = [(e.action, e.version) for e in reversed(reg.history("a"))]
    assert actions[3:9] == [("promote", 1), ("promote", 2), ("canary", 3), ("rollback", 2), ("rollback", 1),
                            ("promote", 2)]
    assert "canary v3 dropped" in reg.history("a")[-7].detail


def test_rollback_refuses_a_tampered_target(reg, runs):
    ship_versions(reg, runs, "a", 2)
    reg.promote("a", 1)
    reg.promote("a", 2)
    tamper(reg, "UPDATE versions SET path = '../../etc' WHERE name = 'a' AND version = 1", ())
    with pytest.raises(TunewiseError, match="outside the registry"):
        reg.rollback("a")
    assert reg.route("a").current.version == 2


# --- concurrency: the stamp and a second process


def test_stamp_changes_on_every_write_and_a_second_registry_sees_it(reg, runs):
    other = Registry(reg.root)  # another process's view: its own connections to the same file
    seen = [other.stamp()]

    def wrote() -> int:
        now = other.stamp()
        assert now != seen[-1], "stamp did not change after a write"
        seen.append(now)
        return now

    ship_versions(reg, runs, "a", 2)
    wrote()
    reg.promote("a", 1)
    wrote()
    assert other.routes()["a"].current.version == 1
    reg.canary("a", 2, 0.1)
    wrote()
    stamp, routes = other.snapshot()
    assert stamp == seen[-1] and routes["a"].canary.version == 2
    reg.rollback("a")
    wrote()
    assert other.routes()["a"].canary is None

    # reads and refused writes leave it alone
    reg.versions(), reg.routes(), reg.history(), reg.resolve("a", 1)
    with pytest.raises(TunewiseError):
        reg.rollback("a")
    with pytest.raises(TunewiseError):
        reg.canary("a", 2, 2.0)
    assert other.stamp() == seen[-1]


def test_concurrent_writers_get_distinct_versions(reg, runs):
    folders = [make_run(runs / f"r{i}", seed=i) for i in range(8)]
    errors: list[BaseException] = []
    reads: list[int] = []

    def writer(part: list[Path]) -> None:
        mine = Registry(reg.root)
        try:
            for folder in part:
                mine.add("a", folder)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    def reader() -> None:
        mine = Registry(reg.root)
        try:
            for _ in range(50):
                reads.append(mine.snapshot()[0])
                reads.append(mine.stamp())  # its kept connection sees each new commit
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(folders[i::4],)) for i in range(4)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = reg.versions("a")
    assert [v.version for v in versions] == list(range(1, 9))
    assert len({v.sha256 for v in versions}) == 8
    assert {Path(v.run).name for v in versions} == {f"r{i}" for i in range(8)}
    assert reads == sorted(reads)  # one reader never sees the stamp go backwards
    assert Registry(reg.root).stamp() == reg.stamp() >= 8
    for v in versions:
        reg.resolve("a", v.version)  # every copy complete and matching its digest


# --- the database itself


def test_schema_wal_foreign_keys_and_version(reg, runs, tmp_path, monkeypatch):
    ship_versions(reg, runs, "a", 1)
    with sqlite3.connect(reg.db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == 1
        con.execute("PRAGMA foreign_keys = ON")
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("UPDATE adapters SET current = 5 WHERE name = 'a'")  # no such version
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("UPDATE adapters SET current = 1, canary = 1, share = 0.1 WHERE name = 'a'")
    tamper(reg, "UPDATE meta SET value = 99 WHERE key = 'schema_version'", ())
    with pytest.raises(TunewiseError, match="schema version 99, newer"):
        Registry(reg.root)

    monkeypatch.setenv("TUNEWISE_HOME", str(tmp_path / "home"))
    assert Registry.default().root == (tmp_path / "home" / "registry").resolve()
