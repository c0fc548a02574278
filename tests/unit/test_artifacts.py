"""What a weights folder holds, read once: LoRA, DoRA, prompt tuning, a whole model, nothing."""

from __future__ import annotations

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
    assert dora.kind is WeightsKind.LORA
    prompt = weights_in(adapter(base(), tmp_path / "pt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)))
    assert prompt.kind is WeightsKind.PROMPT_LEARNING and prompt.config_file.name == "adapter_config.json"
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
