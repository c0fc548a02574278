"""Experiment tracking: what MLflow, W&B and TensorBoard hold after a run, read back with their own readers."""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from rich.console import Console

from tests.helpers import write_manifest
from tunewise.config import Config, dump_config
from tunewise.errors import TunewiseError
from tunewise.runs import RunDir, atomic_write_json, read_json
from tunewise.settings import flat_config, track_settings
from tunewise.train.tracking import open_tracker

RUN_NAME = "20260101-120000-tiny"
ROWS = [
    {"step": 1, "epoch": 0.5, "train_loss": 2.0, "lr": 1e-4, "tokens": 512},
    {"step": 2, "epoch": 1.0, "train_loss": 1.5, "val_loss": 1.75, "lr": 2e-4, "tokens": 1024},
    {"step": 3, "epoch": 1.5, "train_loss": 1.25, "lr": 1.5e-4, "tokens": 1536},
    {"step": 4, "epoch": 2.0, "train_loss": 1.0, "val_loss": 1.125, "lr": 5e-5, "tokens": 2048},
]
SUMMARY = {"best_val_loss": 1.125, "best_step": 4, "steps": 4, "stopped": "completed"}


def make_config(track: str, **train) -> Config:
    return Config.model_validate({
        "task": {"name": "tiny-task"},
        "data": {"path": "/data/d.jsonl"},
        "train": {"seed": 7, **train},
        "track": track,
    })


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"


