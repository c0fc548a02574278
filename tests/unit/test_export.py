"""Export on a tiny random llama: the merged folder equals base+adapter, the GGUF reloads in
transformers with the merged model's logits (within each quant type's error), the tokenizer
survives the GGUF round trip, and bad input or a crash leaves no half-written export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tunewise.deploy import export as export_mod
from tunewise.deploy.export import export_run, stop_ids
from tunewise.deploy.ggufwrite import QUANTS, check_gguf_support, permute_qk, pre_tokenizer, write_gguf
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat
from tunewise.runs import RunDir, atomic_write_json

QUIET = Console(quiet=True)
# Largest |GGUF logit - merged logit| allowed, as a fraction of the largest |merged logit|. Measured
# on this model (fraction of max |logit| 0.74): f32 0, f16 3.5e-4, bf16 2.8e-3, q8_0 9.8e-3,
# q5_1 3.8e-2, q5_0 4.0e-2, q4_1 7.9e-2, q4_0 9.9e-2; the bounds leave 2-6x headroom.
TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2, "q5_1": 1e-1, "q5_0": 1e-1, "q4_1": 2e-1, "q4_0": 2e-1}
RED_FLAG = "length drift: fine-tune outputs are 2.10x the references' length (limit 2x)"


def write_fake_run(
    root: Path, base: Path, tokenizer, *, lora_std: float = 0.05, base_name: str | None = None
) -> RunDir:
    """A run folder as the pipeline leaves it: config, manifest, metrics, verdict, and a LoRA adapter
    on every linear layer whose B matrices are random (a trained adapter is not needed to test a merge)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = RunDir(root)
    root.mkdir(parents=True)
    run.config.write_text(
        f"task: {{name: tiny task, system_prompt: Reply with JSON.}}\n"
        f"data: {{path: data.jsonl}}\nmodel: {{base: {base_name or base}}}\n"
        "lora: {r: 4, target_modules: all-linear}\n",
        encoding="utf-8",
    )
    atomic_write_json(run.manifest, {"version": "ds-1234abcd", "counts": {"train": 40, "val": 5, "test": 5},
                                     "split_strategy": "random"})
    for arm, mean in {"zero_shot": 0.2, "finetuned": 0.8}.items():
        atomic_write_json(run.metrics(arm), {"primary": "json_exact", "metrics": {
            "json_exact": {"mean": mean, "low": mean - 0.1, "high": mean + 0.1},
            "json_valid": {"mean": 1.0, "low": 1.0, "high": 1.0}}})
    atomic_write_json(run.verdict, {
        "decision": "SHIP", "reason": "the fine-tune beats zero-shot prompting by +0.600.",
        "primary_metric": "json_exact", "best_baseline": "zero_shot", "means": {"zero_shot": 0.2, "finetuned": 0.8},
        "difference": {"mean": 0.6, "low": 0.4, "high": 0.8},
        "test": {"name": "McNemar exact", "p_value": 0.004},
        "comparisons": {"zero_shot": {"difference": {"mean": 0.6, "low": 0.4, "high": 0.8}}},
        "margin": 0.02, "alpha": 0.05, "n_items": 5,
        "red_flags": [{"name": "length_drift", "message": RED_FLAG, "blocking": False}],
    })
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=lora_std)
    model.save_pretrained(run.adapter)
    tokenizer.save_pretrained(run.adapter)
    atomic_write_json(run.adapter / "tunewise.json", {"dataset_version": "ds-1234abcd", "config_sha256": "c0ffee"})
    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tokenizer) -> RunDir:
    return write_fake_run(tmp_path_factory.mktemp("export") / "run", tiny_model_dir, tokenizer)


@pytest.fixture(scope="module")
def exported(trained_run) -> dict[str, Path]:
    return export_run(trained_run.root, merge=True, gguf=True, quant="q8_0", console=QUIET)


@pytest.fixture(scope="module")
def inputs(tokenizer) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def merged_logits(exported, inputs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32)
    with torch.no_grad():
        return model(inputs).logits


