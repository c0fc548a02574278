"""Eval-generation benchmark: tunewise's batched generation against a plain per-example loop.

Run: .venv/bin/python bench/eval_generate.py [--items 64] [--max-new-tokens M] [--repeats 3] [--fp32]

Both methods run greedy decoding on the embedded SmolLM2-135M-Instruct, loaded the way the
evaluate stage loads it (`load_model(path, dtype=compute_dtype())`, `load_tokenizer(path)`):
1. tunewise: `tunewise.models.generate.generate` (batches of eval.batch_size, left padding,
   KV cache, prompts sorted by length, stops when every row has ended its turn);
2. reference: what a typical eval script does, one prompt at a time: `apply_chat_template(...,
   add_generation_prompt=True, return_tensors="pt")`, `model.generate(..., do_sample=False)`, decode.
Prompts are the demo task's zero-shot prompts (its system prompt + the user turn) for the last
--items rows of examples/debian-sections/packages.jsonl; max_new_tokens is derived as the runner
derives it (from the other rows, standing in for the train split) unless given. Each method is
warmed up once, then the two alternate (A B A B ...) so drift on a shared CPU hits both; seconds
are medians. Generated tokens are counted per row up to and including the first end-of-turn token.
Target: tunewise >= 4x the reference's items/s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "debian-sections"


def load_demo(items: int):
    """Config, the last `items` rows as test examples, and the rows before them as 'train'."""
    from tunewise.config import load_config
    from tunewise.data import Example

    config = load_config(DEMO / "tunewise.yaml")
    lines = (DEMO / "packages.jsonl").read_text().splitlines()
    rows = [Example(messages=json.loads(line)["messages"], source=f"packages.jsonl:{n}")
            for n, line in enumerate(lines, 1)]
    return config, rows[-items:], rows[:-items]


class TokenCounter:
    """Wraps `model.generate` on one model instance to count what each call produced.

    `tokens`: new tokens per row up to and including the first EOS (what the model had to
    produce); `row_steps`: rows x decode steps the calls ran (padding after EOS included)."""

    def __init__(self, model, eos_id: int):
        self.model, self.eos_id, self.inner = model, eos_id, model.generate
        self.tokens = self.row_steps = 0
        model.generate = self

    def reset(self) -> None:
        self.tokens = self.row_steps = 0

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)  # (B, prompt + new)
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        new = out[:, prompt.shape[1]:]  # (B, S)
        ended = new == self.eos_id
        first = torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1])  # (B,)
        self.tokens += int(first.sum())
        self.row_steps += new.numel()
        return out


def reference_generate(model, tokenizer, prompts, *, max_new_tokens: int) -> list[str]:
    """The per-example loop a typical eval script writes."""
    outputs = []
    with torch.inference_mode():
        for messages in prompts:
            enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)  # (1, prompt + new)
            outputs.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return outputs


def derived_budget(config, tokenizer, train) -> int:
    """max_new_tokens as the runner derives it (tunewise.evaluate.runner.max_new_tokens), repeated
    here so the benchmark does not import the whole evaluate stage."""
    if config.eval.max_new_tokens:
        return config.eval.max_new_tokens
    longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in train)
    return min(1024, 2 * longest + 32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=64, help="test items: the last N rows of the demo data")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: derived as the runner does")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, alternated")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the demo's eval.batch_size")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own); 1 keeps a shared CPU's contention from "
                             "stalling every small op at a thread barrier")
    parser.add_argument("--fp32", action="store_true",
                        help="both methods in float32 instead of compute_dtype(): tells bf16 rounding from a bug")
    args = parser.parse_args()

    from tunewise.evaluate.arms import build_prompts
    from tunewise.models import compute_dtype, load_chat, load_model, resolve_base
    from tunewise.models.generate import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=120)
    quiet = Console(quiet=True)  # generate()'s progress bar would interleave with this script's lines
    config, test, train = load_demo(args.items)
    path = resolve_base(config.model.base)
    dtype = torch.float32 if args.fp32 else compute_dtype()
    model, chat = load_model(path, dtype=dtype), load_chat(path, model=config.model.base)
    tokenizer = chat.tokenizer
    budget = args.max_new_tokens or derived_budget(config, tokenizer, train)
    batch_size = args.batch_size or config.eval.batch_size
    prompts = build_prompts("zero_shot", test, config.task.system_prompt, [[]] * len(test))
    counter = TokenCounter(model, tokenizer.eos_token_id)
    console.print(f"{config.model.base}, {dtype}, {torch.get_num_threads()} threads; {len(prompts)} zero-shot "
                  f"prompts, max_new_tokens={budget}{'' if args.max_new_tokens else ' (derived)'}, "
                  f"batch_size={batch_size}, {args.repeats} alternated repeats")

    methods = {
        "tunewise generate()": lambda ps: generate(model, chat, ps, max_new_tokens=budget, batch_size=batch_size,
                                                   console=quiet, label="bench"),
        "per-example loop": lambda ps: reference_generate(model, tokenizer, ps, max_new_tokens=budget),
    }
    for run in methods.values():  # warm-up: kernels, allocator, tokenizer caches
        run(prompts[:8])
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, list[str]] = {}
    tokens: dict[str, int] = {}
    row_steps: dict[str, int] = {}
    for r in range(args.repeats):
        for name, run in methods.items():
            counter.reset()
            started, cpu_started = time.perf_counter(), time.process_time()
            outputs[name] = run(prompts)
            seconds[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
            tokens[name], row_steps[name] = counter.tokens, counter.row_steps
            console.print(f"  repeat {r + 1}: {name} {seconds[name][-1]:.1f} s, {cpu[name][-1]:.1f} CPU s "
                          f"(load average {os.getloadavg()[0]:.1f})")

    ours, ref = methods
    median = {name: statistics.median(s) for name, s in seconds.items()}
    table = Table(title=f"eval generation, {len(prompts)} items, max_new_tokens={budget} (target: >= 4x)")
    for col in ("method", "items", "seconds (median)", "runs", "CPU s", "new tokens", "tokens/s", "items/s", "speedup"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name in (ref, ours):
        table.add_row(name, str(len(prompts)), f"{median[name]:.1f}", " ".join(f"{s:.1f}" for s in seconds[name]),
                      f"{statistics.median(cpu[name]):.1f}",
                      str(tokens[name]), f"{tokens[name] / median[name]:.0f}", f"{len(prompts) / median[name]:.2f}",
                      f"{median[ref] / median[name]:.1f}x")
    console.print(table)
    same = [a == b for a, b in zip(outputs[ours], outputs[ref])]
    console.print(f"identical outputs: {sum(same)}/{len(same)} ({sum(same) / len(same):.0%}); "
                  f"batched decode ran {row_steps[ours]} row-steps for {tokens[ours]} useful tokens "
                  f"({1 - tokens[ours] / row_steps[ours]:.0%} spent on rows that had already ended)")
    for i in [i for i, s in enumerate(same) if not s][:3]:
        console.print(f"  differs, item {i}: tunewise {outputs[ours][i]!r} / reference {outputs[ref][i]!r}",
                      markup=False)


if __name__ == "__main__":
    main()
