"""Every training method on the tiny random llama: the loss falls, exactly the method's weights
change, and the artifact loads in the reference library (PEFT for adapters, transformers for
full models). Preference losses match TRL's on the same numbers; bad method/data pairs exit 2."""

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tests.helpers import SECTIONS, label_rows, run_cli
from tunewise.errors import TunewiseError
from tunewise.runs import read_json
from tunewise.settings import track_settings, train_settings
from tunewise.train import loop, methods, plan
from tunewise.train.plan import adapter_shape

QUIET = Console(quiet=True)


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """The label task as pairs: the JSON answer is chosen, a refusal (or a wrong section) rejected."""
    rng = random.Random(seed)
    rows = []
    for row in label_rows(n, seed):
        right = json.loads(row["messages"][1]["content"])["section"]
        wrong = rng.choice(["Sorry, I cannot classify this package.", "I am not sure which section this is.",
                            json.dumps({"section": rng.choice([s for s in SECTIONS if s != right])})])
        rows.append({"prompt": row["messages"][0]["content"], "chosen": json.dumps({"section": right}),
                     "rejected": wrong})
    return rows


@pytest.fixture
def captured(monkeypatch):
    """The Trainable each run builds, with a copy of every weight as it was before training."""
    seen = {}
    real = methods.build

    def build(method, shape, base_path, dtype, **kwargs):
        tr = real(method, shape, base_path, dtype, **kwargs)
        seen["tr"] = tr
        seen["before"] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        return tr

    monkeypatch.setattr(loop, "build", build)
    return seen


def train(make_project, tmp_path, method: str, rows=None, extra: str = "") -> tuple[Path, loop.TrainSummary]:
    from tunewise.pipeline import start_run

    config_path = make_project(rows, extra=f"method: {method}\n{extra}")
    run, config = start_run(config_path, [], tmp_path / "runs", QUIET)
    return run, loop.train_model(run, train_settings(config), QUIET, track_settings(config))


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny llama at hidden size 64: bitsandbytes' CPU 4-bit kernels need rows of >= 64 (its block)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("tiny64")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


SFT = {
    "lora": "",
    "dora": "",
    "qlora": "model: {base: TINY64}\n",
    "full": "train: {epochs: 2, batch_size: 8, lr: 0.003}\n",
    "prompt_tuning": "train: {epochs: 2, batch_size: 8, lr: 0.1}\nprompt_tuning: {virtual_tokens: 4}\n",
    "dpo": "train: {epochs: 3, batch_size: 8, lr: 0.01}\n",
    "orpo": "train: {epochs: 3, batch_size: 8, lr: 0.01}\n",
}


