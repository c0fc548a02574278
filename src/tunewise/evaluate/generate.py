"""Batched greedy generation with the KV cache (left padding, prompts sorted by length)."""

from __future__ import annotations

import torch
from rich.console import Console

from tunewise.data.records import Message
from tunewise.progress import progress_bar


@torch.inference_mode()
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
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    outputs: list[str] = [""] * len(texts)
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    model.eval()
    with progress_bar(console) as progress:
        task = progress.add_task(label, total=len(texts), status="")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )  # (B, prompt + new)
            new = out[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text.strip()
            progress.update(task, advance=len(idx))
    return outputs