def gguf_logits(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(inputs).logits


# --- merged folder ---------------------------------------------------------------------------

def test_merged_logits_equal_base_plus_adapter(trained_run, tiny_model_dir, merged_logits, inputs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(inputs).logits
        unmerged = PeftModel.from_pretrained(base, trained_run.adapter).eval()(inputs).logits
    torch.testing.assert_close(merged_logits, unmerged)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model


def test_merged_folder_is_a_standard_transformers_folder(exported, tokenizer):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    merged = exported["merged"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "README.md", "tunewise.json"):
        assert (merged / name).exists(), name
    assert not (merged / "adapter_config.json").exists()
    modes = {path.name: path.stat().st_mode & 0o777 for path in merged.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights are as readable as every other file
    with safe_open(merged / "model.safetensors", framework="pt") as fh:
        assert not any("lora" in key for key in fh.keys())
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # the tiny base's dtype
    generation = json.loads((merged / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = generation["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    reloaded = AutoTokenizer.from_pretrained(merged)
    assert reloaded.chat_template == tokenizer.chat_template
    assert json.loads((merged / "tunewise.json").read_text())["merged_dtype"] == "float32"


def test_stop_tokens_cover_the_end_of_turn_token_when_it_is_not_eos(tokenizer):
    assert stop_ids(ChatFormat.build(tokenizer, model="smollm2")) == [
        tokenizer.convert_tokens_to_ids("<|im_end|>")]  # SmolLM2: eos is <|im_end|>; <|im_start|> is no end
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.eos_token = "<|endoftext|>"
    assert stop_ids(ChatFormat.build(other, model="smollm2")) == [
        other.convert_tokens_to_ids("<|endoftext|>"), other.convert_tokens_to_ids("<|im_end|>")]


def test_model_card_says_what_was_shipped_and_why(exported, tiny_model_dir):
    card = (exported["merged"] / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    for expected in (str(tiny_model_dir), "LoRA", "r=4", "ds-1234abcd", "**SHIP.**", "beats zero-shot prompting",
                     "`json_exact`", "| metric | zero_shot | finetuned |", "| json_exact | 0.200 [0.100, 0.300] |",
                     "## Intended use", "Reply with JSON.", "## Limits", RED_FLAG, "tiny-task-q8_0.gguf", "c0ffee"):
        assert expected in card, expected
    assert exported["card"] == exported["merged"] / "README.md"


# --- GGUF ------------------------------------------------------------------------------------

def test_permutation_is_llama_cpps_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    # one head of dim 4: rows in rotate-half order (0, 1 | 2, 3) become interleaved pairs (0, 2), (1, 3)
    assert permute_qk(torch.arange(4.0).reshape(4, 1).numpy(), 1).ravel().tolist() == [0.0, 2.0, 1.0, 3.0]
    w = torch.randn(2 * 8, 6).numpy()  # 2 kv heads of dim 8
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    assert (undo.process(permute_qk(w, 2), "blk.0.attn_k.weight").weights == w).all()
    q = torch.randn(4 * 8, 6).numpy()
    assert (undo.process(permute_qk(q, 4), "blk.0.attn_q.weight").weights == q).all()


def test_gguf_metadata_and_tensor_names_are_llama_cpps(exported, tokenizer):
    from gguf import GGUFReader

    reader = GGUFReader(exported["gguf"])
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    expected = {
        "general.architecture": "llama", "general.file_type": 7, "llama.context_length": 512,
        "llama.embedding_length": 32, "llama.block_count": 2, "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8,
        "llama.vocab_size": len(tokenizer), "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    for key, value in expected.items():
        assert field(key) == value, key
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(tokenizer) and tokens[2] == "<|im_end|>" and types[2] == 3 and types[100] == 1
    merges = json.loads((exported["merged"] / "tokenizer.json").read_text())["model"]["merges"]
    assert len(field("tokenizer.ggml.merges")) == len(merges)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(kinds) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(2) for name in per_block}  # tied: no output.weight
    assert {kinds[n] for n in kinds if n.endswith("norm.weight")} == {"F32"}
    assert {kinds[n] for n in kinds if not n.endswith("norm.weight")} == {"Q8_0"}


# one type per family in the fast tier (full precision, 8-bit, 4-bit); the rest (about 11 s each,
# mostly transformers rebuilding the tokenizer from the GGUF) run with the integration tier in `make test`
FAST_QUANTS = ("f32", "q8_0", "q4_1")


@pytest.mark.parametrize("quant", [q if q in FAST_QUANTS else pytest.param(q, marks=pytest.mark.integration)
                                   for q in QUANTS])
def test_gguf_reloads_in_transformers_with_the_merged_models_logits(quant, exported, merged_logits, inputs, tmp_path):
    from gguf import GGUFReader

    path = write_gguf(exported["merged"], tmp_path / f"tiny-{quant}.gguf", quant, name="tiny", console=QUIET)
    logits = gguf_logits(path, inputs)
    if quant == "f32":
        torch.testing.assert_close(logits, merged_logits)
    else:
        tolerance = TOLERANCE[quant] * merged_logits.abs().max().item()
        torch.testing.assert_close(logits, merged_logits, rtol=0, atol=tolerance)
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    qtype = QUANTS[quant][0].name
    assert kinds["blk.1.ffn_down.weight"] == qtype and kinds["blk.0.attn_norm.weight"] == "F32"
    # the tied embedding is also the output matrix: 8 bits under 4/5-bit types, as llama-quantize keeps it
    assert kinds["token_embd.weight"] == ("Q8_0" if quant.startswith(("q4", "q5")) else qtype)


def test_untied_embeddings_write_the_output_tensor(tmp_path, tokenizer):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=False, rope_theta=5000.0)
    folder = tmp_path / "untied"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = write_gguf(folder, tmp_path / "untied-f32.gguf", "f32", name="untied", console=QUIET)
    assert "output.weight" in {t.name for t in GGUFReader(path).tensors}
    x = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(x).logits
    torch.testing.assert_close(gguf_logits(path, x), reference)


def test_tokenizer_read_back_from_the_gguf_encodes_the_same_ids(exported, tokenizer):
    from transformers import AutoTokenizer

    gguf = exported["gguf"]
    reread = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Reply with JSON."}, {"role": "user", "content": "Package: vim 9.1"},
         {"role": "assistant", "content": '{"section": "editors"}'}], tokenize=False)
    texts = ["Hello world!", "  two  spaces\tand a tab\n", "café déjà vu 12345 ½ 🦙", "def f(x):\n    return x", chat]
    for text in texts:
        assert reread(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert reread.chat_template == tokenizer.chat_template
    special = lambda t: (t.bos_token, t.eos_token, t.pad_token)  # noqa: E731
    assert special(reread) == special(tokenizer)


# --- bad input, atomic writes ----------------------------------------------------------------

def test_unknown_quant_is_refused_before_any_work(trained_run, monkeypatch):
    monkeypatch.setattr(export_mod, "build_merged", lambda *a, **k: pytest.fail("merged before checking --quant"))
    with pytest.raises(TunewiseError) as err:
        export_run(trained_run.root, gguf=True, quant="q3_k", console=QUIET)
    assert "q3_k" in str(err.value) and "q8_0" in str(err.value) and "bf16" in str(err.value)


def test_what_gguf_cannot_describe_is_refused_before_merging(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path)
    with pytest.raises(TunewiseError, match="llama-architecture"):
        check_gguf_support(tmp_path, tmp_path)
    spec = {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}}
    digits_then_bytes = [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]
    llama3_like = [{"type": "Split", "pattern": {"Regex": "..."}}, {"type": "ByteLevel", "use_regex": False}]
    assert pre_tokenizer({**spec, "pre_tokenizer": {"type": "Sequence", "pretokenizers": digits_then_bytes}},
                         tmp_path) == "smollm"  # what the hub's SmolLM2 tokenizer.json has
    with pytest.raises(TunewiseError, match="convert_hf_to_gguf"):
        pre_tokenizer({**spec, "pre_tokenizer": {"type": "Sequence", "pretokenizers": llama3_like}}, tmp_path)
    with pytest.raises(TunewiseError, match="byte-level BPE"):
        pre_tokenizer({"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}}, tmp_path)


def test_bad_run_folders_are_explained(tmp_path):
    with pytest.raises(TunewiseError, match="not a tunewise run folder"):
        export_run(tmp_path, console=QUIET)
    (tmp_path / "config.yaml").write_text("data: {path: data.jsonl}\n")
    with pytest.raises(TunewiseError) as err:
        export_run(tmp_path, console=QUIET)
    assert "no trained adapter" in str(err.value) and "tunewise run --resume" in str(err.value)
    with pytest.raises(TunewiseError, match="nothing to export"):
        export_run(tmp_path, merge=False, gguf=False, console=QUIET)


def test_gguf_only_export_is_atomic_and_leaves_no_scratch(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    written = export_run(trained_run.root, out, merge=False, gguf=True, quant="f16", console=QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tiny-task-f16.gguf"]
    assert written == {"gguf": out / "tiny-task-f16.gguf", "card": out / "README.md"}
    before = written["gguf"].read_bytes()

    import tunewise.deploy.ggufwrite as ggufwrite

    calls = []
    real = ggufwrite.quants.quantize

    def crash_on_fifth_tensor(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(data, qtype)

    monkeypatch.setattr(ggufwrite.quants, "quantize", crash_on_fifth_tensor)
    with pytest.raises(KeyboardInterrupt):
        export_run(trained_run.root, out, merge=True, gguf=True, quant="f16", console=QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "tiny-task-f16.gguf"]  # no merged/, no temp
    assert written["gguf"].read_bytes() == before