@pytest.mark.parametrize("method", list(SFT))
def test_method_trains_changes_only_its_weights_and_loads_in_the_reference_library(
        method, make_project, tmp_path, captured, tiny_model_dir, tiny64_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = preference_rows(60) if method in ("dpo", "orpo") else None
    run, summary = train(make_project, tmp_path, method, rows, SFT[method].replace("TINY64", str(tiny64_dir)))
    if method == "qlora":
        tiny_model_dir = tiny64_dir
        assert type(captured["tr"].causal_lm.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"

    # the loss fell
    assert summary.method == method and summary.steps > 0
    assert summary.best_val_loss < summary.first_val_loss - 0.01, summary
    # trainable weights changed, frozen ones did not (bit for bit)
    tr, before = captured["tr"], captured["before"]
    trained_ids = {id(p) for p in tr.params}
    changed, frozen_changed, n_trained = 0, [], 0
    for name, p in tr.model.named_parameters():
        same = torch.equal(p.detach(), before[name])
        if id(p) in trained_ids:
            n_trained += 1
            changed += not same
        elif not same:
            frozen_changed.append(name)
    assert not frozen_changed, frozen_changed
    assert n_trained == len(tr.params) and changed >= 0.9 * n_trained, (changed, n_trained)
    if method == "full":
        assert n_trained == len(before)  # every weight trains
    else:
        assert 0 < n_trained < len(before)

    # the artifact loads in the reference library and is not the base model
    ids = torch.tensor([[1, 42, 7, 99, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        if method == "full":
            assert not (run.adapter / "adapter_config.json").exists()
            loaded = AutoModelForCausalLM.from_pretrained(run.adapter).eval()
            logits = loaded(ids).logits
        else:
            adapter_config = json.loads((run.adapter / "adapter_config.json").read_text())
            expected_type = "PROMPT_TUNING" if method == "prompt_tuning" else "LORA"
            assert adapter_config["peft_type"] == expected_type
            assert adapter_config.get("use_dora", False) == (method == "dora")
            loaded = PeftModel.from_pretrained(base, run.adapter).eval()
            logits = loaded(input_ids=ids).logits[:, -ids.shape[1]:]
    assert (logits - base_logits).abs().max() > 1e-3
    assert read_json(run.train_summary)["peak_memory_mib"] > 0


def test_preference_accuracy_rises_with_dpo(make_project, tmp_path):
    run, summary = train(make_project, tmp_path, "dpo", preference_rows(60), SFT["dpo"])
    log = [json.loads(line) for line in run.train_log.read_text().splitlines()]
    accuracy = [row["val_preference_accuracy"] for row in log if "val_preference_accuracy" in row]
    assert accuracy[-1] > accuracy[0]
    assert log[0]["val_loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as the reference: log 2


def test_orpo_loss_matches_trl():
    """Our odds-ratio term against TRL's own `ORPOTrainer.odds_ratio_loss` on the same log-probs."""
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    from tunewise.train.preference import orpo_losses

    g = torch.Generator().manual_seed(0)
    avg_c, avg_r = -torch.rand(6, generator=g) * 3, -torch.rand(6, generator=g) * 3
    ours, _ = orpo_losses(avg_c, avg_r, nll_c=torch.zeros(6), beta=0.1)
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs = ORPOTrainer.odds_ratio_loss(trainer, avg_c, avg_r)[0]
    torch.testing.assert_close(ours, -theirs)  # TRL returns beta * logsigmoid, which its caller subtracts


def test_dpo_loss_from_sequence_logprobs_matches_a_direct_computation(tiny_model_dir, tokenizer):
    """Sequence log-probs (LM head on labeled positions only) against log_softmax over the full
    logits, and the DPO loss against its definition with those numbers."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tunewise.data import Example
    from tunewise.train.batches import collate
    from tunewise.train.loss import sequence_logprobs
    from tunewise.models import ChatFormat
    from tunewise.train.preference import dpo_losses, encode_pair

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    chat = ChatFormat.build(tokenizer, model="tiny")
    pairs = [encode_pair(chat, Example(messages=[{"role": "user", "content": f"q{i}" * (i + 1)},
                                                      {"role": "assistant", "content": "yes" * (i + 1)}],
                                            source=f"x:{i}", rejected="no"), "Be brief.") for i in range(3)]
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, **batch)
        logp = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    direct = (logp[:, :-1].gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(sums, direct, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == mask.sum(-1).tolist() and all(c > 0 for c in counts.tolist())
    # only the final answer and its end-of-turn token are labeled: not the prompt, system turn or "\n" after
    assert counts[3:].tolist() == [len(tokenizer("no<|im_end|>", add_special_tokens=False)["input_ids"])] * 3
    pi_c, pi_r = sums[:3], sums[3:]
    ref_c, ref_r = pi_c - 0.5, pi_r + 0.25
    losses, margin = dpo_losses(pi_c, pi_r, ref_c, ref_r, beta=0.2)
    torch.testing.assert_close(losses, torch.full((3,), -F.logsigmoid(torch.tensor(0.2 * 0.75)).item()))
    torch.testing.assert_close(margin, torch.full((3,), 0.15))




@pytest.mark.parametrize("method, rows, expected", [
    ("dpo", None, ["method dpo trains on preference pairs", "has no rejected answer", "method: lora"]),
    ("orpo", None, ["method orpo trains on preference pairs"]),
    ("lora", "pairs", ["is a preference pair", "method lora", "method: dpo"]),
])
def test_method_and_data_that_do_not_fit_exit_2_before_any_run_folder(
        method, rows, expected, make_project, tmp_path, monkeypatch, capsys):
    config = make_project(preference_rows(40) if rows else None, extra=f"method: {method}\n")
    code, output = run_cli(monkeypatch, capsys, "run", "-c", str(config), "--runs", str(tmp_path / "runs"))
    assert code == 2 and "Traceback" not in output, output
    flat = " ".join(output.split())
    for text in expected:
        assert text in flat, (text, output)
    assert re.search(r"data\.jsonl:\d+ ", flat), output  # the file and line of the first row that does not fit
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_target_modules_that_do_not_exist_list_the_real_ones(make_project, tmp_path):
    from tunewise.pipeline import start_run

    config = make_project(extra="lora: {target_modules: [q_proj, attn_out]}\n")
    run, cfg = start_run(config, [], tmp_path / "runs", QUIET)
    with pytest.raises(TunewiseError) as err:
        loop.train_model(run, train_settings(cfg), QUIET, track_settings(cfg))
    message = str(err.value)
    assert "['attn_out'] do not exist" in message and "lora.target_modules" in message
    for real in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"):
        assert real in message
    assert "lm_head" not in message
    assert not run.adapter.exists() and not run.checkpoints.exists()


def test_qlora_without_bitsandbytes_is_a_clear_error(make_project, tmp_path, monkeypatch):
    from tunewise.pipeline import start_run

    run, cfg = start_run(make_project(extra="method: qlora\n"), [], tmp_path / "runs", QUIET)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(TunewiseError) as err:
        loop.train_model(run, train_settings(cfg), QUIET, track_settings(cfg))
    message = str(err.value)
    assert "method qlora needs bitsandbytes" in message and "method: lora" in message
    assert not run.adapter.exists()


def test_memory_plan_halves_the_batch_and_keeps_the_global_batch(monkeypatch, tiny_model_dir):
    import psutil

    from tunewise.config import Config

    config = Config.model_validate({"data": {"path": "x"}, "model": {"base": str(tiny_model_dir)}})
    tr = methods.build(config.method, adapter_shape(train_settings(config)), tiny_model_dir, torch.float32)
    roomy = plan.memory_plan(tr, 8, 1, 128, "auto", 1, 0)
    assert roomy == (8, 1, False, "")
    # 1 MB free: checkpointing goes on first, then the batch halves while accumulation doubles
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1.5e6})())
    batch, accum, checkpointing, note = plan.memory_plan(tr, 8, 1, 128, "auto", 1, 0)
    assert checkpointing and batch * accum == 8 and batch < 8 and "halved" in note
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1e3})())
    with pytest.raises(TunewiseError, match="train.max_seq_len"):
        plan.memory_plan(tr, 8, 1, 128, "auto", 1, 0)


def test_memory_plan_counts_the_logits_of_the_vocabulary(monkeypatch, tiny_model_dir):
    import psutil

    from tunewise.config import Config

    config = Config.model_validate({"data": {"path": "x"}, "model": {"base": str(tiny_model_dir)}})
    tr = methods.build(config.method, adapter_shape(train_settings(config)), tiny_model_dir, torch.float32)
    vocab = tr.causal_lm.get_output_embeddings().weight.shape[0]
    # room for 8 rows of activations with checkpointing, not for 8 rows x 64 answer tokens of fp32 logits x3
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 150e6})())
    assert plan.memory_plan(tr, 8, 1, 128, "on", 1, 0)[0] == 8
    batch, accum, _, note = plan.memory_plan(tr, 8, 1, 128, "on", 1, 64)
    assert batch * 3 * 4 * vocab * 64 < 0.7 * 150e6 < 8 * 3 * 4 * vocab * 64  # what halving had to reach
    assert batch == 2 and accum == 4 and "logits" in note
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 30e6})())
    with pytest.raises(TunewiseError) as err:
        plan.memory_plan(tr, 8, 1, 128, "on", 1, 64)
    assert f"{vocab:,}-token vocabulary" in err.value.message


@pytest.mark.parametrize("method", ["full", "prompt_tuning", "dpo"])
def test_tunewise_run_end_to_end_with_the_method(method, make_project, tmp_path):
    """Every stage (baselines, train, evaluate with the trained weights, verdict, report) runs."""
    from tunewise.evaluate.arms import FINETUNED
    from tunewise.pipeline import run_pipeline

    rows = preference_rows(60) if method == "dpo" else None
    config = make_project(rows, extra=f"method: {method}\n{SFT[method]}eval: {{forgetting: false, max_new_tokens: 8}}\n")
    run, verdict = run_pipeline(config, [], tmp_path / "runs", QUIET)
    assert verdict.decision in ("SHIP", "DO NOT SHIP")
    assert run.report.exists() and read_json(run.train_summary)["method"] == method
    predictions = [json.loads(line) for line in run.predictions(FINETUNED).read_text().splitlines()]
    assert predictions and all(isinstance(p["output"], str) for p in predictions)
    # the trained weights were what generated: their fingerprint, not the base model's
    assert read_json(run.metrics(FINETUNED))["model"] != read_json(run.metrics("zero_shot"))["model"]


def test_export_of_a_full_fine_tune_and_refusals_for_prompt_tuning(make_project, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunewise.deploy.engine import check_adapter
    from tunewise.deploy.export import export_run

    run, _ = train(make_project, tmp_path / "full", "full", extra=SFT["full"])
    written = export_run(run.root, tmp_path / "out", merge=True, console=QUIET)
    exported = AutoModelForCausalLM.from_pretrained(written["merged"]).eval()
    trained = AutoModelForCausalLM.from_pretrained(run.adapter).eval()
    ids = torch.tensor([[1, 42, 7, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=1e-2, atol=1e-2)
    with pytest.raises(TunewiseError, match="full fine-tune"):
        check_adapter("ft", run.adapter)

    pt, _ = train(make_project, tmp_path / "pt", "prompt_tuning", extra=SFT["prompt_tuning"])
    with pytest.raises(TunewiseError, match="PROMPT_TUNING adapter .* no weights to merge"):
        export_run(pt.root, tmp_path / "out2", merge=True, console=QUIET)
    assert not (tmp_path / "out2" / "merged").exists()
    with pytest.raises(TunewiseError, match="cannot mix prompt-learning adapters"):
        check_adapter("pt", pt.adapter)


def test_qlora_where_bitsandbytes_cannot_run_is_a_clear_error(make_project, tmp_path, monkeypatch):
    """A model whose layers are not whole 64-value blocks (the 32-wide tiny llama), and a device
    without a bitsandbytes backend (simulated), both stop before training with the reason."""
    from transformers import AutoModelForCausalLM

    from tunewise.pipeline import start_run

    run, cfg = start_run(make_project(extra="method: qlora\n"), [], tmp_path / "runs", QUIET)
    with pytest.raises(TunewiseError) as err:
        loop.train_model(run, train_settings(cfg), QUIET, track_settings(cfg))
    assert "whole blocks of 64" in str(err.value) and "q_proj (32)" in str(err.value)
    assert "method: lora" in str(err.value) and not run.checkpoints.exists()

    def no_backend(*args, **kwargs):
        raise NotImplementedError("no bitsandbytes backend for device 'xpu'")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_backend)
    with pytest.raises(TunewiseError, match="cannot quantize this model to 4 bits on this machine: no bitsandbytes"):
        loop.train_model(run, train_settings(cfg), QUIET, track_settings(cfg))
