"""Batched greedy generation with the KV cache (left padding, prompts sorted by length).

`generate_batch` is the one place where tunewise turns prompts into tokens: the evaluate stage
and `tunewise serve` both call it with the model family's `ChatFormat`, so a served adapter
answers what was evaluated: same template, same token ids, same stop tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
from rich.console import Console
from rich.text import Text

from tunewise.data.records import Message
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat
from tunewise.progress import progress_bar


def left_padded(chat: ChatFormat, texts: list[str], device) -> dict[str, torch.Tensor]:
    """Rendered prompts -> input_ids and attention_mask (B, T), padded on the left."""
    rows = [chat.ids(t) for t in texts]
    width = max(len(r) for r in rows)
    pad = chat.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.inference_mode()
def generate_batch(model, chat: ChatFormat, texts: list[str], *, max_new_tokens: int, streamer=None,
                   stopping_criteria=None, sampling: dict | None = None) -> torch.Tensor:
    """The new token ids (B, <= max_new_tokens) for rendered prompts, one batch with left padding.
    Greedy unless `sampling` gives `temperature`/`top_p`; rows stop at any of the family's stop tokens."""
    enc = left_padded(chat, texts, next(model.parameters()).device)
    options = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(chat.stop_ids),
        pad_token_id=chat.tokenizer.pad_token_id,
        streamer=streamer,
        stopping_criteria=stopping_criteria,
        **options,
    )  # (B, prompt + new)
    return out[:, enc["input_ids"].shape[1]:]


def generate(
    model,
    chat: ChatFormat,
    prompts: list[list[Message]],
    *,
    max_new_tokens: int,
    batch_size: int,
    console: Console,
    label: str,
    on_outputs: Callable[[dict[int, str]], None] | None = None,
) -> list[str]:
    """Greedy completions of chat prompts, in the prompts' order, cut at the first stop token
    (reasoning blocks are kept here; `ChatFormat.split` takes them apart for scoring). A batch
    that runs out of device memory is retried at half the size, down to one prompt, and the rest
    of the prompts go in the smaller batches (said on the console: outputs at another batch shape
    can differ in their last bits). `on_outputs({position: text})` gets each batch's outputs as it
    finishes (the evaluation cache stores them at once)."""
    texts = [chat.prompt(p) for p in prompts]
    lengths = [len(chat.ids(t)) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    outputs: list[str] = [""] * len(texts)
    model.eval()
    start, size = 0, batch_size
    with progress_bar(console) as progress:
        task = progress.add_task(label, total=len(texts), status="")
        while start < len(order):
            idx = order[start : start + size]
            try:
                new = generate_batch(model, chat, [texts[i] for i in idx], max_new_tokens=max_new_tokens)
            except torch.OutOfMemoryError as err:
                size = _smaller_batch(size, len(idx), max_new_tokens, err, console, label)
                continue
            for i, row in zip(idx, new):
                outputs[i] = chat.text(row.tolist())
            if on_outputs is not None:
                on_outputs({i: outputs[i] for i in idx})
            progress.update(task, advance=len(idx))
            start += len(idx)
    return outputs


def _smaller_batch(size: int, tried: int, max_new_tokens: int, err: Exception, console: Console, label: str) -> int:
    """Half of the batch that ran out of memory; a TunewiseError when even one prompt does not fit."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if tried <= 1:
        raise TunewiseError(f"out of memory generating one prompt for {label} ({str(err).splitlines()[0][:200]})",
                            field="eval.max_new_tokens",
                            fix=f"lower eval.max_new_tokens (now {max_new_tokens}) or eval.max_test, or use a "
                                "device with more memory") from None
    smaller = max(1, size // 2)
    console.print(Text.assemble(("warning ", "yellow"), f"{label}: out of memory at a batch of {tried}; generating "
                                f"the rest in batches of {smaller} (outputs at another batch shape can differ slightly)"))
    return smaller
