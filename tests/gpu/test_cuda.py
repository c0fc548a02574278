"""The `gpu` tier: what only a CUDA device shows. `pytest -m gpu tests/gpu` (or `make gpu-smoke`)
on a machine with a GPU; skipped elsewhere. The CPU tiers hide CUDA (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from tunewise.models import ChatFormat, compute_dtype
from tunewise.pipeline import run_pipeline
from tunewise.runs import read_json

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sequence_logprobs_on_cuda_equal_the_cpu_ones(tiny_model_dir, tokenizer):
    """Preference losses index the per-row sums with the label mask: on CUDA the row index must
    live on the mask's device (it was a CPU arange indexed by a CUDA mask)."""
    from transformers import AutoModelForCausalLM

    from tunewise.train.batches import collate
    from tunewise.train.loss import sequence_logprobs

    chat = ChatFormat.build(tokenizer, model="tiny")
    items = [chat.encode([{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a" * n}])
             for n in (3, 9)]
    batch = collate(items, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cpu = sequence_logprobs(model, **batch)
    gpu = sequence_logprobs(model.to("cuda"), **{k: v.to("cuda") for k, v in batch.items()})
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(gpu[1].cpu(), cpu[1])


def test_compute_dtype_on_cuda_is_what_the_gpu_really_has():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert compute_dtype() == expected


def test_models_load_straight_onto_the_gpu(tiny_model_dir):
    from tunewise.models import load_model
    from tunewise.models.device import placement

    place = placement()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(tiny_model_dir, dtype=place.dtype, place=place)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {place.dtype}


@pytest.mark.parametrize("method", ["lora", "dpo"])
def test_the_pipeline_runs_on_cuda_and_loss_falls(make_project, tmp_path, method):
    from tests.helpers import label_rows

    rows = label_rows(60)
    if method == "dpo":
        rows = [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
                 "rejected": "no"} for r in rows]
    config = make_project(rows, extra=f"method: {method}\n")
    run, verdict = run_pipeline(config, [], tmp_path / "runs", Console(quiet=True))
    summary = read_json(run.train_summary)
    assert summary["best_val_loss"] < summary["first_val_loss"]
    assert verdict.decision in ("SHIP", "DO NOT SHIP")
