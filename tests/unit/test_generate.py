"""Evaluation generation backs off when a batch runs out of device memory: the batch halves, the
rest of the prompts go in the smaller batches, and one prompt that does not fit is a clear error."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat, load_model
from tunewise.models import generate as gen

PROMPTS = [[{"role": "user", "content": f"Package: pkg{i}\nDescription: tool {'x ' * i}"}] for i in range(7)]


@pytest.fixture(scope="module")
def model_and_chat(tiny_model_dir, tokenizer):
    return load_model(tiny_model_dir, dtype=torch.float32), ChatFormat.build(tokenizer, model="tiny")


def test_a_batch_out_of_memory_halves_and_the_outputs_are_all_there(model_and_chat, monkeypatch):
    model, chat = model_and_chat
    plain = gen.generate(model, chat, PROMPTS, max_new_tokens=6, batch_size=2, console=Console(quiet=True),
                         label="plain")
    real, sizes = gen.generate_batch, []

    def tight(model, chat, texts, **kwargs):  # a device with room for two prompts at a time
        sizes.append(len(texts))
        if len(texts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, chat, texts, **kwargs)

    monkeypatch.setattr(gen, "generate_batch", tight)
    out = io.StringIO()
    kept: list[dict] = []
    backed = gen.generate(model, chat, PROMPTS, max_new_tokens=6, batch_size=8, console=Console(file=out, width=200),
                          label="few_shot", on_outputs=kept.append)
    assert backed == plain  # fp32: the same outputs at batch 2, in the prompts' order
    assert [len(k) for k in kept] == [2, 2, 2, 1]  # each finished batch handed over as it finished
    assert {i: t for k in kept for i, t in k.items()} == dict(enumerate(plain))
    assert sizes == [7, 4, 2, 2, 2, 1]  # 8 -> 4 -> 2, then the rest at 2
    text = out.getvalue()
    assert "few_shot: out of memory at a batch of 7; generating the rest in batches of 4" in text
    assert "out of memory at a batch of 4; generating the rest in batches of 2" in text


def test_one_prompt_that_does_not_fit_is_a_clear_error(model_and_chat, monkeypatch):
    model, chat = model_and_chat

    def full(model, chat, texts, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(gen, "generate_batch", full)
    with pytest.raises(TunewiseError) as err:
        gen.generate(model, chat, PROMPTS[:3], max_new_tokens=6, batch_size=4, console=Console(quiet=True),
                     label="zero_shot")
    assert "out of memory generating one prompt for zero_shot" in str(err.value)
    assert "eval.max_new_tokens" in str(err.value)
