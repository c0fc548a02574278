"""Small data builders the tests share."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

SECTIONS = ["games", "net", "sound", "utils"]
# `make test` / `make test-fast` install llama.cpp and Go and set this: a test needing them then runs
# (and fails if they are missing) instead of skipping; a bare `pytest` elsewhere skips, saying why
REQUIRE_TOOLS = os.environ.get("TUNEWISE_REQUIRE_TOOLS") == "1"


def has_llamacpp() -> bool:
    from tunewise.deploy import llamacpp

    return REQUIRE_TOOLS or llamacpp.available()


needs_llamacpp = pytest.mark.skipif(not has_llamacpp(), reason="llama.cpp is not built here: make llamacpp")


def tiny_model(folder: Path, tokenizer) -> Path:
    """A seeded 2-layer random llama with `tokenizer` (seconds to train): the tests' tiny model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def label_rows(n: int, seed: int = 0) -> list[dict]:
    """n distinct chat rows whose answer is a short JSON object (the demo task's shape)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        section = rng.choice(SECTIONS)
        rows.append({"messages": [
            {"role": "user", "content": f"Package: pkg-{section}-{i}\nDescription: a {section} tool number {i}"},
            {"role": "assistant", "content": json.dumps({"section": section})},
        ]})
    return rows


DEMO_ROWS = Path(__file__).resolve().parents[1] / "src" / "tunewise" / "examples" / "debian-sections" / "packages.jsonl"
SHARED_INSTRUCTION = ("Read the Debian package name and its short description below and answer with the one archive "
                      "section it belongs to")  # 20 words


def debian_rows(n: int) -> list[tuple[str, str]]:
    """(package text, section) of the first n shipped demo rows: real Debian data."""
    lines = DEMO_ROWS.read_text(encoding="utf-8").splitlines()[:n]
    chats = [json.loads(line)["messages"] for line in lines]
    return [(m[0]["content"], json.loads(m[1]["content"])["section"]) for m in chats]


def alpaca_rows(n: int) -> list[dict]:
    """n Alpaca rows in the commonest shape: one task instruction, a different input per row."""
    return [{"instruction": SHARED_INSTRUCTION, "input": text, "output": section} for text, section in debian_rows(n)]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`tunewise ARGS` through its real entry point (exit codes and error printing included):
    (exit code, stdout + stderr)."""
    from tunewise.cli import main

    monkeypatch.setattr(sys, "argv", ["tunewise", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out + out.err


def write_verdict(path: Path, decision: str, *, reason: str = "test", primary: str = "json_exact",
                  best: str = "few_shot", means: dict | None = None) -> None:
    """A whole verdict.json through its type, as the verdict stage writes one (for test fakes)."""
    from tunewise.artifacts import Decision, Verdict

    means = means or {"finetuned": 0.5, best: 0.2}
    diff = {"mean": means["finetuned"] - means[best], "low": 0.0, "high": 0.5}
    test = {"name": "McNemar exact", "p_value": 0.01}
    Verdict(decision=Decision(decision), reason=reason, primary_metric=primary, best_baseline=best,
            baselines=[a for a in means if a != "finetuned"], means=means, difference=diff, test=test,
            comparisons={a: {"difference": diff, "test": test} for a in means if a != "finetuned"}, margin=0.02,
            alpha=0.05, n_items=10, red_flags=[]).write(path)


# --- run-folder files through their types (artifacts.py), for fakes of earlier stages --------------

def write_manifest(path: Path, version: str = "ds-1", *, counts: dict | None = None, split_strategy: str = "random",
                   output_type: str = "json") -> None:
    """A data/manifest.json as the data stage writes one, with only what a test cares about set."""
    from tunewise.artifacts import DataManifest

    DataManifest(version=version, tunewise_version="test", inputs={}, formats={}, settings={},
                 split_strategy=split_strategy, output_type=output_type,
                 counts=counts or {"train": 10, "val": 2, "test": 2}, rejected_by_kind={}, sha256={}, stats={},
                 warnings=[], clusters=[], contaminated=[]).write(path)


def train_summary(**values):
    """A TrainSummary with plausible figures; `values` override them."""
    from tunewise.artifacts import TrainSummary

    figures = dict(base="tiny", method="lora", dtype="float32", lr=2e-4, epochs=2, batch_size=4, grad_accum=1,
                   max_seq_len=64, steps=10, train_examples=40, dropped_too_long=0, trainable_params=1000, best_step=8,
                   best_val_loss=0.5, first_val_loss=1.5, final_train_loss=0.4, tokens=4000, seconds=10.0,
                   tokens_per_second=400.0, step_tokens_per_second=450.0, peak_memory_mib=500.0,
                   gradient_checkpointing=False, world_size=1, stopped_early=False, resumed_from_step=None,
                   fast_path=[])
    return TrainSummary(**(figures | values))


def write_weights_record(folder: Path, *, dataset_version: str | None = None, config_sha256: str | None = None,
                         train=None, plan=None, step: int = 8, val_loss: float = 0.5) -> None:
    """tunewise.json next to fake trained weights, as training leaves it."""
    from tunewise.artifacts import Provenance, WeightsRecord

    provenance = Provenance(run=folder.parent.name, config_sha256=config_sha256, dataset_version=dataset_version,
                            seeds={"data": 0, "eval": 0, "train": 0}, libraries={"torch": "test"}, created="")
    WeightsRecord(step=step, val_loss=val_loss, provenance=provenance, train=train,
                  plan=plan).write(folder / "tunewise.json")


def write_arm_metrics(path: Path, arm: str, primary: str, metrics: dict[str, dict]) -> None:
    """metrics/<arm>.json as evaluation writes one."""
    from tunewise.artifacts import ArmMetrics

    ArmMetrics(output_type="json", n=5, metrics=metrics, confusion={}, arm=arm, primary=primary,
               model="test").write(path)


def train_plan(**values):
    """A TrainPlan as training resolves one (LoRA r=4 on all linear layers unless `values` say otherwise)."""
    from tunewise.artifacts import TrainPlan

    figures = dict(base="tiny", method="lora", task="tiny task", system_prompt="Reply with JSON.",
                   describe="LoRA r=4 alpha=8",
                   adapter={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "bias": "none",
                            "use_dora": False},
                   preference=None, dtype="float32", device="cpu", engine="one process", world_size=1, lr=2e-4,
                   lr_default=True, schedule="cosine", warmup_ratio=0.05, warmup_steps=0, weight_decay=0.0,
                   batch_size=4, grad_accum=1, global_batch=4, memory_note="", gradient_checkpointing=False, epochs=2,
                   steps_per_epoch=5, total_steps=10, eval_every=2, save_every=2, keep_checkpoints=2, patience=3,
                   max_seq_len=64, train_examples=40, dropped_too_long=0, trainable_params=1000, fast_path=[],
                   seeds={"data": 0, "eval": 0, "train": 0}, fingerprint={})
    return TrainPlan(**(figures | values))
