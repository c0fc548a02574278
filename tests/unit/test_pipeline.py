"""The real entry point on a tiny random llama: artifacts load in the reference libraries."""

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tunewise.artifacts import DataManifest, TrainSummary, Verdict, WeightsRecord
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
    assert verdict.decision in ("SHIP", "DO NOT SHIP") and verdict.n_items == 8
    assert set(verdict.means) == {"zero_shot", "few_shot", "retrieved_few_shot", "finetuned"}
    retrieved = [json.loads(line) for line in run.predictions("retrieved_few_shot").read_text().splitlines()]
    train_sources = {json.loads(line)["source"] for line in run.split("train").read_text().splitlines()}
    assert all(len(r["shots"]) == 3 and set(r["shots"]) <= train_sources for r in retrieved)
    assert (run.index / "train_embeddings.npy").exists()
    assert read_json(run.status)["state"] == "complete"
    assert set(read_json(run.status)["timings"]) >= {"data", "baseline", "train", "evaluate", "verdict"}
    # 64 training examples, fewer than 200: the decide stage warns
    assert any("fewer than 200" in w for w in read_json(run.decision)["warnings"])
    html = run.report.read_text()
    assert verdict.decision.value in html and "data:image/png;base64," in html and "few_shot" in html
    record = WeightsRecord.read(run.adapter / "tunewise.json")
    assert record.provenance.dataset_version == DataManifest.read(run.manifest).version
    assert record.provenance.seeds == {"data": 0, "eval": 0, "train": 0}


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
    summary = TrainSummary.read(run.train_summary)
    assert summary.best_val_loss == min(vals) < vals[0]
    assert WeightsRecord.read(run.adapter / "tunewise.json").train == summary


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
    assert verdict.decision in ("SHIP", "DO NOT SHIP") and read_json(run.status)["state"] == "complete"


def _fake_api(body: dict) -> str:
    """An OpenAI-compatible model that answers the task and judges: answers '{"section": "net"}';
    as a judge, prefers the answer equal to the reference, else says tie."""
    import re

    system = body["messages"][0]["content"]
    if "impartial judge" not in system:
        return '{"section": "net"}'
    user = body["messages"][1]["content"]
    blocks = dict(re.findall(r'<(\w+) id="[0-9a-f]+">\n?(.*?)\n?</\1 id="[0-9a-f]+">', user, re.S))
    if "answer_1" in blocks:
        winner = ("1" if blocks["answer_1"] == blocks["reference"] else
                  "2" if blocks["answer_2"] == blocks["reference"] else "tie")
        return json.dumps({"winner": winner, "reason": f"answer {winner} matches the reference"})
    score = 5 if blocks["answer"] == blocks["reference"] else 2
    return json.dumps({"correctness": {"score": score, "reason": "compared with the reference"},
                       "format": {"score": 4, "reason": "JSON"}})


