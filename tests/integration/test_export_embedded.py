"""Export on the embedded SmolLM2-135M-Instruct (about a minute): `pytest -m integration`.

The merged model generates what base+adapter generates; the f16 and q8_0 GGUF files, read back by
transformers, generate what the merged model generates (q8_0: up to a near-tie of the merged model)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from tests.unit.test_export import write_fake_run
from tunewise.deploy.export import export_run
from tunewise.deploy.ggufwrite import write_gguf

pytestmark = pytest.mark.integration
QUIET = Console(quiet=True)
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Package: vim\nDescription: Vi IMproved - enhanced vi editor",
    "List three prime numbers.",
]
NEW_TOKENS = 24
# Measured with this adapter: merged vs base+adapter max |logit diff| 1.7e-4 (logits up to ~40);
# f16 GGUF 0.040; q8_0 GGUF 1.28 max, 0.15-0.22 mean. Bounds leave 3-6x headroom.
MERGE_ATOL, F16_ATOL, Q8_ATOL, Q8_MEAN = 1e-3, 0.2, 4.0, 0.5


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, embedded_path, tokenizer):
    # a small random adapter (B ~ N(0, 0.002) on every linear layer): it changes the logits by ~0.35
    # and some generations, and keeps the model coherent
    run = write_fake_run(tmp_path_factory.mktemp("export-embedded") / "run", embedded_path, tokenizer,
                         lora_std=0.002, base_name="smollm2-135m-instruct")
    written = export_run(run.root, merge=True, gguf=True, quant="q8_0", console=QUIET)
    f16 = write_gguf(written["merged"], written["gguf"].with_name("smollm2-f16.gguf"), "f16", name="f16",
                     console=QUIET)
    return run, written, f16


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


@pytest.fixture(scope="module")
def merged_sequences(merged, tokenizer):
    return greedy(merged, tokenizer, merged.generation_config)


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def test_merged_model_is_base_plus_adapter(shipped, merged, merged_sequences, embedded_path, tokenizer):
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
    unmerged_sequences = greedy(adapted, tokenizer, merged.generation_config)
    assert all(torch.equal(a, b) for a, b in zip(merged_sequences, unmerged_sequences))
    # generation_config.json stops at <|im_end|>: a short answer ends there, not at max_new_tokens
    assert any(seq[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>") for seq in merged_sequences)


def test_f16_gguf_generates_what_the_merged_model_generates(shipped, merged, merged_sequences, tokenizer):
    gguf = load_gguf(shipped[2])
    x = merged_sequences[2].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(gguf(x).logits, merged(x).logits, rtol=0, atol=F16_ATOL)
    assert all(torch.equal(a, b) for a, b in zip(greedy(gguf, tokenizer, merged.generation_config), merged_sequences))


def test_q8_0_gguf_generates_what_the_merged_model_generates_up_to_near_ties(shipped, merged, merged_sequences,
                                                                             tokenizer):
    gguf = load_gguf(shipped[1]["gguf"])
    for ours, reference in zip(greedy(gguf, tokenizer, merged.generation_config), merged_sequences):
        with torch.no_grad():
            logits = merged(reference.unsqueeze(0)).logits[0]  # (T, V)
            quantized = gguf(reference.unsqueeze(0)).logits[0]
        assert (quantized - logits).abs().max() < Q8_ATOL and (quantized - logits).abs().mean() < Q8_MEAN
        n = min(len(ours), len(reference))
        differs = (ours[:n] != reference[:n]).nonzero()
        if len(differs) or len(ours) != len(reference):
            at = differs[0].item() if len(differs) else n
            top2 = logits[at - 1].topk(2).values  # the merged model's choice at the first divergence
            assert top2[0] - top2[1] < 0.5, "q8_0 changed a greedy choice the merged model made with a clear margin"


def test_gguf_tokenizer_matches_and_stops_at_end_of_turn(shipped, tokenizer):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    path = shipped[1]["gguf"]
    reread = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": p} for p in PROMPTS[:1]],
                                         add_generation_prompt=True, tokenize=False)
    for text in [chat, *PROMPTS]:
        assert reread(text)["input_ids"] == tokenizer(text)["input_ids"]
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["general.base_model.0.name"].contents() == "smollm2-135m-instruct"
