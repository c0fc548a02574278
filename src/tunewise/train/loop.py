"""The train stage: one loop for every method (see methods.py), read top to bottom.

Set up (data -> items, model -> trainable weights, memory plan), then train: every optimizer step
takes a fixed, seeded group of micro-batches; validation runs `train.evals_per_epoch` times an
epoch; training stops early after `train.patience` validations without a new best, and the
weights with the lowest validation loss are the result (a PEFT adapter folder, or a model folder
for full fine-tuning). A checkpoint every `train.save_every` steps (checkpoint.py) lets a killed
run continue where it was, to the same weights. Under torchrun / accelerate launch the same loop
runs data-parallel (distributed.py).

Objectives: SFT methods minimize the next-token loss on the assistant's tokens; `dpo` and `orpo`
minimize a preference loss on chosen/rejected pairs (preference.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.console import Console

from tunewise.artifacts import DataManifest, Provenance, TrainSummary, WeightsRecord
from tunewise.config import PREFERENCE_METHODS, Config
from tunewise.data import Example, load_split, with_system
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat, base_chat, resolve_base
from tunewise.models.chat import IGNORE, Encoded
from tunewise.models.device import out_of_memory, placement
from tunewise.progress import progress_bar
from tunewise.runs import (
    RunDir,
    atomic_write_jsonl,
    replace_dir,
)
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
from tunewise.train.distributed import init_distributed
from tunewise.train.fast import cpu_fast_path
from tunewise.train.loss import sequence_logprobs, supervised_loss
from tunewise.train.methods import Trainable, build, learning_rate, peak_memory_mib
from tunewise.train.preference import Pair, dpo_losses, encode_pair, orpo_losses

NOT_IN_FINGERPRINT = ("save_every", "keep_checkpoints")  # how often state is saved, not what is learned


def derive_batch_size(lengths: list[int], tokens_per_batch: int = 2048) -> int:
    """About `tokens_per_batch` tokens a step, as a power of two between 1 and 32."""
    typical = sorted(lengths)[int(0.95 * (len(lengths) - 1))]
    size = max(1, min(32, tokens_per_batch // max(typical, 1)))
    return 1 << (size.bit_length() - 1)


def derive_epochs(n_train: int) -> int:
    """Small sets need more passes; large ones one pass (overfitting shows up on val anyway)."""
    return 3 if n_train < 500 else 2 if n_train < 1500 else 1


def flat(section: str, values: BaseModel, skip: tuple[str, ...] = ()) -> dict:
    return {f"{section}.{k}": v for k, v in values.model_dump(mode="json").items() if k not in skip}


def patience_ran_out(log: list[dict], best_step: int, patience: int | None) -> bool:
    """`patience` validations in a row have not beaten the best validation loss."""
    evals_since_best = sum(1 for row in log if "val_loss" in row and row["step"] > best_step)
    return patience is not None and evals_since_best >= patience


def check_method_fits_data(config: Config, examples: list[Example], where: Path | str) -> None:
    """Preference methods need prompt/chosen/rejected pairs; the others train on chats."""
    method = config.method
    if method in PREFERENCE_METHODS:
        missing = next((e for e in examples if e.rejected is None), None)
        if missing is not None:
            raise TunewiseError(
                f"method {method} trains on preference pairs, but {missing.source} has no rejected answer "
                f"(this data is supervised chats)",
                file=where, field="method",
                fix="give prompt/chosen/rejected rows (chosen and rejected as strings or chats), or train on "
                    "these chats with method: lora (or dora, qlora, full, prompt_tuning)",
            )
    else:
        paired = next((e for e in examples if e.rejected is not None), None)
        if paired is not None:
            raise TunewiseError(
                f"{paired.source} is a preference pair (prompt/chosen/rejected), but method {method} trains on "
                f"chats and would silently ignore every rejected answer",
                file=where, field="method",
                fix="set method: dpo (or orpo) to learn from the pairs; to fine-tune on the chosen answers only, "
                    "convert the rows to chats (messages, or prompt/completion) without the rejected field",
            )


def memory_plan(trainable: Trainable, batch_size: int, grad_accum: int, seq_len: int, setting: str,
                rows_per_example: int, answer_tokens: int) -> tuple[int, int, bool, str]:
    """Micro-batch, accumulation and gradient checkpointing that fit in memory, same global batch
    (`batch_size * grad_accum` examples per step; the micro-batch is halved, the accumulation
    becomes however many micro-batches the global batch takes).

    Activations per token per layer are taken as 34*h + 5*heads*T bytes (Korthikanti et al. 2022,
    16-bit activations, no recomputation); with checkpointing only each layer's input (2*h bytes)
    is kept plus one layer's full set. The LM head runs on the supervised positions only, but its
    float32 logits over the whole vocabulary (x3: logits, log-softmax, gradient) are what a 128k-
    or 262k-vocabulary family runs out of memory on: `answer_tokens` per row are counted. The
    budget is 70% of the memory available now: the GPU's free memory when training on a GPU.
    """
    import psutil

    cfg = trainable.causal_lm.config
    cfg = getattr(cfg, "text_config", None) or cfg
    h, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    vocab = trainable.causal_lm.get_output_embeddings().weight.shape[0]
    device = next(trainable.causal_lm.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = psutil.virtual_memory().available
    budget = 0.7 * free - (12 * trainable.n_params if not trainable.is_adapter else 0)  # grads + Adam moments
    global_batch = batch_size * grad_accum

    def need(batch: int, checkpointing: bool) -> float:
        tokens = batch * rows_per_example * seq_len
        per_layer = (34 * h + 5 * heads * seq_len) * tokens
        logits = 3 * 4 * vocab * batch * rows_per_example * answer_tokens
        return logits + ((2 * h * tokens * layers + per_layer) if checkpointing else per_layer * layers)

    checkpointing = setting == "on"
    if setting == "auto" and need(batch_size, False) > budget:
        checkpointing = True
    note = ""
    while need(batch_size, checkpointing) > budget and batch_size > 1:
        batch_size = batch_size // 2
        grad_accum = math.ceil(global_batch / batch_size)
        note = (f" (halved to fit in memory: {need(batch_size, checkpointing) / 2**30:.1f} GiB of activations "
                "and logits)")
    if need(batch_size, checkpointing) > budget:
        where = f"{device.type} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "this machine"
        raise TunewiseError(
            f"one example of {seq_len} tokens needs about {need(1, checkpointing) / 2**30:.1f} GiB of activations "
            f"and logits ({vocab:,}-token vocabulary), more than the {max(budget, 0) / 2**30:.1f} GiB {where} "
            f"has free for them",
            field="train.max_seq_len",
            fix="lower train.max_seq_len (longer examples are dropped), or use method: qlora / a machine with more memory",
        )
    return batch_size, grad_accum, checkpointing, note


def objective_answer_tokens(item) -> int:
    """Supervised positions of one training row (a preference pair: its longer side)."""
    if isinstance(item, Encoded):
        return sum(1 for label in item.labels if label != IGNORE)
    return max(objective_answer_tokens(item.chosen), objective_answer_tokens(item.rejected))


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
        f"Kept: {kept}; the best weights so far are in {run.checkpoints / 'best'} "
        f"(val loss {state.best_val:.4f} at step {state.best_step})",
        field="train.lr",
        fix=f"lower train.lr (e.g. --set train.lr={lr / 10:g} in a new run) or fix those rows; if the cause was "
            f"transient, continue from the last good checkpoint with: tunewise train --resume {run.root}",
    )


# --- objectives: what one micro-batch's loss is, and what validation measures


class SFTObjective:
    """Next-token loss on the assistant's tokens; the unit of a step is one supervised token."""

    def __init__(self, train: list[Encoded], val: list[Encoded], pad_id: int):
        self.train, self.val, self.pad_id = train, val, pad_id

    @staticmethod
    def units(item: Encoded) -> int:
        return sum(1 for label in item.labels[1:] if label != IGNORE)

    def loss(self, tr: Trainable, rows: list[int], items: list[Encoded] | None = None) -> torch.Tensor:
        batch = [(items or self.train)[i] for i in rows]
        prefix = tr.prefix(len(batch)) if tr.prefix else None
        total, _ = supervised_loss(tr.causal_lm, **tr_move(tr, collate(batch, self.pad_id)), prefix=prefix)
        return total

    @torch.no_grad()
    def validate(self, tr: Trainable, batch_size: int, autocast) -> dict:
        total = sum(self.units(i) for i in self.val)
        loss = 0.0
        order = sorted(range(len(self.val)), key=lambda i: len(self.val[i]))
        for start in range(0, len(order), batch_size):
            with autocast():
                loss += float(self.loss(tr, order[start : start + batch_size], self.val))
        return {"val_loss": loss / max(total, 1)}


