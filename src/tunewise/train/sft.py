"""LoRA supervised fine-tuning recipe: set up, train, evaluate on val, keep the best, save.

Read top to bottom. Loss is taken only on the assistant's tokens; validation loss is measured
`train.evals_per_epoch` times per epoch and the adapter with the lowest one is the result,
a standard PEFT folder (adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from tunewise.config import Config
from tunewise.data import Example, load_split, with_system
from tunewise.errors import TunewiseError
from tunewise.models import compute_dtype, load_model, load_tokenizer, resolve_base
from tunewise.progress import progress_bar
from tunewise.runs import RunDir, atomic_write_json, atomic_write_jsonl, replace_dir
from tunewise.train.batches import collate, length_grouped_batches
from tunewise.train.loss import supervised_loss
from tunewise.train.tokenize import Encoded, encode_chat

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainSummary:
    base: str
    dtype: str
    epochs: int
    batch_size: int
    grad_accum: int
    max_seq_len: int
    steps: int
    train_examples: int
    dropped_too_long: int
    trainable_params: int
    best_step: int
    best_val_loss: float
    first_val_loss: float
    final_train_loss: float
    tokens: int
    seconds: float
    tokens_per_second: float


def derive_batch_size(lengths: list[int], tokens_per_batch: int = 2048) -> int:
    """About `tokens_per_batch` tokens a step, as a power of two between 1 and 32."""
    typical = sorted(lengths)[int(0.95 * (len(lengths) - 1))]
    size = max(1, min(32, tokens_per_batch // max(typical, 1)))
    return 1 << (size.bit_length() - 1)


def derive_epochs(n_train: int) -> int:
    """Small sets need more passes; large ones one pass (overfitting shows up on val anyway)."""
    return 3 if n_train < 500 else 2 if n_train < 1500 else 1


def target_modules(model, preset: str | list[str]) -> str | list[str]:
    if preset == "all-linear":
        return "all-linear"
    wanted = list(ATTENTION) if preset == "attention" else list(preset)
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [m for m in wanted if m not in present]
    if missing:
        raise TunewiseError(
            f"target modules {missing} do not exist in this model",
            field="lora.target_modules",
            fix=f"choose from: {', '.join(sorted(present))} (or the presets 'attention', 'all-linear')",
        )
    return wanted


def encode_split(tokenizer, examples: list[Example], system_prompt: str) -> list[Encoded]:
    return [encode_chat(tokenizer, with_system(e.messages, system_prompt)) for e in examples]


@torch.no_grad()
def validation_loss(model, items: list[Encoded], batch_size: int, pad_id: int, autocast, move) -> float:
    """Token-weighted mean loss over the validation items."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for start in range(0, len(order), batch_size):
        batch = move(collate([items[i] for i in order[start : start + batch_size]], pad_id))
        with autocast():
            loss, n = supervised_loss(model, **batch)
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def save_adapter(model, tokenizer, target: Path, provenance: dict) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)  # the chat template trained with travels with the adapter
    atomic_write_json(tmp / "tunewise.json", provenance)
    replace_dir(tmp, target)


