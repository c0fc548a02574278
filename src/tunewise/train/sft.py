"""LoRA supervised fine-tuning recipe: set up, train, evaluate on val, keep the best, save.

Read top to bottom. Loss is taken only on the assistant's tokens; validation loss is measured
`train.evals_per_epoch` times per epoch, training stops early after `train.patience` evaluations
without a new best, and the adapter with the lowest one is the result, a standard PEFT folder
(adapter_config.json + adapter_model.safetensors). A checkpoint every `train.save_every` steps
(see checkpoint.py) lets a killed run continue where it was, to the same weights.
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
from pydantic import BaseModel
from rich.console import Console

from tunewise.config import Config
from tunewise.data import Example, load_split, with_system
from tunewise.errors import TunewiseError
from tunewise.models import compute_dtype, load_model, load_tokenizer, resolve_base
from tunewise.progress import progress_bar
from tunewise.runs import RunDir, atomic_write_json, atomic_write_jsonl, read_json, replace_dir
from tunewise.train.batches import collate, length_grouped_batches
from tunewise.train.checkpoint import (
    TrainerState,
    clean_partial,
    differing_keys,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from tunewise.train.loss import supervised_loss
from tunewise.train.tokenize import Encoded, encode_chat

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
NOT_IN_FINGERPRINT = ("save_every", "keep_checkpoints")  # how often state is saved, not what is learned


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
    stopped_early: bool
    resumed_from_step: int | None


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


def flat(section: str, values: BaseModel, skip: tuple[str, ...] = ()) -> dict:
    return {f"{section}.{k}": v for k, v in values.model_dump(mode="json").items() if k not in skip}


def patience_ran_out(log: list[dict], best_step: int, patience: int | None) -> bool:
    """`patience` validations in a row have not beaten the best validation loss."""
    evals_since_best = sum(1 for row in log if "val_loss" in row and row["step"] > best_step)
    return patience is not None and evals_since_best >= patience


def check_resumable(saved: TrainerState, fingerprint: dict, config_file: Path, checkpoint: Path) -> None:
    """Refuse to continue a checkpoint under settings that would train something else."""
    changed = differing_keys(saved.fingerprint, fingerprint)
    if changed:
        was = "; ".join(f"{k}: {saved.fingerprint.get(k)!r} in the checkpoint, {fingerprint.get(k)!r} now"
                        for k in changed)
        raise TunewiseError(
            f"cannot resume: the run's settings differ from its checkpoint {checkpoint.name} in "
            f"{', '.join(changed)} ({was})",
            file=config_file,
            field=changed[0] if len(changed) == 1 else None,
            fix=f"put those values back in {config_file} to continue this training; to train with the new "
                f"values start a new run (tunewise run -c tunewise.yaml --set ...), or delete "
                f"{checkpoint.parent} to train this run again from scratch",
        )


def non_finite_error(what: str, value: float, step: int, rows: list[int], lr: float, dtype: torch.dtype,
                     run: RunDir, state: TrainerState) -> TunewiseError:
    """NaN/inf: where it happened, what usually causes it, and what was kept."""
    lines = ", ".join(str(r + 1) for r in sorted(rows))
    where = f"this step's examples are lines {lines} of {run.split('train')}" if rows else f"in {run.split('val')}"
    last_good = list_checkpoints(run.checkpoints)
    kept = f"the last good checkpoint is {last_good[-1]}" if last_good else "no step checkpoint was written yet"
    return TunewiseError(
        f"{what} became {value} at step {step}; training stopped and no checkpoint was written after it. "
        f"Likely causes: a learning rate too high for this model (train.lr = {lr:g}), a numeric overflow "
        f"under {str(dtype).removeprefix('torch.')} autocast (likelier with float16), or a bad data row ({where}). "
        f"Kept: {kept}; the best adapter so far is {run.checkpoints / 'best'} "
        f"(val loss {state.best_val:.4f} at step {state.best_step})",
        field="train.lr",
        fix=f"lower train.lr (e.g. --set train.lr={lr / 10:g} in a new run) or fix those rows; if the cause was "
            f"transient, continue from the last good checkpoint with: tunewise run --resume {run.root}",
    )


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
    shutil.rmtree(tmp, ignore_errors=True)
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
    kept_rows = [r for r, item in enumerate(train_items) if len(item) <= max_seq_len]  # line r+1 of train.jsonl
    dropped = len(train_items) - len(kept_rows)
    if not kept_rows:
        raise TunewiseError(f"every training example is longer than {max_seq_len} tokens", field="train.max_seq_len")
    train_items, val_items = [train_items[r] for r in kept_rows], [i for i in val_items if len(i) <= max_seq_len]
    batch_size = hp.batch_size or derive_batch_size([len(i) for i in train_items])
    epochs = hp.epochs or derive_epochs(len(train_items))
    steps_per_epoch = math.ceil(len(train_items) / (batch_size * hp.grad_accum))
    total_steps = steps_per_epoch * epochs
    eval_every = max(1, steps_per_epoch // hp.evals_per_epoch)
    save_every = hp.save_every or eval_every

    # --- resume: the newest complete checkpoint, if it was trained with these settings
    fingerprint = {
        "model.base": config.model.base, "task.system_prompt": config.task.system_prompt,
        "dataset_version": read_json(run.manifest).get("version") if run.manifest.exists() else None,
        **flat("lora", lora), **flat("train", hp, skip=NOT_IN_FINGERPRINT),
        "batch_size (derived)": batch_size, "epochs (derived)": epochs, "max_seq_len (derived)": max_seq_len,
        "train_examples": len(train_items),
    }
    found = list_checkpoints(run.checkpoints)
    if found:
        check_resumable(read_trainer_state(found[-1]), fingerprint, run.config, found[-1])
    clean_partial(run.checkpoints)

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
        f"{n_trainable:,} trainable params; val every {eval_every} steps"
        f"{f', stop after {hp.patience} without a new best' if hp.patience else ''}, "
        f"checkpoint every {save_every} (keep {hp.keep_checkpoints})"
    )

    # --- start, or continue exactly where the newest checkpoint left off (weights, optimizer, RNG)
    pad_id = tokenizer.pad_token_id
    move = (lambda b: {k: v.cuda() for k, v in b.items()}) if device_type == "cuda" else (lambda b: b)
    best_dir = run.checkpoints / "best"
    if found:
        state = load_checkpoint(found[-1], model, optimizer, scheduler)
        best = read_json(best_dir / "tunewise.json") if (best_dir / "tunewise.json").exists() else None
        if best is None:
            raise TunewiseError(f"{best_dir} is missing", fix=f"delete {run.checkpoints} to train this run again")
        if best.get("step", -1) > state.best_step:  # a new best found after the checkpoint, before the kill
            state.best_step, state.best_val = best["step"], best["val_loss"]
        console.print(f"  resuming from {found[-1]} (step {state.step} of {total_steps})")
    else:
        first_val = validation_loss(causal_lm, val_items, batch_size * 2, pad_id, autocast, move)
        state = TrainerState(step=0, epoch=0, next_batch=0, tokens=0, seconds=0.0, last_loss=None,
                             first_val=first_val, best_val=first_val, best_step=0,
                             log=[{"step": 0, "epoch": 0.0, "val_loss": first_val}], fingerprint=fingerprint)
        save_adapter(model, tokenizer, best_dir, {"step": 0, "val_loss": first_val})
    resumed_from = state.step if found else None

    # --- train: step k always takes the same batches (the epoch's seeded order, position k)
    lengths = [len(i) for i in train_items]
    order_epoch, batches = -1, []
    started = time.perf_counter() - state.seconds
    model.train()
    with progress_bar(console) as progress:
        task = progress.add_task("training", total=total_steps, completed=state.step, status="")
        while state.step < total_steps and not patience_ran_out(state.log, state.best_step, hp.patience):
            epoch, position = divmod(state.step, steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, batches = epoch, length_grouped_batches(lengths, batch_size, hp.seed + epoch)
            group = batches[position * hp.grad_accum : (position + 1) * hp.grad_accum]
            step_loss = 0.0
            for idx in group:
                batch = move(collate([train_items[i] for i in idx], pad_id))
                state.tokens += int(batch["attention_mask"].sum())
                with autocast():
                    loss, _ = supervised_loss(causal_lm, **batch)
                (loss / len(group)).backward()
                step_loss += float(loss.detach()) / len(group)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))
            for what, value in (("training loss", step_loss), ("gradient norm", grad_norm)):
                if not math.isfinite(value):  # stop before this step touches the weights
                    examples = [kept_rows[i] for idx in group for i in idx]
                    raise non_finite_error(what, value, state.step + 1, examples, hp.lr, dtype, run, state)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.epoch, position = divmod(state.step, steps_per_epoch)
            state.next_batch, state.last_loss = position * hp.grad_accum, step_loss
            row = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "train_loss": step_loss,
                   "lr": scheduler.get_last_lr()[0], "tokens": state.tokens}
            if state.step % eval_every == 0 or state.step == total_steps:
                row["val_loss"] = validation_loss(causal_lm, val_items, batch_size * 2, pad_id, autocast, move)
                if not math.isfinite(row["val_loss"]):
                    raise non_finite_error("validation loss", row["val_loss"], state.step, [], hp.lr, dtype, run, state)
                if row["val_loss"] < state.best_val:
                    state.best_val, state.best_step = row["val_loss"], state.step
                    save_adapter(model, tokenizer, best_dir, {"step": state.step, "val_loss": state.best_val})
            state.log.append(row)
            if state.step % save_every == 0 or state.step == total_steps:
                state.seconds = time.perf_counter() - started
                save_checkpoint(run.checkpoints, model, optimizer, scheduler, state, keep=hp.keep_checkpoints)
                atomic_write_jsonl(run.train_log, state.log)
            progress.update(task, advance=1, status=f"loss {step_loss:.3f} val {state.best_val:.3f}")
    seconds = time.perf_counter() - started

    # --- save: the best checkpoint becomes the run's adapter, with provenance
    summary = TrainSummary(
        base=config.model.base, dtype=str(dtype).removeprefix("torch."), epochs=epochs, batch_size=batch_size,
        grad_accum=hp.grad_accum, max_seq_len=max_seq_len, steps=state.step, train_examples=len(train_items),
        dropped_too_long=dropped, trainable_params=n_trainable, best_step=state.best_step,
        best_val_loss=state.best_val, first_val_loss=state.first_val,
        final_train_loss=state.last_loss if state.last_loss is not None else float("nan"), tokens=state.tokens,
        seconds=round(seconds, 2), tokens_per_second=round(state.tokens / max(seconds, 1e-9), 1),
        stopped_early=state.step < total_steps, resumed_from_step=resumed_from,
    )
    if summary.stopped_early:
        console.print(f"  stopped early at step {state.step}: {hp.patience} validations without a new best")
    atomic_write_jsonl(run.train_log, state.log)
    provenance = {"step": state.best_step, "val_loss": state.best_val, **run.provenance(hp.seed),
                  "train": asdict(summary)}
    atomic_write_json(best_dir / "tunewise.json", provenance)
    tmp = run.adapter.with_name(".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best_dir, tmp)
    replace_dir(tmp, run.adapter)
    atomic_write_json(run.train_summary, asdict(summary))
    return summary
