"""What each CPU training lever gives: tokens/s of tunewise's LoRA step with the levers added one at a time.

Run: .venv/bin/python bench/train_levers.py [--steps 10] [--batch-size 8] [--repeats 2] [--run RUN_DIR]
     [--profile VARIANT]   (prints torch.profiler's top operators for one variant instead)

Same model, data and LoRA as bench/train_speed.py (the embedded SmolLM2-135M-Instruct, the demo
run's train split with the task's system prompt, r=16, alpha=32, dropout 0.05 on q/k/v/o, bf16
autocast, length-grouped batches, loss and LM head on assistant tokens only). Each variant runs in
its own subprocess: 2 warm-up steps, then `--steps` timed optimizer steps (forward, backward,
AdamW); a variant's rate is the median over its steps of the step's tokens / seconds (robust to a
step slowed by another job on a shared machine), then the median over repeats, which alternate
the order. Variants, cumulative:
  plain          PEFT as it comes: SDPA attention (the CPU flash kernel), LoRA inputs cast to fp32,
                 nn.Dropout (one bernoulli draw per element)
  +eager         eager attention (matmul + softmax) instead of SDPA
  +bf16-inputs   LoRA inputs left in bf16 (PEFT's cast to the fp32 adapter dtype switched off)
  +cheap-dropout CheapDropout masks (one 0/1 mask per distinct input of a layer, numpy PCG64 bits)
  +fused-norm    RMSNorm through FusedRMSNorm
  +grouped-attn  eager attention without repeating k/v per query head (fast.grouped_eager_attention)
  +fused-lora    LoRA forward with the rescales folded into B, the sum into addmm, and one A product
                 for q/k/v: tunewise's default path (fast.cpu_fast_path)
  no-dropout     reference: the default path with dropout 0 (what dropout still costs)
  +compile       the default path with every decoder layer under torch.compile (dynamic shapes);
                 the warm-up steps include the compilation
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "+eager", "+bf16-inputs", "+cheap-dropout", "+fused-norm", "+grouped-attn", "+fused-lora",
            "no-dropout", "+compile")


def child(variant: str, run: Path, steps: int, batch_size: int, profile: bool) -> dict:
    import torch

    from tunewise.config import load_config
    from tunewise.data import load_split
    from tunewise.models import compute_dtype, load_chat, resolve_base
    from tunewise.settings import train_settings
    from tunewise.train import fast, methods
    from tunewise.train.batches import collate, length_grouped_batches
    from tunewise.train.loop import encode_items
    from tunewise.train.loss import supervised_loss
    from tunewise.train.plan import adapter_shape

    overrides = ["track=none", "method=lora", "lora.r=16", "lora.alpha=32", "lora.target_modules=attention",
                 f"lora.dropout={0.0 if variant == 'no-dropout' else 0.05}"]
    config = load_config(run / "config.yaml", overrides)
    base = resolve_base(config.model.base)
    chat = load_chat(base, model=config.model.base)
    tokenizer = chat.tokenizer
    items = encode_items(config.method, config.task.system_prompt, chat, load_split(run / "data" / "train.jsonl"))
    dtype = compute_dtype()
    torch.manual_seed(0)
    tr = methods.build(config.method, adapter_shape(train_settings(config)), base, dtype)
    level = VARIANTS.index(variant) if variant not in ("no-dropout", "+compile") else len(VARIANTS)
    if level >= VARIANTS.index("+cheap-dropout"):
        fast.cpu_fast_path(tr, dtype, 512)
        if level < VARIANTS.index("+grouped-attn"):  # the levers before it: transformers' own eager attention
            tr.causal_lm.set_attn_implementation("eager")
        for module in tr.causal_lm.modules():  # the levers not reached yet: back to the module's own forward
            if "forward" in vars(module):
                lever = "+fused-norm" if hasattr(module, "variance_epsilon") else "+fused-lora"
                if level < VARIANTS.index(lever):
                    del module.forward
        if variant == "+compile":  # every decoder layer through inductor, shapes dynamic (lengths vary)
            for layer in tr.causal_lm.model.layers:
                layer.compile(dynamic=True)
    else:
        if level >= VARIANTS.index("+eager"):
            tr.causal_lm.set_attn_implementation("eager")
        if level >= VARIANTS.index("+bf16-inputs"):
            for module in tr.model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
    optimizer = torch.optim.AdamW(tr.params, lr=2e-4)
    batches = length_grouped_batches([len(i) for i in items], batch_size, 0)
    tr.model.train()

    def step(idx) -> int:
        batch = collate([items[i] for i in idx], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=dtype):
            total, n = supervised_loss(tr.causal_lm, **batch)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    for idx in batches[:2]:
        step(idx)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for idx in batches[2 : 2 + steps]:
                step(idx)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45), file=sys.stderr)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=400), file=sys.stderr)
        return {}
    rates = []  # per step: a step slowed by another tenant of the machine moves the median little
    for idx in batches[2 : 2 + steps]:
        started = time.perf_counter()
        tokens = step(idx)
        rates.append(tokens / (time.perf_counter() - started))
    return {"rate": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--profile", choices=VARIANTS, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset to run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = args.run or sorted(p for p in (ROOT / "runs").iterdir() if (p / "data" / "train.jsonl").exists())[-1]
    if args.child:
        print(json.dumps(child(args.child, run, args.steps, args.batch_size, args.profile is not None)))
        return
    if args.profile:
        subprocess.run([sys.executable, __file__, "--child", args.profile, "--profile", args.profile,
                        "--run", str(run), "--steps", str(args.steps), "--batch-size", str(args.batch_size)])
        return

    from rich.console import Console
    from rich.table import Table

    chosen = [v for v in VARIANTS if v in args.variants.split(",")]
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown or not chosen:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    rates: dict[str, list[float]] = {v: [] for v in chosen}
    for repeat in range(args.repeats):
        for variant in chosen if repeat % 2 == 0 else chosen[::-1]:
            done = subprocess.run([sys.executable, __file__, "--child", variant, "--run", str(run), "--steps",
                                   str(args.steps), "--batch-size", str(args.batch_size)],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rates[variant].append(result["rate"])
            print(f"{variant}: {rates[variant][-1]:.0f} tokens/s", flush=True)
    table = Table(title=f"CPU levers, LoRA step on the embedded model: {args.steps} steps x {args.batch_size} "
                        f"examples, median of {args.repeats}")
    for column in ("variant", "tokens/s", f"vs {chosen[0]}", "vs previous"):
        table.add_column(column)
    plain = statistics.median(rates[chosen[0]])
    previous = plain
    for variant in chosen:
        rate = statistics.median(rates[variant])
        table.add_row(variant, f"{rate:.0f}", f"{rate / plain:.2f}x", f"{rate / previous:.2f}x")
        previous = rate if variant != "no-dropout" else previous
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