def train_sft(run: RunDir, config: Config, console: Console) -> TrainSummary:
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
    lora, hp = config.lora, config.train
    torch.manual_seed(hp.seed)

    # --- data: encode under the model's chat template; loss only on assistant tokens
    base_path = resolve_base(config.model.base)
    tokenizer = load_tokenizer(base_path)
    train_items = encode_split(tokenizer, load_split(run.split("train")), config.task.system_prompt)
    val_items = encode_split(tokenizer, load_split(run.split("val")), config.task.system_prompt)
    max_seq_len = hp.max_seq_len or max(len(i) for i in train_items + val_items)
    kept = [i for i in train_items if len(i) <= max_seq_len]
    dropped = len(train_items) - len(kept)
    if not kept:
        raise TunewiseError(f"every training example is longer than {max_seq_len} tokens", field="train.max_seq_len")
    train_items, val_items = kept, [i for i in val_items if len(i) <= max_seq_len]
    batch_size = hp.batch_size or derive_batch_size([len(i) for i in train_items])
    epochs = hp.epochs or derive_epochs(len(train_items))
    steps_per_epoch = math.ceil(len(train_items) / (batch_size * hp.grad_accum))
    total_steps = steps_per_epoch * epochs
    eval_every = max(1, steps_per_epoch // hp.evals_per_epoch)

    # --- model: frozen base in the compute dtype, LoRA weights in fp32 under autocast
    dtype = compute_dtype()
    model = load_model(base_path, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha or 2 * lora.r,
            lora_dropout=lora.dropout,
            target_modules=target_modules(model, lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    n_trainable = sum(p.numel() for p in trainable)
    causal_lm = model.get_base_model()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        model.to("cuda")

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    optimizer = torch.optim.AdamW(trainable, lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total_steps), total_steps)
    console.print(
        f"[bold]train[/] LoRA r={lora.r} alpha={lora.alpha or 2 * lora.r} on {config.model.base} ({dtype}); "
        f"{len(train_items)} examples (dropped {dropped} > {max_seq_len} tokens), batch {batch_size} x "
        f"accum {hp.grad_accum}, {epochs} epoch(s) = {total_steps} steps, lr {hp.lr}, "
        f"{n_trainable:,} trainable params"
    )

    # --- train
    pad_id = tokenizer.pad_token_id
    move = (lambda b: {k: v.cuda() for k, v in b.items()}) if device_type == "cuda" else (lambda b: b)
    log_rows: list[dict] = []
    best_val = first_val = validation_loss(causal_lm, val_items, batch_size * 2, pad_id, autocast, move)
    log_rows.append({"step": 0, "epoch": 0.0, "val_loss": best_val})
    best_step, step, tokens, last_loss = 0, 0, 0, float("nan")
    save_adapter(model, tokenizer, run.checkpoints / "best", {"step": 0, "val_loss": best_val})
    started = time.perf_counter()
    model.train()
    with progress_bar(console) as progress:
        task = progress.add_task("training", total=total_steps, status="")
        for epoch in range(epochs):
            batches = length_grouped_batches([len(i) for i in train_items], batch_size, hp.seed + epoch)
            for first in range(0, len(batches), hp.grad_accum):
                group = batches[first : first + hp.grad_accum]
                step_loss = 0.0
                for idx in group:
                    batch = move(collate([train_items[i] for i in idx], pad_id))
                    tokens += int(batch["attention_mask"].sum())
                    with autocast():
                        loss, _ = supervised_loss(causal_lm, **batch)
                    (loss / len(group)).backward()
                    step_loss += float(loss.detach()) / len(group)
                if not math.isfinite(step_loss):
                    raise TunewiseError(
                        f"training loss became {step_loss} at step {step + 1}; the best adapter so far "
                        f"is in {run.checkpoints / 'best'}",
                        field="train.lr",
                        fix=f"lower the learning rate (now {hp.lr})",
                    )
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                last_loss = step_loss
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "train_loss": step_loss,
                       "lr": scheduler.get_last_lr()[0], "tokens": tokens}
                if step % eval_every == 0 or step == total_steps:
                    row["val_loss"] = validation_loss(causal_lm, val_items, batch_size * 2, pad_id, autocast, move)
                    if row["val_loss"] < best_val:
                        best_val, best_step = row["val_loss"], step
                        save_adapter(model, tokenizer, run.checkpoints / "best", {"step": step, "val_loss": best_val})
                log_rows.append(row)
                progress.update(task, advance=1, status=f"loss {step_loss:.3f} val {best_val:.3f}")
    seconds = time.perf_counter() - started

    # --- save: the best checkpoint becomes the run's adapter, with provenance
    summary = TrainSummary(
        base=config.model.base, dtype=str(dtype).removeprefix("torch."), epochs=epochs, batch_size=batch_size,
        grad_accum=hp.grad_accum, max_seq_len=max_seq_len, steps=step, train_examples=len(train_items),
        dropped_too_long=dropped, trainable_params=n_trainable, best_step=best_step, best_val_loss=best_val,
        first_val_loss=first_val, final_train_loss=last_loss, tokens=tokens, seconds=round(seconds, 2),
        tokens_per_second=round(tokens / max(seconds, 1e-9), 1),
    )
    atomic_write_jsonl(run.train_log, log_rows)
    provenance = {**run.provenance(hp.seed), "train": asdict(summary)}
    best = run.checkpoints / "best"
    atomic_write_json(best / "tunewise.json", provenance)
    tmp = run.adapter.with_name(".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best, tmp)
    replace_dir(tmp, run.adapter)
    atomic_write_json(run.train_summary, asdict(summary))
    return summary