def make_run(runs: Path, config: Config) -> RunDir:
    """A run folder as the data stage and the train loop leave it: config, manifest, log, adapter."""
    run = RunDir(runs / RUN_NAME)
    run.root.mkdir(parents=True, exist_ok=True)
    run.config.write_text(dump_config(config), encoding="utf-8")
    write_manifest(run.manifest, "ds-3f2a9c")
    run.train_log.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    atomic_write_json(run.train_summary, SUMMARY)
    run.adapter.mkdir(exist_ok=True)
    (run.adapter / "adapter_config.json").write_text('{"r": 16}', encoding="utf-8")
    (run.adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return run


def train(config: Config, run: RunDir, rows=ROWS, fail: BaseException | None = None) -> str:
    """What the train loop (train_model) does with the tracker; returns what the console printed."""
    out = io.StringIO()
    console = Console(file=out, width=80)
    with open_tracker(track_settings(config), run, console) as tracker:
        for row in rows:
            tracker.log_metrics(row)
        if fail is not None:
            raise fail
        tracker.log_summary(SUMMARY, artifacts=[run.config, run.train_log, run.train_summary, run.adapter])
    return out.getvalue()


def mlflow_run(runs: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-task")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{RUN_NAME}'")
    assert len(found) == 1
    return client, found[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --- MLflow


def test_mlflow_run_holds_params_metrics_provenance_and_artifacts(runs):
    config = make_config("mlflow")
    run = make_run(runs, config)
    printed = train(config, run)

    client, found = mlflow_run(runs)
    run_id = found.info.run_id
    assert read_json(run.tracking)["mlflow"]["run_id"] == run_id
    assert found.info.status == "FINISHED"
    params = found.data.params
    assert params["train.seed"] == "7" and params["method"] == "lora" and params["track"] == "mlflow"
    assert params["data.path"] == "/data/d.jsonl" and params["lora.r"] == "16"
    assert json.loads(params["eval.block_on"]) == ["length_drift", "refusal", "forgetting"]
    assert set(params) == set(flat_config(config))
    assert history(client, run_id, "val_loss") == [(2, 1.75), (4, 1.125)]
    assert history(client, run_id, "train_loss") == [(1, 2.0), (2, 1.5), (3, 1.25), (4, 1.0)]
    assert history(client, run_id, "tokens")[-1] == (4, 2048.0)
    assert client.get_metric_history(run_id, "step") == []
    tags = found.data.tags
    assert tags["dataset_version"] == "ds-3f2a9c" and tags["seed"] == "7" and tags["method"] == "lora"
    assert tags["libraries.python"] == platform.python_version()
    assert tags["libraries.torch"] not in ("", "not installed")
    assert tags["run_dir"] == str(run.root.resolve())
    assert tags["summary.stopped"] == "completed"
    assert found.data.metrics["best_val_loss"] == 1.125
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "train_log.jsonl", "train_summary.json", "adapter"} <= top
    adapter = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert adapter == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert found.info.artifact_uri.startswith(str(runs.resolve() / "mlartifacts"))
    stored = Path(found.info.artifact_uri) / "config.yaml"
    assert stored.read_text(encoding="utf-8") == run.config.read_text(encoding="utf-8")
    assert f"mlflow ui --backend-store-uri sqlite:///{runs.resolve()}/mlflow.db" in printed
    assert "INFO" not in printed


def test_resume_continues_the_same_mlflow_run(runs):
    config = make_config("mlflow")
    run = make_run(runs, config)
    with pytest.raises(KeyboardInterrupt):
        train(config, run, ROWS[:2], fail=KeyboardInterrupt())
    client, first = mlflow_run(runs)
    assert first.info.status == "KILLED"

    resumed = make_config("mlflow", patience=5)  # a changed value cannot replace a logged param
    printed = train(resumed, run, ROWS[2:])
    client, found = mlflow_run(runs)
    assert found.info.run_id == first.info.run_id
    assert found.info.status == "FINISHED"
    assert history(client, found.info.run_id, "train_loss") == [(1, 2.0), (2, 1.5), (3, 1.25), (4, 1.0)]
    assert found.data.params["train.patience"] == "3"
    assert found.data.tags["config_changed_on_resume"] == "train.patience"
    assert "resumed run" in printed


def test_exception_in_training_marks_the_run_failed_and_propagates(runs):
    config = make_config("mlflow")
    run = make_run(runs, config)
    with pytest.raises(ValueError, match="loss is nan"):
        train(config, run, ROWS[:1], fail=ValueError("loss is nan"))
    client, found = mlflow_run(runs)
    assert found.info.status == "FAILED"
    assert history(client, found.info.run_id, "train_loss") == [(1, 2.0)]


def test_unreadable_store_is_a_clear_error_at_open(runs):
    config = make_config("mlflow")
    run = make_run(runs, config)
    (runs / "mlflow.db").write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(TunewiseError) as err:
        train(config, run)
    text = str(err.value)
    assert str(runs.resolve() / "mlflow.db") in text and "track: none" in text
    assert not (run.tracking).exists()


def test_store_failing_during_training_warns_once_and_training_goes_on(runs):
    config = make_config("mlflow")
    run = make_run(runs, config)
    out = io.StringIO()
    with open_tracker(track_settings(config), run, Console(file=out, width=80)) as tracker:
        tracker.log_metrics(ROWS[0])
        (runs / "mlflow.db").write_bytes(b"\xff" * 8192)  # the store breaks under the running training
        for row in ROWS[1:]:
            tracker.log_metrics(row)
        tracker.log_summary(SUMMARY, artifacts=[run.adapter])
        finished_training = True
    assert finished_training
    assert out.getvalue().count("warning: experiment tracking failed") == 1
    assert tracker.failed is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.integration
def test_mlflow_server_shows_the_run(runs, tmp_path):
    config = make_config("mlflow")
    run = make_run(runs, config)
    train(config, run)
    run_id = read_json(run.tracking)["mlflow"]["run_id"]

    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{runs.resolve()}/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not answer in 90 s"
                time.sleep(0.5)
        experiment = api(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny-task")["experiment"]
        found = api(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert [r["info"]["run_id"] for r in found] == [run_id]
        data = found[0]["data"]
        assert {p["key"]: p["value"] for p in data["params"]}["train.seed"] == "7"
        assert {m["key"]: m["value"] for m in data["metrics"]}["val_loss"] == 1.125
        assert found[0]["info"]["status"] == "FINISHED" and found[0]["info"]["run_name"] == RUN_NAME
        listed = api(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=adapter")
        assert {f["path"] for f in listed["files"]} == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


# --- W&B (offline)


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (a LevelDB-style log of wandb protobuf `Record`s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, payload, records = header, b"", []
    while pos + header <= len(data):
        room = block - pos % block
        if room < header:  # block trailer padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wandb_session(folder: Path) -> dict:
    """One offline session folder read back: run record, history by step, summary, artifacts, exit code."""
    records = {}
    for record in wandb_records(next(folder.glob("run-*.wandb"))):
        records.setdefault(record.WhichOneof("record_type"), []).append(record)
    key = lambda item: item.key or ".".join(item.nested_key)  # noqa: E731
    return {
        "run": records["run"][0].run,
        "history": {r.history.step.num: {key(i): json.loads(i.value_json) for i in r.history.item}
                    for r in records.get("history", [])},
        "summary": {key(i): json.loads(i.value_json) for r in records.get("summary", []) for i in r.summary.update},
        "artifacts": {r.artifact.name: r.artifact for r in records.get("artifact", [])},
        "exit_codes": [r.exit.exit_code for r in records["exit"]],
    }


def test_wandb_offline_run_holds_config_history_summary_and_resumes(runs, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("HOME", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    config = make_config("wandb")
    run = make_run(runs, config)
    with pytest.raises(ValueError):
        train(config, run, ROWS[:2], fail=ValueError("out of memory"))
    time.sleep(1 - time.time() % 1)  # session folders are named to the second; a real resume is never this quick
    printed = train(config, run, ROWS[2:])  # tunewise train --resume

    run_id = read_json(run.tracking)["wandb"]["run_id"]
    folders = sorted((run.root / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)  # one W&B run, two sessions
    assert f"wandb sync {run.root.resolve()}/wandb/offline-run-*-{run_id}" in printed
    first, second = (wandb_session(f) for f in folders)
    assert first["exit_codes"] == [1] and second["exit_codes"] == [0]
    assert first["run"].display_name == RUN_NAME and first["run"].project == "tiny-task"
    config_items = {i.key: json.loads(i.value_json) for i in first["run"].config.update}
    assert config_items["train.seed"] == 7 and config_items["dataset_version"] == "ds-3f2a9c"
    assert set(flat_config(config)) <= set(config_items)
    assert sorted(first["history"]) == [1, 2] and sorted(second["history"]) == [3, 4]
    assert first["history"][2]["val_loss"] == 1.75 and second["history"][4]["train_loss"] == 1.0
    assert "val_loss" not in second["history"][3]
    assert second["summary"]["best_val_loss"] == 1.125 and second["summary"]["stopped"] == "completed"
    model = second["artifacts"][f"{RUN_NAME}-adapter"]
    assert model.type == "model"
    assert {e.path for e in model.manifest.contents} == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    files = second["artifacts"][f"{RUN_NAME}-files"]
    assert {e.path for e in files.manifest.contents} == {"config.yaml", "train_log.jsonl", "train_summary.json"}


def test_bad_wandb_mode_is_a_clear_error_at_open(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = make_config("wandb")
    run = make_run(runs, config)
    with pytest.raises(TunewiseError) as err:
        train(config, run)
    assert "'bogus'" in str(err.value) and "fix: check WANDB_MODE" in str(err.value)
    assert not (run.tracking).exists()


# --- TensorBoard and none


def test_tensorboard_scalars_and_text_read_back(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config("tensorboard")
    run = make_run(runs, config)
    printed = train(config, run)

    logdir = run.root / "tensorboard"
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/val_loss")] == [(2, 1.75), (4, 1.125)]
    assert [e.step for e in events.Scalars("train/train_loss")] == [1, 2, 3, 4]
    assert events.Scalars("train/lr")[1].value == pytest.approx(2e-4)
    texts = {tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "seed: 7" in texts["config/text_summary"] and "dataset_version: ds-3f2a9c" in texts["provenance/text_summary"]
    assert "best_val_loss: 1.125" in texts["summary/text_summary"] and texts["status/text_summary"] == "FINISHED"
    assert f"tensorboard --logdir {logdir.resolve()}" in printed


def test_none_writes_nothing(runs):
    config = make_config("none")
    run = make_run(runs, config)
    before = sorted(runs.rglob("*"))
    printed = train(config, run)
    assert sorted(runs.rglob("*")) == before
    assert printed == ""

