"""Export on a tiny random llama: the merged folder equals base+adapter; the GGUF files made by
llama.cpp's converter and quantizer run in llama.cpp (libllama) with the merged model's tokens,
logits and greedy outputs; the Ollama Modelfile and the GGUF LoRA adapter; bad input or a crash
leaves no half-written export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tests.helpers import (
    has_llamacpp,
    needs_llamacpp,
    train_plan,
    train_summary,
    write_arm_metrics,
    write_manifest,
    write_weights_record,
)
from tunewise.artifacts import WeightsRecord
from tunewise.deploy import export as export_mod
from tunewise.deploy import llamacpp, ollama
from tunewise.deploy.export import export_run, stop_ids
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat, load_chat
from tunewise.runs import RunDir, atomic_write_json

QUIET = Console(quiet=True)
TEST_ITEMS = ["Package: vim\nDescription: Vi IMproved", "Package: gcc\nDescription: GNU C compiler",
              "Package: curl\nDescription: command line tool for transferring data with URL syntax"]
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
    write_manifest(run.manifest, "ds-1234abcd", counts={"train": 40, "val": 5, "test": 5})
    for arm, mean in {"zero_shot": 0.2, "finetuned": 0.8}.items():
        write_arm_metrics(run.metrics(arm), arm, "json_exact", {
            "json_exact": {"mean": mean, "low": mean - 0.1, "high": mean + 0.1},
            "json_valid": {"mean": 1.0, "low": 1.0, "high": 1.0}})
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
    write_weights_record(run.adapter, dataset_version="ds-1234abcd", config_sha256="c0ffee",
                         plan=train_plan(base=base_name or str(base)), train=train_summary())
    run.split("test").parent.mkdir(parents=True, exist_ok=True)
    run.split("test").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": item}, {"role": "assistant", "content": '{"section": "x"}'}],
        "source": f"data.jsonl:{i + 1}"}) + "\n" for i, item in enumerate(TEST_ITEMS)), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tokenizer) -> RunDir:
    return write_fake_run(tmp_path_factory.mktemp("export") / "run", tiny_model_dir, tokenizer)


@pytest.fixture(scope="module")
def exported(trained_run) -> dict[str, Path]:
    if not has_llamacpp():
        return export_run(trained_run.root, merge=True, console=QUIET)
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
    assert WeightsRecord.read(merged / "tunewise.json").export["merged_dtype"] == "float32"


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
                     "## Intended use", "Reply with JSON.", "## Limits", RED_FLAG, "c0ffee",
                     *(["tiny-task-q8_0.gguf", "Modelfile", "parity.json", "`tiny-task-f32.gguf`: top-1 agreement 1.000",
                        "greedy answers equal 3/3"] if "gguf" in exported else [])):
        assert expected in card, expected
    assert exported["card"] == exported["merged"] / "README.md"


@pytest.mark.parametrize("method, lr, default, says", [
    ("lora", 2e-4, True, "LoRA (r=4, alpha=8, dropout=0.0"),  # lr left at its default: the plan resolved 2e-4
    ("dpo", 5e-6, False, "LoRA trained with DPO (r=4"),
    ("full", 1e-5, False, "full fine-tuning (every weight)"),
])
def test_model_card_states_the_method_and_learning_rate_training_used(method, lr, default, says, trained_run):
    from tunewise.artifacts import WeightsRecord

    record = WeightsRecord.read(trained_run.adapter / "tunewise.json")  # the config.yaml has neither lr nor method
    record.plan = train_plan(method=method, lr=lr, lr_default=default, adapter={} if method == "full" else
                             record.plan.adapter)
    card = export_mod.model_card(trained_run, record, None, dtype=torch.float32, files=[])
    assert says in card and f"learning rate {lr:g}" in card and "None" not in card
    assert ("(the default for lora)" in card) == default and f"tags: [tunewise, {method}, merged]" in card
    if method != "lora":
        assert "LoRA supervised" not in card and "LoRA (r=" not in card


# --- GGUF (llama.cpp) ------------------------------------------------------------------------

@needs_llamacpp
def test_gguf_runs_in_llama_cpp_with_the_merged_models_outputs(exported, tokenizer):
    from gguf import GGUFReader

    parity = json.loads(exported["parity"].read_text())
    assert parity["lossless_type"] == "f32" and parity["prompts"] == len(TEST_ITEMS)
    lossless, quantized = parity["checks"]  # the f32 conversion is checked first, then the q8_0 file
    assert lossless["file"] == "tiny-task-f32.gguf" and lossless["lossless"]
    assert lossless["tokens_equal"] == lossless["greedy_equal"] == len(TEST_ITEMS)
    assert lossless["top1_agreement"] == 1.0 and lossless["max_abs_logit_diff"] < 1e-3
    assert quantized["file"] == "tiny-task-q8_0.gguf" and quantized["tokens_equal"] == len(TEST_ITEMS)
    assert quantized["top1_agreement"] > 0.9
    reader = GGUFReader(exported["gguf"])
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.pre") == "smollm"
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "Reply with JSON" not in field("tokenizer.chat_template")  # the template, not the system prompt
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.1.ffn_down.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"


@needs_llamacpp
def test_parity_sees_a_changed_model(exported, tiny_model_dir):
    """The check can fail: the GGUF against the base (not the merged model) disagrees."""
    from transformers import AutoModelForCausalLM

    chat = load_chat(exported["merged"], model="tiny")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [chat.prompt([{"role": "user", "content": item}]) for item in TEST_ITEMS]
    result = llamacpp.parity(exported["gguf"], base, chat, prompts)
    assert result.max_abs_logit_diff > 1e-2 and not result.passed()


# each export is about 15 s (two converter runs, two parity checks): with the integration tier in
# `make test`, so the fast tier keeps its 5 minutes
@pytest.mark.integration
@needs_llamacpp
@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k", "bf16"])
def test_k_quants_and_other_types_are_llama_cpps(quant, trained_run, tmp_path):
    from gguf import GGUFReader

    written = export_run(trained_run.root, tmp_path, merge=False, gguf=True, quant=quant, console=QUIET)
    assert written["gguf"].name == f"tiny-task-{quant}.gguf"
    types = {t.tensor_type.name for t in GGUFReader(written["gguf"]).tensors}
    # rows of 32 are not whole 256-blocks: llama.cpp falls back from K-quants per tensor, as it does for
    # such shapes in real models; a file type is still recorded
    assert types - {"F32"}, types
    checks = json.loads(written["parity"].read_text())["checks"]
    assert [c["file"] for c in checks] == ["tiny-task-f32.gguf", f"tiny-task-{quant}.gguf"]
    assert checks[1]["tokens_equal"] == len(TEST_ITEMS)


@needs_llamacpp
def test_modelfile_has_the_template_stops_and_system_prompt(exported, tokenizer):
    text = exported["modelfile"].read_text()
    assert text.startswith("FROM ./tiny-task-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    assert 'SYSTEM """Reply with JSON."""' in text
    chat = load_chat(exported["merged"], model="tiny")
    pieces = ollama.pieces(chat, add_bos=False)
    messages = [{"role": "system", "content": "Reply with JSON."}, {"role": "user", "content": "Package: vim"},
                {"role": "assistant", "content": "{}"}, {"role": "user", "content": "Package: gcc"}]
    assert ollama.render_like_ollama(pieces, messages) == chat.prompt(messages)
    for piece in [*pieces.begin.values(), *pieces.between.values(), pieces.tail]:
        assert json.dumps(piece, ensure_ascii=False) in text  # each piece is written into the Go template


@pytest.mark.integration
@needs_llamacpp
def test_gguf_lora_adapter_runs_over_the_base_gguf_in_llama_cpp(trained_run, tmp_path, tiny_model_dir):
    from gguf import GGUFReader

    written = export_run(trained_run.root, tmp_path, merge=False, gguf_adapter=True, console=QUIET)
    adapter, base = written["adapter_gguf"], written["base_gguf"]
    assert adapter.name == "tiny-task-lora-f32.gguf" and base.exists()
    assert GGUFReader(adapter).fields["general.type"].contents() == "adapter"
    check = json.loads(written["parity"].read_text())["checks"][0]
    assert check["lora"] == adapter.name and check["greedy_equal"] == len(TEST_ITEMS)
    assert check["max_abs_logit_diff"] < 1e-3  # base + adapter in llama.cpp = the merged model
    modelfile = written["adapter_modelfile"].read_text()
    assert modelfile.startswith(f"FROM ./{base.name}\nADAPTER ./{adapter.name}\n")


# --- bad input, atomic writes ----------------------------------------------------------------

def test_unknown_quant_is_refused_before_any_work(trained_run, monkeypatch):
    monkeypatch.setattr(export_mod, "build_merged", lambda *a, **k: pytest.fail("merged before checking --quant"))
    with pytest.raises(TunewiseError) as err:
        export_run(trained_run.root, gguf=True, quant="q3_k", console=QUIET)
    assert "q3_k" in str(err.value) and "q4_k_m" in str(err.value) and "bf16" in str(err.value)


def test_missing_llama_cpp_is_refused_before_merging(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "build_merged", lambda *a, **k: pytest.fail("merged without llama.cpp"))
    monkeypatch.setenv("TUNEWISE_LLAMA_CPP", str(tmp_path))
    with pytest.raises(TunewiseError) as err:
        export_run(trained_run.root, tmp_path / "out", merge=False, gguf=True, console=QUIET)
    assert "convert_hf_to_gguf.py" in str(err.value) and "make llamacpp" in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@needs_llamacpp
def test_an_architecture_the_converter_does_not_know_is_explained(tmp_path):
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1).to_dict() | {"architectures": ["NoSuchModelForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TunewiseError) as err:
        llamacpp.convert(tmp_path, tmp_path / "x.gguf", "f32", console=QUIET)
    assert "NoSuchModelForCausalLM" in str(err.value) and "export --merge" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no partial file


def test_bad_run_folders_are_explained(tmp_path):
    with pytest.raises(TunewiseError, match="not a tunewise run folder"):
        export_run(tmp_path, console=QUIET)
    (tmp_path / "config.yaml").write_text("data: {path: data.jsonl}\n")
    with pytest.raises(TunewiseError) as err:
        export_run(tmp_path, console=QUIET)
    assert "no trained adapter" in str(err.value) and "tunewise run --resume" in str(err.value)
    with pytest.raises(TunewiseError, match="nothing to export"):
        export_run(tmp_path, merge=False, gguf=False, console=QUIET)


@needs_llamacpp
def test_gguf_only_export_is_atomic_and_leaves_no_scratch(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    written = export_run(trained_run.root, out, merge=False, gguf=True, quant="f32", console=QUIET)
    names = ["Modelfile", "README.md", "parity.json", "tiny-task-f32.gguf"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert written == {"gguf": out / "tiny-task-f32.gguf", "modelfile": out / "Modelfile",
                       "parity": out / "parity.json", "card": out / "README.md"}
    before = written["gguf"].read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llamacpp, "quantize", interrupted)  # after the merge and the f32 conversion
    with pytest.raises(KeyboardInterrupt):
        export_run(trained_run.root, out, merge=True, gguf=True, quant="q4_k_m", console=QUIET)
    assert sorted(p.name for p in out.iterdir()) == names  # no merged/, no temp, nothing replaced
    assert written["gguf"].read_bytes() == before


@needs_llamacpp
def test_no_parity_skips_the_check_and_says_so(trained_run, tmp_path, monkeypatch, capsys):
    from tests.helpers import run_cli

    monkeypatch.setattr(llamacpp, "parity", lambda *a, **k: pytest.fail("checked under --no-parity"))
    code, out = run_cli(monkeypatch, capsys, "export", str(trained_run.root), "--gguf", "--quant", "f32",
                        "--no-parity", "--out", str(tmp_path))
    assert code == 0 and "--no-parity" in out and (tmp_path / "tiny-task-f32.gguf").exists()
    assert json.loads((tmp_path / "parity.json").read_text())["checked"] is False
