"""Batched greedy generation with the KV cache (left padding, prompts sorted by length).

`generate_batch` is the one place where tunewise turns prompts into tokens: the evaluate stage
and `tunewise serve` both call it, so a served adapter answers what was evaluated.
"""

from __future__ import annotations

import torch
from rich.console import Console

from tunewise.data.records import Message
from tunewise.progress import progress_bar


def render(tokenizer, messages: list[Message]) -> str:
    """The chat prompt as the model sees it: its own chat template, ready for the assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def generate_batch(model, tokenizer, texts: list[str], *, max_new_tokens: int, streamer=None,
                   stopping_criteria=None, sampling: dict | None = None) -> torch.Tensor:
    """The new token ids (B, <= max_new_tokens) for rendered prompts, one batch with left padding.
    Greedy unless `sampling` gives `temperature`/`top_p`; rows stop at the end-of-turn token."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(device) for k, v in enc.items()}
    options = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        stopping_criteria=stopping_criteria,
        **options,
    )  # (B, prompt + new)
    return out[:, enc["input_ids"].shape[1]:]


def decode(tokenizer, ids: list[int] | torch.Tensor) -> str:
    """An answer's text as the evaluate stage records it: special tokens dropped, stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate(
    model,
    tokenizer,
    prompts: list[list[Message]],
    *,
    max_new_tokens: int,
    batch_size: int,
    console: Console,
    label: str,
) -> list[str]:
    """Greedy completions of chat prompts, in the prompts' order; stops at the end-of-turn token."""
    texts = [render(tokenizer, p) for p in prompts]
    lengths = [prompt_length(tokenizer, t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    outputs: list[str] = [""] * len(texts)
    model.eval()
    with progress_bar(console) as progress:
        task = progress.add_task(label, total=len(texts), status="")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            new = generate_batch(model, tokenizer, [texts[i] for i in idx], max_new_tokens=max_new_tokens)
            for i, row in zip(idx, new):
                outputs[i] = decode(tokenizer, row)
            progress.update(task, advance=len(idx))
    return outputs
