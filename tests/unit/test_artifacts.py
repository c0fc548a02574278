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
