"""Every method trains the embedded SmolLM2-135M-Instruct (a few steps on the demo task) and its
artifact loads in the reference library; the default tracker, MLflow, holds the run."""

import json
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tunewise.config import dump_config, load_config
from tunewise.runs import RunDir, read_json

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "src" / "tunewise" / "examples" / "debian-sections"
QUIET = Console(quiet=True)
REFUSALS = ("I'm sorry, I can't classify this package.", "I am not sure which section this package belongs to.",
            "This package could be in several sections; please check the Debian archive.")


def prepared(root: Path, pairs: bool) -> RunDir:
    from tunewise.pipeline import start_run

    rows = [json.loads(line) for line in (EXAMPLE / "packages.jsonl").read_text().splitlines()][:40]
    if pairs:
        rng = random.Random(0)
        rows = [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
                 "rejected": rng.choice(REFUSALS)} for r in rows]  # the behavior to unlearn: not answering
    root.mkdir(parents=True)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = (EXAMPLE / "tunewise.yaml").read_text().replace("path: packages.jsonl", "path: data.jsonl")
    (root / "tunewise.yaml").write_text(config)
    overrides = ["train.epochs=1", "train.batch_size=8", "train.evals_per_epoch=1", "train.lr=null",
                 "data.semantic_threshold=null", "data.near_dup_threshold=null", "track=none",
                 f"method={'dpo' if pairs else 'lora'}"]
    run, _ = start_run(root / "tunewise.yaml", overrides, root / "runs", QUIET)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, RunDir]:
    root = tmp_path_factory.mktemp("methods")
    return {"chats": prepared(root / "chats", False), "pairs": prepared(root / "pairs", True)}


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "full", "prompt_tuning", "dpo", "orpo"])
def test_method_trains_the_embedded_model(method, runs, embedded_path, tmp_path):
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunewise.settings import track_settings, train_settings
    from tunewise.train.loop import train_model

    source = runs["pairs" if method in ("dpo", "orpo") else "chats"]
    run = RunDir(Path(shutil.copytree(source.root, tmp_path / "runs" / method)))
    track = "mlflow" if method == "lora" else "none"
    # the preference methods' default lr (5e-5, 1e-4) moves a DPO loss little in 4 steps: 10x here
    lr = {"dpo": ["train.lr=5e-4"], "orpo": ["train.lr=1e-3"]}.get(method, [])
    run.config.write_text(dump_config(load_config(run.config, [f"method={method}", f"track={track}", *lr])))
    config = load_config(run.config)
    summary = train_model(run, train_settings(config), QUIET, track_settings(config))

    assert summary.method == method and summary.steps >= 3
    log = [json.loads(line) for line in run.train_log.read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in log if "train_loss" in r)
    assert summary.best_val_loss < summary.first_val_loss  # a few steps already help on held-out rows
    ids = torch.tensor([[1, 4093, 28, 1345, 30, 2]])
    base = AutoModelForCausalLM.from_pretrained(embedded_path).eval()
    with torch.no_grad():
        reference = base(ids).logits
        if method == "full":
            logits = AutoModelForCausalLM.from_pretrained(run.adapter).eval()(ids).logits
        else:
            logits = PeftModel.from_pretrained(base, run.adapter).eval()(input_ids=ids).logits[:, -ids.shape[1]:]
    assert (logits - reference).abs().max() > 1e-3

    if track == "mlflow":  # the default tracker: the run, its params and per-step metrics are in the store
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{run.root.parent / 'mlflow.db'}")
        (tracked,) = client.search_runs([client.get_experiment_by_name("debian-sections").experiment_id])
        assert tracked.data.params["method"] == "lora" and tracked.info.status == "FINISHED"
        history = sorted(client.get_metric_history(tracked.info.run_id, "val_loss"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [
            (r["step"], pytest.approx(r["val_loss"])) for r in log if "val_loss" in r]
        assert tracked.data.tags["dataset_version"] == read_json(run.manifest)["version"]