class PreferenceObjective:
    """DPO or ORPO on chosen/rejected pairs; the unit of a step is one pair."""

    def __init__(self, method: str, train: list[Pair], val: list[Pair], pad_id: int, beta: float, sft_weight: float):
        self.method, self.train, self.val, self.pad_id = method, train, val, pad_id
        self.beta, self.sft_weight = beta, sft_weight
        self.ref: dict[str, torch.Tensor] = {}

    @staticmethod
    def units(item: Pair) -> int:
        return 1

    def _logps(self, tr: Trainable, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed log-probs and labeled-token counts of chosen and rejected, one forward for both."""
        batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_id)
        sums, counts = sequence_logprobs(tr.causal_lm, **tr_move(tr, batch))
        n = len(pairs)
        counts = counts.to(sums.device)
        return sums[:n], sums[n:], counts[:n], counts[n:]

    @torch.no_grad()
    def precompute_reference(self, tr: Trainable, batch_size: int, autocast) -> None:
        """DPO's reference: the base model (adapter off), scored once for every pair."""
        if self.method != "dpo":
            return
        tr.model.eval()
        with tr.model.disable_adapter():
            for name, pairs in (("train", self.train), ("val", self.val)):
                chosen, rejected = [], []
                for start in range(0, len(pairs), batch_size):
                    with autocast():
                        c, r, _, _ = self._logps(tr, pairs[start : start + batch_size])
                    chosen.append(c.float().cpu())
                    rejected.append(r.float().cpu())
                self.ref[name] = torch.stack([torch.cat(chosen), torch.cat(rejected)])  # (2, N)
        tr.model.train()

    def _losses(self, tr: Trainable, rows: list[int], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [(self.train if split == "train" else self.val)[i] for i in rows]
        pi_c, pi_r, n_c, n_r = self._logps(tr, pairs)
        nll_c = -pi_c / n_c.clamp(min=1)
        if self.method == "dpo":
            ref = self.ref[split][:, rows].to(pi_c.device)
            losses, margin = dpo_losses(pi_c, pi_r, ref[0], ref[1], self.beta)
            losses = losses + self.sft_weight * nll_c
        else:
            losses, margin = orpo_losses(pi_c / n_c.clamp(min=1), pi_r / n_r.clamp(min=1), nll_c, self.beta)
        return losses, margin

    def loss(self, tr: Trainable, rows: list[int]) -> torch.Tensor:
        return self._losses(tr, rows, "train")[0].sum()

    @torch.no_grad()
    def validate(self, tr: Trainable, batch_size: int, autocast) -> dict:
        total, right = 0.0, 0
        for start in range(0, len(self.val), batch_size):
            with autocast():
                losses, margin = self._losses(tr, list(range(start, min(start + batch_size, len(self.val)))), "val")
            total, right = total + float(losses.sum()), right + int((margin > 0).sum())
        n = max(len(self.val), 1)
        return {"val_loss": total / n, "val_preference_accuracy": right / n}


def tr_move(tr: Trainable, batch: dict) -> dict:
    device = next(tr.causal_lm.parameters()).device
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def save_weights(tr: Trainable, chat: ChatFormat, target: Path, step: int, val_loss: float) -> None:
    """The adapter (PEFT folder) or the whole model (full), with tokenizer and record, atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tr.model.save_pretrained(tmp)
    chat.tokenizer.chat_template = chat.template  # the template trained with (a base model's default too)
    chat.tokenizer.save_pretrained(tmp)  # travels with the weights; its settings in tunewise.json "chat"
    WeightsRecord(step=step, val_loss=val_loss, chat=chat.record()).write(tmp / "tunewise.json")
    replace_dir(tmp, target)


def encode_items(config: Config, chat: ChatFormat, examples: list[Example]) -> list:
    system = config.task.system_prompt
    if config.method in PREFERENCE_METHODS:
        return [encode_pair(chat, e, system) for e in examples]
    return [chat.encode(with_system(e.messages, system)) for e in examples]


def train_model(run: RunDir, config: Config, console: Console) -> TrainSummary:
    from transformers import get_scheduler

    from tunewise.train.tracking import open_tracker

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
    dist = init_distributed()
    if not dist.main:
        console = Console(quiet=True)
    method, hp = config.method, config.train
    torch.manual_seed(hp.seed)

    # --- data: encode under the model's chat template; labels only on what is trained
    base_path = resolve_base(config.model.base)
    chat = base_chat(config.model)
    examples = {name: load_split(run.split(name)) for name in ("train", "val")}
    for name, rows in examples.items():
        check_method_fits_data(config, rows, run.split(name))
    train_items = encode_items(config, chat, examples["train"])
    val_items = encode_items(config, chat, examples["val"])
    max_seq_len = hp.max_seq_len or max(len(i) for i in train_items + val_items)
    kept_rows = [r for r, item in enumerate(train_items) if len(item) <= max_seq_len]  # line r+1 of train.jsonl
    dropped = len(train_items) - len(kept_rows)
    if not kept_rows:
        raise TunewiseError(f"every training example is longer than {max_seq_len} tokens", field="train.max_seq_len")
    train_items, val_items = [train_items[r] for r in kept_rows], [i for i in val_items if len(i) <= max_seq_len]
    lengths = [len(i) for i in train_items]

    # --- model: the method's trainable weights in fp32, the rest frozen in the compute dtype
    place = placement(hp.precision, device=dist.device)
    dtype = place.dtype
    tr = build(config, base_path, dtype, place=place)
    fast = cpu_fast_path(tr, dtype, max_seq_len) if hp.fast_path else []
    if place.device.type != "cpu" and method != "qlora":
        tr.model.to(place.device)  # loaded there already; PEFT's new weights (prompt embeddings) follow
    scaler = torch.amp.GradScaler(place.device.type, enabled=place.loss_scaling)  # fp16 on pre-Ampere GPUs
    preference = method in PREFERENCE_METHODS
    batch_size = hp.batch_size or derive_batch_size(lengths)
    global_batch = batch_size * hp.grad_accum  # examples per optimizer step, whatever the memory plan does
    answer_tokens = max(objective_answer_tokens(item) for item in train_items)
    batch_size, grad_accum, checkpointing, memory_note = dist.broadcast(memory_plan(  # one plan for all processes
        tr, batch_size, hp.grad_accum, max_seq_len, hp.gradient_checkpointing, 2 if preference else 1,
        answer_tokens))
    if checkpointing:
        tr.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    epochs = hp.epochs or derive_epochs(len(train_items))
    steps_per_epoch = math.ceil(len(train_items) / global_batch)
    total_steps = steps_per_epoch * epochs
    eval_every = max(1, steps_per_epoch // hp.evals_per_epoch)
    save_every = hp.save_every or eval_every
    lr = learning_rate(config)
    pad_id = chat.tokenizer.pad_token_id
    objective = (PreferenceObjective(method, train_items, val_items, pad_id, config.preference.beta,
                                     config.preference.sft_weight)
                 if preference else SFTObjective(train_items, val_items, pad_id))

    # --- resume: the newest complete checkpoint, if it was trained with these settings
    fingerprint = {
        "model.base": config.model.base, "task.system_prompt": config.task.system_prompt, "method": method,
        "chat_template (sha256)": hashlib.sha256(chat.template.encode()).hexdigest(),
        "chat_template_kwargs": chat.kwargs,
        "dataset_version": DataManifest.read(run.manifest).version if run.manifest.exists() else None,
        **flat("lora", config.lora), **flat("train", hp, skip=NOT_IN_FINGERPRINT),
        **(flat("prompt_tuning", config.prompt_tuning) if method == "prompt_tuning" else {}),
        **(flat("preference", config.preference) if preference else {}),
        # the global batch, not the memory-derived micro-batch: a resume on a machine with other free
        # memory takes the same examples per step (only how they are split into micro-batches differs)
        "global batch (derived)": global_batch, "epochs (derived)": epochs,
        "max_seq_len (derived)": max_seq_len, "train_examples": len(train_items),
    }
    found = list_checkpoints(run.checkpoints)
    if found:
        check_resumable(read_trainer_state(found[-1]), fingerprint, run.config, found[-1])
    if dist.main:
        clean_partial(run.checkpoints)
    dist.barrier()

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(dist.device.type, dtype=dtype)

    optimizer = torch.optim.AdamW(tr.params, lr=lr, weight_decay=hp.weight_decay)
    schedule = "constant_with_warmup" if hp.schedule == "constant" else hp.schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=int(hp.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    console.print(
        f"[bold]train[/] {tr.describe} on {config.model.base} ({str(dtype).removeprefix('torch.')} compute); "
        f"{len(train_items)} {'pairs' if preference else 'examples'} (dropped {dropped} > {max_seq_len} tokens); "
        f"batch {batch_size}{memory_note} x accum {grad_accum}"
        f"{f' x {dist.world} processes' if dist.active else ''}, {epochs} epoch(s) = {total_steps} steps; "
        f"lr {lr:g}{'' if hp.lr else ' (default for ' + method + ')'} {hp.schedule}, warmup {hp.warmup_ratio:g}, "
        f"weight decay {hp.weight_decay:g}; {tr.n_params:,} trainable params; gradient checkpointing "
        f"{'on' if checkpointing else 'off'}{'; CPU path: ' + ', '.join(fast) if fast else ''}; "
        f"val every {eval_every} steps"
        f"{f', stop after {hp.patience} without a new best' if hp.patience else ''}, "
        f"checkpoint every {save_every} (keep {hp.keep_checkpoints})"
    )

    # --- start, or continue exactly where the newest checkpoint left off (weights, optimizer, RNG)
    best_dir = run.checkpoints / "best"
    val_batch = batch_size * 2
    tr.model.train()
    if preference:
        objective.precompute_reference(tr, val_batch, autocast)

    def validate() -> dict:
        tr.model.eval()
        with out_of_memory(f"validating (batches of {val_batch})", device=place.device, needed=None,
                           setting="train.batch_size", fix="set train.batch_size lower (validation runs twice "
                                                           "the training micro-batch), or train.max_seq_len lower"):
            measured = objective.validate(tr, val_batch, autocast)
        tr.model.train()
        return measured

    if found:
        state = load_checkpoint(found[-1], tr.model, optimizer, scheduler)
        if not (best_dir / "tunewise.json").exists():
            raise TunewiseError(f"{best_dir} is missing", fix=f"delete {run.checkpoints} to train this run again")
        best = WeightsRecord.read(best_dir / "tunewise.json")
        if best.step > state.best_step:  # a new best found after the checkpoint, before the kill
            state.best_step, state.best_val = best.step, best.val_loss
        console.print(f"  resuming from {found[-1]} (step {state.step} of {total_steps})")
    else:
        first = validate()
        state = TrainerState(step=0, epoch=0, next_batch=0, tokens=0, seconds=0.0, last_loss=None,
                             first_val=first["val_loss"], best_val=first["val_loss"], best_step=0,
                             log=[{"step": 0, "epoch": 0.0, **first}], fingerprint=fingerprint)
        if dist.main:
            save_weights(tr, chat, best_dir, 0, first["val_loss"])
    resumed_from = state.step if found else None

    # --- train: step k always takes the same batches (the epoch's seeded order, position k)
    order_epoch, batches = -1, []
    started = time.perf_counter() - state.seconds
    tracked = open_tracker(config, run, console) if dist.main else contextlib.nullcontext(None)
    with tracked as tracker, progress_bar(console) as progress:
        if tracker is not None and not found:
            tracker.log_metrics(state.log[0])
        task = progress.add_task("training", total=total_steps, completed=state.step, status="")
        while state.step < total_steps and not patience_ran_out(state.log, state.best_step, hp.patience):
            epoch, position = divmod(state.step, steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, batches = epoch, length_grouped_batches(lengths, global_batch, hp.seed + epoch)
            step_started = time.perf_counter()
            step_rows = batches[position]  # sorted by length: micro-batches of like lengths
            group = [step_rows[j : j + batch_size] for j in range(0, len(step_rows), batch_size)]
            units = sum(objective.units(train_items[i]) for idx in group for i in idx)  # the whole step, all processes
            state.tokens += sum(lengths[i] for idx in group for i in idx)
            local_loss = 0.0
            for idx in group:
                mine = dist.shard(idx)
                if not mine:
                    continue
                with out_of_memory(f"in training step {state.step + 1} (micro-batch of {len(mine)})",
                                   device=place.device, needed=None, setting="train.batch_size",
                                   fix="set train.batch_size lower (train.grad_accum higher keeps the global batch), "
                                       "train.gradient_checkpointing: on, or train.max_seq_len lower"):
                    with autocast():
                        loss = objective.loss(tr, mine)
                    scaler.scale(loss / max(units, 1)).backward()
                local_loss += float(loss.detach())
            (summed,) = dist.sum_grads(tr.params, extra=[local_loss])
            step_loss = summed / max(units, 1)
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(tr.params, 1.0))
            overflow = place.loss_scaling and not math.isfinite(grad_norm)  # fp16: the scaler skips the step
            for what, value in (("training loss", step_loss), ("gradient norm", grad_norm)):
                if not math.isfinite(value) and not (overflow and what == "gradient norm"):
                    rows = [kept_rows[i] for idx in group for i in idx]  # stop before this step touches the weights
                    raise non_finite_error(what, value, state.step + 1, rows, lr, dtype, run, state)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step_seconds += time.perf_counter() - step_started
            state.step += 1
            state.epoch, position = divmod(state.step, steps_per_epoch)
            state.next_batch, state.last_loss = position, step_loss  # the epoch's global batch to take next
            row = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "train_loss": step_loss,
                   "lr": scheduler.get_last_lr()[0], "tokens": state.tokens}
            if state.step % eval_every == 0 or state.step == total_steps:
                row.update(validate())
                if not math.isfinite(row["val_loss"]):
                    raise non_finite_error("validation loss", row["val_loss"], state.step, [], lr, dtype, run, state)
                if row["val_loss"] < state.best_val:
                    state.best_val, state.best_step = row["val_loss"], state.step
                    if dist.main:
                        save_weights(tr, chat, best_dir, state.step, state.best_val)
            state.log.append(row)
            if tracker is not None:
                tracker.log_metrics(row)
            if (state.step % save_every == 0 or state.step == total_steps) and dist.main:
                state.seconds = time.perf_counter() - started
                save_checkpoint(run.checkpoints, tr.model, optimizer, scheduler, state, keep=hp.keep_checkpoints)
                atomic_write_jsonl(run.train_log, state.log)
            progress.update(task, advance=1, status=f"loss {step_loss:.3f} val {state.best_val:.3f}")
        seconds = time.perf_counter() - started

        # --- save: the best checkpoint becomes the run's result, with provenance
        summary = TrainSummary(
            base=config.model.base, method=method, dtype=str(dtype).removeprefix("torch."), lr=lr, epochs=epochs,
            batch_size=batch_size, grad_accum=grad_accum, max_seq_len=max_seq_len, steps=state.step,
            train_examples=len(train_items), dropped_too_long=dropped, trainable_params=tr.n_params,
            best_step=state.best_step, best_val_loss=state.best_val, first_val_loss=state.first_val,
            final_train_loss=state.last_loss if state.last_loss is not None else float("nan"), tokens=state.tokens,
            seconds=round(seconds, 2), tokens_per_second=round(state.tokens / max(seconds, 1e-9), 1),
            step_tokens_per_second=round(state.tokens / max(state.step_seconds, 1e-9), 1),
            peak_memory_mib=round(peak_memory_mib(), 1), gradient_checkpointing=checkpointing,
            world_size=dist.world, stopped_early=state.step < total_steps, resumed_from_step=resumed_from,
            fast_path=fast,
        )
        if summary.stopped_early:
            console.print(f"  stopped early at step {state.step}: {hp.patience} validations without a new best")
        if dist.main:
            finish(run, best_dir, summary, Provenance.of(run, config.seeds), state.log)
            if tracker is not None:
                tracker.log_summary(summary.to_json(), artifacts=[run.config, run.train_log, run.train_summary,
                                                                run.adapter])
    dist.barrier()
    return summary


def finish(run: RunDir, best_dir: Path, summary: TrainSummary, provenance: Provenance, log: list[dict]) -> None:
    """The best weights become the run's adapter, their record completed with provenance and summary."""
    atomic_write_jsonl(run.train_log, log)
    record = WeightsRecord.read(best_dir / "tunewise.json")
    record.provenance, record.train = provenance, summary
    record.write(best_dir / "tunewise.json")
    tmp = run.adapter.with_name(".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best_dir, tmp)
    replace_dir(tmp, run.adapter)
    summary.write(run.train_summary)
