"""Typed run-folder files: what a weights folder holds (LoRA, DoRA, prompt tuning, a whole model,
nothing); every JSON artifact round-trips through its type; a run folder written before the types
(tests/fixtures/older_run, made by commit 64adf20's `tools/run_digest.py --keep`) is still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunewise.artifacts import WeightsKind, weights_in
from tunewise.errors import TunewiseError


def adapter(base, folder, config):
    from peft import get_peft_model

    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_each_kind_of_weights_folder(base, tiny_model_dir, tmp_path):
    from peft import LoraConfig, PromptTuningConfig

    lora = weights_in(adapter(base(), tmp_path / "lora", LoraConfig(r=2, target_modules=["q_proj"])))
    assert (lora.kind, lora.peft_type, lora.safetensors, lora.is_adapter) == (WeightsKind.LORA, "LORA", True, True)
    dora = weights_in(adapter(base(), tmp_path / "dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)))
    assert dora.kind is WeightsKind.LORA and lora.max_rank == dora.max_rank == 2
    mixed = weights_in(adapter(base(), tmp_path / "mixed", LoraConfig(r=2, rank_pattern={"k_proj": 6},
                                                                       target_modules=["q_proj", "k_proj"])))
    assert mixed.max_rank == 6  # what vLLM's --max-lora-rank must cover
    prompt = weights_in(adapter(base(), tmp_path / "pt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)))
    assert prompt.kind is WeightsKind.PROMPT_LEARNING and prompt.config_file.name == "adapter_config.json"
    assert prompt.max_rank is None
    whole = weights_in(tiny_model_dir)
    assert whole.kind is WeightsKind.WHOLE_MODEL and whole.safetensors and not whole.is_adapter
    assert weights_in(tmp_path / "missing").kind is WeightsKind.NONE
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    pickled = weights_in(tmp_path / "pickled")
    assert not pickled.safetensors and pickled.pickled == ("pytorch_model.bin",)


def test_an_adapter_config_that_is_not_json_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(TunewiseError) as err:
        weights_in(tmp_path)
    assert "adapter_config.json is not a JSON object" in str(err.value) and err.value.file == str(tmp_path / "adapter_config.json")


def test_verdict_round_trips_and_older_or_foreign_files_are_read_or_refused(tmp_path):
    import json

    from tests.helpers import write_verdict
    from tunewise.artifacts import Decision, Verdict

    path = tmp_path / "verdict.json"
    write_verdict(path, "DO NOT SHIP", means={"finetuned": 0.4, "few_shot": 0.6})
    verdict = Verdict.read(path)
    assert verdict.decision is Decision.DO_NOT_SHIP and not verdict.shipped and verdict.baselines == ["few_shot"]
    assert Verdict.from_json(verdict.to_json()) == verdict
    assert json.loads(path.read_text()) == verdict.to_json() and "regression" not in verdict.to_json()
    older = {k: v for k, v in verdict.to_json().items() if k != "baselines"}  # before baselines were recorded
    assert Verdict.from_json(older).baselines == ["few_shot"]
    for broken, message in [({**older, "decision": "MAYBE"}, "unknown verdict decision 'MAYBE'"),
                            ({"decision": "SHIP", "reason": "x"}, "verdict.json lacks primary_metric")]:
        path.write_text(json.dumps(broken))
        with pytest.raises(TunewiseError) as err:
            Verdict.read(path)
        assert message in str(err.value) and str(path) in str(err.value)


OLDER_RUN = Path(__file__).parents[1] / "fixtures" / "older_run"


def test_every_artifact_round_trips_through_its_type(tmp_path):
    from tests.helpers import train_summary, write_arm_metrics, write_manifest, write_weights_record
    from tunewise.artifacts import ArmMetrics, DataManifest, Provenance, RegressionMetrics, Seeds, WeightsRecord
    from tunewise.runs import RunDir

    write_manifest(tmp_path / "manifest.json", "ds-9")
    assert DataManifest.read(tmp_path / "manifest.json").to_json() == json.loads((tmp_path / "manifest.json").read_text())
    write_arm_metrics(tmp_path / "m.json", "few_shot", "accuracy", {"accuracy": {"mean": 0.5, "low": 0.2, "high": 0.8}})
    metrics = ArmMetrics.read(tmp_path / "m.json")
    assert metrics.primary_mean == 0.5 and ArmMetrics.from_json(metrics.to_json()) == metrics
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text("task: {name: x}\n")
    write_manifest(run.manifest, "ds-9")
    provenance = Provenance.of(run, Seeds(data=1, eval=2, train=3))
    assert provenance.seeds == {"data": 1, "eval": 2, "train": 3} and provenance.dataset_version == "ds-9"
    regression = RegressionMetrics(who="base", n=3, accuracy={"mean": 1.0, "low": 1.0, "high": 1.0},
                                   by_category={"math": 1.0}, model="m", provenance=provenance)
    regression.write(tmp_path / "r.json")
    assert RegressionMetrics.read(tmp_path / "r.json") == regression
    write_weights_record(tmp_path, dataset_version="ds-9", train=train_summary(method="dpo", lr=5e-5))
    record = WeightsRecord.read(tmp_path / "tunewise.json")
    assert record.train.method == "dpo" and WeightsRecord.from_json(record.to_json()) == record


def test_a_run_folder_written_before_the_types_is_read(tmp_path):
    import shutil

    from rich.console import Console

    from tunewise.artifacts import ArmMetrics, DataManifest, TrainSummary, Verdict, WeightsRecord
    from tunewise.deploy.export import export_run
    from tunewise.deploy.registry import Registry
    from tunewise.pipeline import resume_pipeline

    run_dir = shutil.copytree(OLDER_RUN, tmp_path / "20261202-171951-tiny")
    record = WeightsRecord.read(run_dir / "adapter" / "tunewise.json")  # provenance at the top level then
    assert record.provenance.seeds == {"stage": 0} and record.provenance.dataset_version == "20e217b157c0fed6"
    assert record.train == TrainSummary.read(run_dir / "train_summary.json") and record.chat is not None
    metrics = ArmMetrics.read(run_dir / "metrics" / "finetuned.json")
    assert metrics.provenance.seeds == {"stage": 0} and metrics.primary == "json_exact"
    assert DataManifest.read(run_dir / "data" / "manifest.json").version == "20e217b157c0fed6"
    before = Verdict.read(run_dir / "verdict.json")
    for stage in ("verdict", "report"):  # today's stages on yesterday's files
        resume_pipeline(run_dir, Console(quiet=True), only=stage)
    after = Verdict.read(run_dir / "verdict.json")
    assert after.means == before.means and after.decision == before.decision
    assert after.provenance.seeds == {"data": 0, "eval": 0, "train": 0}
    version = Registry(tmp_path / "registry").add("tiny", run_dir)
    assert version.dataset_version == "20e217b157c0fed6" and version.decision == before.decision.value
    with pytest.raises(TunewiseError) as err:  # export states how the weights were trained: it needs the plan
        export_run(run_dir, merge=True, console=Console(quiet=True))
    assert "do not record their training plan" in str(err.value) and "tunewise stage train" in str(err.value)


def test_a_foreign_file_is_refused_naming_it(tmp_path):
    from tunewise.artifacts import ArmMetrics, TrainSummary

    for cls, data, says in [(ArmMetrics, [1, 2], "is not a JSON object"),
                            (TrainSummary, {"base": "x"}, "lacks method"), (ArmMetrics, "{", "is not JSON")]:
        path = tmp_path / "f.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(TunewiseError) as err:
            cls.read(path)
        assert says in str(err.value) and str(path) in str(err.value) and "fix:" in str(err.value)
