"""Device and precision chosen once; out-of-memory while loading or training is a clear exit 2."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_cli
from tunewise.errors import TunewiseError
from tunewise.models import device as device_mod
from tunewise.models.device import Placement, out_of_memory, placement


def test_cpu_placement_and_explicit_precisions():
    auto = placement()  # the CPU tiers hide CUDA (tests/conftest.py)
    assert auto.device.type == "cpu" and not auto.loss_scaling and auto.device_map() is None
    assert auto.dtype == (torch.bfloat16 if device_mod.bf16_on_cpu() else torch.float32)
    assert placement("fp32").dtype == torch.float32 and placement("bf16").dtype == torch.bfloat16
    assert not placement("fp16").loss_scaling  # loss scaling is for fp16 on CUDA


def test_gpu_without_bf16_gets_fp16_with_loss_scaling(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a T4 / V100
    cuda = placement(device=torch.device("cuda", 0))
    assert cuda.dtype == torch.float16 and cuda.loss_scaling
    assert cuda.device_map() == {"": torch.device("cuda", 0)}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert placement(device=torch.device("cuda", 0)) == Placement(torch.device("cuda", 0), torch.bfloat16, False)


def test_out_of_memory_names_the_need_what_was_free_and_the_setting(monkeypatch):
    monkeypatch.setattr(device_mod, "free_bytes", lambda device: 3 * 2**30)
    with pytest.raises(TunewiseError) as err:
        with out_of_memory("loading x", device=torch.device("cuda", 0), needed=14 * 2**30, setting="model.base",
                           fix="use method: qlora"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(err.value)
    assert "about 14.0 GiB needed" in message and "3.0 GiB free on cuda:0" in message
    assert "model.base" in message and "qlora" in message and "Tried to allocate 2.00 GiB" in message


def test_loading_out_of_memory_is_exit_2_with_the_weights_size(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunewise.models import load_model

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", full)
    with pytest.raises(TunewiseError) as err:
        load_model(tiny_model_dir)
    assert "out of memory loading" in str(err.value) and "model.base" in str(err.value)


def test_training_out_of_memory_stops_the_run_with_exit_2(monkeypatch, capsys, make_project, tmp_path):
    from tunewise.train import loop

    config = make_project()

    def full(self, tr, rows, items=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop.SFTObjective, "loss", full)
    code, out = run_cli(monkeypatch, capsys, "run", "-c", str(config), "--runs", str(tmp_path / "runs"))
    assert code == 2 and "Traceback" not in out
    assert "out of memory validating" in out and "train.batch_size" in out  # step 0's validation comes first
    monkeypatch.setattr(loop.SFTObjective, "validate", lambda self, tr, batch, autocast: {"val_loss": 1.0})
    code, out = run_cli(monkeypatch, capsys, "run", "-c", str(config), "--runs", str(tmp_path / "again"))
    assert code == 2 and "Traceback" not in out
    assert "out of memory in training step 1" in out and "grad_accum" in out and "20.00 GiB" in out
