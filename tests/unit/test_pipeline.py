"""The real entry point on a tiny random llama: artifacts load in the reference libraries."""

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tunewise.pipeline import resume_pipeline, run_pipeline
from tunewise.runs import read_json


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from tests.helpers import label_rows, write_jsonl

    root = tmp_path_factory.mktemp("project")
    write_jsonl(root / "data.jsonl", label_rows(80))
    (root / "tunewise.yaml").write_text(
        f"task: {{name: tiny, system_prompt: Reply with JSON.}}\n"
        f"data: {{path: data.jsonl, near_dup_threshold: null, semantic_threshold: null}}\n"
        f"model: {{base: {tiny_model_dir}}}\n"
        "train: {epochs: 3, batch_size: 8, lr: 0.01}\n"
        "eval: {max_new_tokens: 8, bootstrap_samples: 200}\n"
    )
    run, verdict = run_pipeline(root / "tunewise.yaml", [], root / "runs", Console(quiet=True))
    return run, verdict, tiny_model_dir


def test_run_writes_every_stage_artifact(finished_run):
    run, verdict, _ = finished_run
    for path in [run.config, run.manifest, run.decision, run.train_log, run.verdict, run.report,
                 run.adapter / "adapter_config.json", run.adapter / "adapter_model.safetensors"]:
        assert path.exists(), path
    for arm in ("zero_shot", "few_shot", "retrieved_few_shot", "finetuned"):
        rows = [json.loads(line) for line in run.predictions(arm).read_text().splitlines()]
        assert len(rows) == 8 and all("output" in r and "scores" in r for r in rows)
        assert read_json(run.metrics(arm))["primary"] == "json_exact"
    assert verdict["decision"] in ("SHIP", "DO NOT SHIP") and verdict["n_items"] == 8
    assert set(verdict["means"]) == {"zero_shot", "few_shot", "retrieved_few_shot", "finetuned"}
    retrieved = [json.loads(line) for line in run.predictions("retrieved_few_shot").read_text().splitlines()]
    train_sources = {json.loads(line)["source"] for line in run.split("train").read_text().splitlines()}
    assert all(len(r["shots"]) == 3 and set(r["shots"]) <= train_sources for r in retrieved)
    assert (run.index / "train_embeddings.npy").exists()
    assert read_json(run.status)["state"] == "complete"
    assert set(read_json(run.status)["timings"]) >= {"data", "baseline", "train", "evaluate", "verdict"}
    # 64 training examples, fewer than 200: the decide stage warns
    assert any("fewer than 200" in w for w in read_json(run.decision)["warnings"])
    html = run.report.read_text()
    assert verdict["decision"] in html and "data:image/png;base64," in html and "few_shot" in html
    provenance = json.loads((run.adapter / "tunewise.json").read_text())
    assert provenance["dataset_version"] == read_json(run.manifest)["version"]


def test_adapter_loads_in_plain_peft_and_only_lora_weights_changed(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _, tiny = finished_run
    base = AutoModelForCausalLM.from_pretrained(tiny)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, run.adapter)
    lora = load_file(run.adapter / "adapter_model.safetensors")
    assert lora and all("lora_" in k for k in lora)
    # LoRA B starts at zero: a trained adapter has moved it
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            original = reference[name.replace(".base_layer", "")]
            torch.testing.assert_close(tensor, original, rtol=0, atol=0)
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        tuned = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
    assert (tuned - plain).abs().max() > 1e-3


def test_validation_loss_fell_and_best_checkpoint_is_kept(finished_run):
    run, _, _ = finished_run
    rows = [json.loads(line) for line in run.train_log.read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    summary = read_json(run.train_summary)
    assert summary["best_val_loss"] == min(vals) < vals[0]
    assert json.loads((run.adapter / "tunewise.json").read_text())["train"]["best_step"] == summary["best_step"]


def test_resume_skips_finished_stages_and_reruns_a_missing_one(finished_run):
    run, verdict, _ = finished_run
    stamp = run.metrics("finetuned").stat().st_mtime_ns
    run.report.unlink()
    _, again = resume_pipeline(run.root, Console(quiet=True))
    assert run.report.exists() and again == verdict
    assert run.metrics("finetuned").stat().st_mtime_ns == stamp


def test_interrupted_run_is_marked_and_resumes(tmp_path, make_project, monkeypatch):
    from tunewise import pipeline

    config = make_project()
    run, cfg = pipeline.start_run(config, [], tmp_path / "runs", Console(quiet=True))

    def interrupted(*_):
        raise KeyboardInterrupt

    real = pipeline.STAGES["train"]
    monkeypatch.setitem(pipeline.STAGES, "train", (interrupted, real[1]))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stages(run, cfg, Console(quiet=True))
    status = read_json(run.status)
    assert (status["state"], status["stage"]) == ("interrupted", "train")
    assert not run.verdict.exists() and run.metrics("few_shot").exists()
    monkeypatch.setitem(pipeline.STAGES, "train", real)
    _, verdict = resume_pipeline(run.root, Console(quiet=True))
    assert verdict["decision"] in ("SHIP", "DO NOT SHIP") and read_json(run.status)["state"] == "complete"
