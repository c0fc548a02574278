"""Export on the embedded SmolLM2-135M-Instruct (about a minute): `pytest -m integration`.

The merged model generates what base+adapter generates; the f16 GGUF made by llama.cpp's
converter runs in llama.cpp with the merged model's tokens and greedy outputs (checked on the f32
conversion, measured on f16), and llama.cpp's own completion loop stops where transformers stops:
at <|im_end|>. (q8_0 is not near-lossless in llama.cpp on this 135M model: it quantizes the
activations too, and "What is the capital of France?" starts "L'Étoile" instead of "The capital";
top-1 agreement 0.95 on the prompt positions: bench/gguf_parity.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from tests.helpers import has_llamacpp, needs_llamacpp
from tests.unit.test_export import write_fake_run
from tunewise.deploy import llamacpp
from tunewise.deploy.export import export_run

pytestmark = pytest.mark.integration
QUIET = Console(quiet=True)
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Package: vim\nDescription: Vi IMproved - enhanced vi editor",
    "List three prime numbers.",
]
NEW_TOKENS = 24
# Measured with this adapter: merged vs base+adapter max |logit diff| 1.7e-4 (logits up to ~40).
MERGE_ATOL = 1e-3


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, embedded_path, tokenizer):
    # a small random adapter (B ~ N(0, 0.002) on every linear layer): it changes the logits by ~0.35
    # and some generations, and keeps the model coherent
    run = write_fake_run(tmp_path_factory.mktemp("export-embedded") / "run", embedded_path, tokenizer,
                         lora_std=0.002, base_name="smollm2-135m-instruct")
    gguf = has_llamacpp()
    written = export_run(run.root, merge=True, gguf=gguf, quant="f16", console=QUIET)
    return run, written


@pytest.fixture(scope="module")
def merged(shipped):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(shipped[1]["merged"], dtype=torch.float32)


def encode(tokenizer, prompt: str) -> dict:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


@torch.no_grad()
def greedy(model, tokenizer, generation_config) -> list[torch.Tensor]:
    """Full sequences (prompt + greedy continuation) for every prompt."""
    return [model.generate(**encode(tokenizer, p), generation_config=generation_config, max_new_tokens=NEW_TOKENS,
                           do_sample=False)[0] for p in PROMPTS]


def test_merged_model_is_base_plus_adapter(shipped, merged, embedded_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = shipped[0]
    base = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    x = encode(tokenizer, PROMPTS[2])["input_ids"]
    with torch.no_grad():
        base_logits = base(x).logits
        adapted = PeftModel.from_pretrained(base, run.adapter).eval()
        unmerged = adapted(x).logits
        merged_logits = merged(x).logits
    torch.testing.assert_close(merged_logits, unmerged, rtol=0, atol=MERGE_ATOL)
    assert (merged_logits - base_logits).abs().max() > 0.1
    merged_sequences = greedy(merged, tokenizer, merged.generation_config)
    unmerged_sequences = greedy(adapted, tokenizer, merged.generation_config)
    assert all(torch.equal(a, b) for a, b in zip(merged_sequences, unmerged_sequences))
    # generation_config.json stops at <|im_end|>: a short answer ends there, not at max_new_tokens
    assert any(seq[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>") for seq in merged_sequences)


@needs_llamacpp
def test_gguf_generates_in_llama_cpp_what_the_merged_model_generates(shipped, merged, tokenizer):
    from gguf import GGUFReader

    run, written = shipped
    lossless, quantized = json.loads(written["parity"].read_text())["checks"]
    assert lossless["file"] == "tiny-task-f32.gguf" and lossless["greedy_equal"] == lossless["prompts"] == 3
    assert lossless["tokens_equal"] == 3 and lossless["top1_agreement"] == 1.0
    assert quantized["file"] == "tiny-task-f16.gguf" and quantized["tokens_equal"] == 3
    assert quantized["top1_agreement"] > 0.98 and quantized["greedy_equal"] + quantized["greedy_near_ties"] == 3
    fields = GGUFReader(written["gguf"]).fields
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"].contents() == im_end
    assert fields["general.architecture"].contents() == "llama"

    # llama.cpp's own completion loop (greedy) ends an answer at <|im_end|> by itself, as transformers does
    llm = llamacpp.open_gguf(written["gguf"], n_ctx=256)
    try:
        reasons = []
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = llm.tokenize(text.encode(), add_bos=True, special=True)
            assert ids == encode(tokenizer, prompt)["input_ids"][0].tolist()
            done = llm.create_completion(ids, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1,
                                         repeat_penalty=1.0)["choices"][0]  # its default is 1.1
            assert "<|im_end|>" not in done["text"] and "<|im_start|>" not in done["text"]
            reasons.append(done["finish_reason"])
        hf_stopped = [seq[-1].item() == im_end for seq in greedy(merged, tokenizer, merged.generation_config)]
        hf_stopped = [seq[-1].item() == im_end for seq in greedy(merged, tokenizer, merged.generation_config)]
        assert "stop" in reasons and sum(r == "stop" for r in reasons) == sum(hf_stopped), (reasons, hf_stopped)
    finally:
        llm.close()
