"""The embedded SmolLM2-135M-Instruct end to end (minutes): `pytest -m integration`."""

from pathlib import Path

import pytest
import torch

from tunewise.models import EMBEDDED, resolve_base
from tunewise.runs import read_json

pytestmark = pytest.mark.integration


def test_imported_safetensors_equal_the_gguf_model(embedded_path):
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = EMBEDDED["smollm2-135m-instruct"]
    package = Path(list(importlib.util.find_spec(spec.package).submodule_search_locations)[0])
    gguf = AutoModelForCausalLM.from_pretrained(package, gguf_file=spec.gguf_file, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    assert "quantization_config" not in ours.config.to_dict()
    x = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, gguf(x).logits)


def test_demo_config_end_to_end_on_a_sample(demo_run):
    run, verdict = demo_run
    assert verdict.decision in ("SHIP", "DO NOT SHIP")
    assert verdict.primary_metric == "json_exact" and verdict.n_items == 16
    summary = read_json(run.train_summary)
    assert summary["best_val_loss"] < summary["first_val_loss"]
    assert run.report.exists() and read_json(run.status)["state"] == "complete"

    # the adapter is a plain PEFT adapter for the embedded base, and it changes the model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(resolve_base("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(run.adapter)
    model = PeftModel.from_pretrained(base, run.adapter)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Package: vim\nDescription: Vi IMproved - enhanced vi editor"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        tuned = model(**prompt).logits[0, -1]
        with model.disable_adapter():
            plain = model(**prompt).logits[0, -1]
    assert (tuned - plain).abs().max() > 0.1