def test_eval_adds_an_endpoint_arm_and_a_judge_and_reuses_cached_outputs(finished_run, monkeypatch):
    from tests.openai_server import serve
    from tunewise import pipeline
    from tunewise.errors import TunewiseError

    run, verdict, _ = finished_run

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached output was generated again")

    monkeypatch.setattr("tunewise.evaluate.runner.generate", no_generation)
    monkeypatch.setenv("TEST_API_KEY", "sk-test")
    with pytest.raises(TunewiseError, match="only eval"):
        pipeline.evaluate_run(run.root, ["data.seed=3"], Console(quiet=True))
    with serve(_fake_api, api_key="sk-test") as url:
        sets = [
            f"eval.endpoints=[{{name: api, url: '{url}', model: m, api_key_env: TEST_API_KEY, baseline: false}}]",
            f"eval.judge={{url: '{url}', model: judge, api_key_env: TEST_API_KEY, max_items: 5}}",
        ]
        _, again = pipeline.evaluate_run(run.root, sets, Console(quiet=True))
    api = [json.loads(line) for line in run.predictions("api").read_text().splitlines()]
    assert [r["output"] for r in api] == ['{"section": "net"}'] * 8
    assert read_json(run.metrics("api"))["metrics"]["json_valid"]["mean"] == 1.0
    # a reference arm: compared, not a baseline to beat
    assert "api" in again.comparisons and "api" not in again.baselines
    assert again.means["finetuned"] == verdict.means["finetuned"]  # same outputs, from the cache
    summary = read_json(run.judge / "summary.json")
    assert set(summary["pointwise"]) >= {"zero_shot", "few_shot", "retrieved_few_shot", "api", "finetuned"}
    assert summary["pairwise"]["arm_a"] == "finetuned" and summary["pairwise"]["n"] == 5
    # the fake judge is order-consistent: no verdict flips with the order
    assert summary["pairwise"]["position_inconsistency_rate"] == 0.0
    point = [json.loads(line) for line in (run.judge / "pointwise.jsonl").read_text().splitlines()]
    api_rows = [r for r in point if r["arm"] == "api"]
    references = [r["reference"] for r in api[:5]]
    assert [r["scores"]["correctness"] for r in api_rows] == [5 if ref == '{"section": "net"}' else 2 for ref in references]
    assert "api" in load_config_text(run) and "sk-test" not in load_config_text(run)
    html = run.report.read_text()
    assert "LLM judge" in html and "position inconsistency" in html and 'id="filter"' in html


def load_config_text(run) -> str:
    return run.config.read_text()


@pytest.mark.browser
def test_report_filter_works_in_a_real_browser(finished_run, tmp_path):
    """Headless Chromium runs the report's script: each filter shows exactly the matching items."""
    import re
    import shutil
    import subprocess

    run, _, _ = finished_run
    verdict = Verdict.read(run.verdict)  # the current one: an earlier test may have added an arm with `tunewise eval`
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert chromium, "no Chromium: `make browser` installs it"
    arms = list(verdict.means)
    rows = {arm: [json.loads(line) for line in run.predictions(arm).read_text().splitlines()] for arm in arms}
    primary = verdict.primary_metric
    expected = {
        "all": len(rows["finetuned"]),
        "disagree_score": sum(len({rows[a][i]["scores"][primary] >= 1 for a in arms}) > 1
                              for i in range(len(rows["finetuned"]))),
    }
    for key, count in expected.items():
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path}",
             "--dump-dom", f"file://{run.report}#filter={key}"],
            capture_output=True, text=True, timeout=120,
        ).stdout
        body = dom.split('id="items"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
        shown = [r for r in re.findall(r"<tr[^>]*>", body) if "display: none" not in r]
        assert len(shown) == count, key
        assert f"{count} of {expected['all']} items" in dom


@pytest.mark.integration  # a whole run (about 8 s of the fast tier's 5 minutes); `make test` runs it
def test_run_with_every_data_default_on_alpaca_rows_sharing_one_instruction(tmp_path, monkeypatch, capsys,
                                                                          tiny_model_dir):
    """The most common Alpaca file (one task instruction, a different input per row) goes through
    `tunewise run` with the data stage's defaults: MinHash, embeddings and decontamination on."""
    from tests.helpers import alpaca_rows, run_cli, write_jsonl

    write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(160))
    (tmp_path / "tunewise.yaml").write_text(
        "task: {name: alpaca}\n"
        "data: {path: alpaca.jsonl}\n"
        f"model: {{base: {tiny_model_dir}}}\n"
        "train: {epochs: 1, batch_size: 16, lr: 0.01}\n"
        "eval: {max_new_tokens: 4, bootstrap_samples: 100}\n"
        "track: none\n"
    )
    code, output = run_cli(monkeypatch, capsys, "run", "-c", str(tmp_path / "tunewise.yaml"), "--runs",
                           str(tmp_path / "runs"))
    assert code == 0, output
    run = next((tmp_path / "runs").iterdir())
    counts = read_json(run / "data" / "manifest.json")["counts"]
    assert counts["train"] >= 0.9 * (160 - counts["val"] - counts["test"]), counts
    assert (run / "verdict.json").is_file()
