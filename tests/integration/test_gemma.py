"""A second real family end to end: Gemma 3 270M *base* (no chat template, SentencePiece, 262k
vocabulary) from its PyPI chunk packages, through `tunewise run` on a sample of the demo task, then
exported to GGUF and checked in llama.cpp."""

from pathlib import Path

import pytest
import torch
from rich.console import Console

from tests.helpers import needs_llamacpp
from tunewise.config import load_config
from tunewise.data import with_system
from tunewise.deploy.export import export_run
from tunewise.models import load_chat, load_model, resolve_base
from tunewise.pipeline import run_pipeline
from tunewise.runs import read_json, read_jsonl

pytestmark = pytest.mark.integration

DEMO = Path(__file__).parents[2] / "examples" / "debian-sections" / "tunewise.yaml"
TEMPLATE_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>")


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    # one epoch at the default lr left it writing "class\nclass..." (val loss 4.63 -> 2.67): a base
    # model must learn the format and the end of turn, so three epochs at a higher lr
    overrides = ["model.base=gemma-3-270m", "data.max_examples=200", "train.epochs=3", "train.lr=1e-3",
                 "eval.max_test=12", "eval.bootstrap_samples=300", "eval.forgetting=false", "eval.max_new_tokens=40"]
    return run_pipeline(DEMO, overrides, tmp_path_factory.mktemp("gemma") / "runs", Console(quiet=True))


def test_gemma_base_runs_end_to_end_with_the_recorded_default_template(gemma_run):
    run, verdict = gemma_run
    assert verdict.decision in ("SHIP", "DO NOT SHIP") and verdict.n_items == 12
    assert read_json(run.status)["state"] == "complete" and run.report.exists()
    summary = read_json(run.train_summary)
    assert summary["best_val_loss"] < summary["first_val_loss"]
    chat = read_json(run.adapter / "tunewise.json")["chat"]
    assert chat["source"] == "default:gemma" and chat["end_of_turn"] == ["<end_of_turn>"]
    # the template trained with travels with the adapter, so serving and export prompt the same way
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run.adapter).chat_template == chat["template"]


def test_no_template_token_leaks_into_an_output(gemma_run):
    run, verdict = gemma_run
    for arm in verdict.means:
        for row in read_jsonl(run.predictions(arm)):
            assert not any(t in row["output"] for t in TEMPLATE_TOKENS), (arm, row["output"])
            assert not row["output"].startswith("model\n")


def test_the_fine_tune_stops_at_end_of_turn(gemma_run):
    from peft import PeftModel

    run, _ = gemma_run
    base_path = resolve_base("gemma-3-270m")
    chat = load_chat(base_path, model="gemma-3-270m", tokenizer_folder=run.adapter)
    model = PeftModel.from_pretrained(load_model(base_path, dtype=torch.float32), run.adapter).eval()
    system = load_config(run.config).task.system_prompt
    end = chat.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    stopped = 0
    for row in read_jsonl(run.split("test"))[:4]:
        prompt = chat.prompt(with_system(row["messages"][:-1], system))
        ids = torch.tensor([chat.ids(prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                                 do_sample=False, eos_token_id=list(chat.stop_ids),
                                 pad_token_id=chat.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        stopped += out[-1] == end
    assert stopped >= 3  # trained on <end_of_turn> for one epoch: it ends its answers there


@needs_llamacpp
def test_gemma_gguf_matches_the_merged_model_in_llama_cpp(gemma_run, tmp_path):
    """The fine-tune as Q4_K_M GGUF + Modelfile: the bf16 conversion is checked in llama.cpp on the
    test prompts (same ids, same greedy answers) before it is quantized. (The adapter GGUF is checked
    on the tiny model in the unit tier: here it would add a minute.)"""
    from gguf import GGUFReader

    run, _ = gemma_run
    written = export_run(run.root, tmp_path, merge=False, gguf=True, quant="q4_k_m", console=Console(quiet=True))
    parity = read_json(written["parity"])
    lossless, quantized = parity["checks"]
    assert parity["lossless_type"] == "bf16" and lossless["file"] == "debian-sections-bf16.gguf"
    assert lossless["tokens_equal"] == lossless["prompts"] == 4  # the real Gemma tokenizer, in llama.cpp
    assert lossless["greedy_equal"] + lossless["greedy_near_ties"] == 4 and lossless["top1_agreement"] >= 0.98
    assert quantized["file"] == "debian-sections-q4_k_m.gguf" and quantized["tokens_equal"] == 4
    fields = GGUFReader(written["gguf"]).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    eot = fields["tokenizer.ggml.eot_token_id"].contents() if "tokenizer.ggml.eot_token_id" in fields else None
    modelfile = written["modelfile"].read_text()
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and '"<start_of_turn>user\\n"' in modelfile
    assert "<bos>" not in modelfile  # llama.cpp adds it (add_bos_token), the template must not repeat it
    assert eot is None or eot == load_chat(resolve_base("gemma-3-270m"), model="g").tokenizer.convert_tokens_to_ids(
        "<end_of_turn>")
