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
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from tunewise.artifacts import (
    DataManifest,
    Provenance,
    Seeds,
    TrainPlan,
    TrainSummary,
    WeightsRecord,
)
from tunewise.config import PREFERENCE_METHODS
from tunewise.data import Example, load_split, with_system
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat, base_chat, resolve_base
from tunewise.models.chat import IGNORE, Encoded
from tunewise.models.device import Placement, out_of_memory, placement
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
from tunewise.train.methods import Trainable, build, peak_memory_mib
from tunewise.train.plan import (
    TrainSettings,
    adapter_shape,
    fingerprint,
    objective_answer_tokens,
    resolve_plan,
)
from tunewise.train.preference import Pair, dpo_losses, encode_pair, orpo_losses
from tunewise.train.tracking import TrackSettings, open_tracker


def patience_ran_out(log: list[dict], best_step: int, patience: int | None) -> bool:
    """`patience` validations in a row have not beaten the best validation loss."""
    evals_since_best = sum(1 for row in log if "val_loss" in row and row["step"] > best_step)
    return patience is not None and evals_since_best >= patience


def check_method_fits_data(method: str, examples: list[Example], where: Path | str) -> None:
    """Preference methods need prompt/chosen/rejected pairs; the others train on chats."""
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


def save_weights(tr: Trainable, chat: ChatFormat, target: Path, step: int, val_loss: float, plan: TrainPlan) -> None:
    """The adapter (PEFT folder) or the whole model (full), with tokenizer and record, atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tr.model.save_pretrained(tmp)
    chat.tokenizer.chat_template = chat.template  # the template trained with (a base model's default too)
    chat.tokenizer.save_pretrained(tmp)  # travels with the weights; its settings in tunewise.json "chat"
    WeightsRecord(step=step, val_loss=val_loss, chat=chat.record(), plan=plan).write(tmp / "tunewise.json")
    replace_dir(tmp, target)


def encode_items(method: str, system: str, chat: ChatFormat, examples: list[Example]) -> list:
    if method in PREFERENCE_METHODS:
        return [encode_pair(chat, e, system) for e in examples]
    return [chat.encode(with_system(e.messages, system)) for e in examples]



# --- the recipe: encode, build, plan, resume or start, fit, finish (train_model reads top to bottom)


@dataclass
class TrainData:
    """The train and val splits encoded under the chat template, examples over max_seq_len dropped."""

    chat: ChatFormat
    train: list  # Encoded (SFT) or Pair (preference) items
    val: list
    kept_rows: list[int]  # train item i is line kept_rows[i] + 1 of train.jsonl
    dropped: int
    max_seq_len: int

    @property
    def lengths(self) -> list[int]:
        return [len(item) for item in self.train]


@dataclass
class Session:
    """The model and everything that steps it, used by the resume, fit and finish phases."""

    tr: Trainable
    place: Placement
    objective: "SFTObjective | PreferenceObjective"
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    val_batch: int

    def autocast(self):
        if self.place.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.place.device.type, dtype=self.place.dtype)

    def validate(self) -> dict:
        self.tr.model.eval()
        with out_of_memory(f"validating (batches of {self.val_batch})", device=self.place.device, needed=None,
                           setting="train.batch_size", fix="set train.batch_size lower (validation runs twice "
                                                           "the training micro-batch), or train.max_seq_len lower"):
            measured = self.objective.validate(self.tr, self.val_batch, self.autocast)
        self.tr.model.train()
        return measured


def train_model(run: RunDir, settings: TrainSettings, console: Console, track: TrackSettings | None) -> TrainSummary:
    """Train the run's weights, tracked as `track` says (None: not at all; settings.track_settings
    builds it from the config, track: none included); the weights with the lowest validation loss
    become run.adapter, with the plan and the summary."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
    dist = init_distributed()
    console = console if dist.main else Console(quiet=True)
    torch.manual_seed(settings.seeds.train)
    data = encode_data(run, settings)
    tr, place, fast = build_model(settings, data, dist.device)
    plan = make_plan(run, settings, data, tr, place, fast, dist)
    session = start_session(settings, plan, data, tr, place)
    console.print(plan.startup_line())
    state, resumed_from = resume_or_start(run, plan, session, data.chat, console, dist.main)
    tracked = open_tracker(track.with_plan(plan), run, console) if dist.main and track else contextlib.nullcontext()
    with tracked as tracker, progress_bar(console) as progress:
        if tracker is not None and resumed_from is None:
            tracker.log_metrics(state.log[0])
        seconds = fit(run, plan, session, data, state, dist, tracker, progress)
        summary = summarize(plan, state, seconds, resumed_from)
        if summary.stopped_early:
            console.print(f"  stopped early at step {state.step}: {plan.patience} validations without a new best")
        if dist.main:
            finish(run, run.checkpoints / "best", summary, plan, state.log)
            if tracker is not None:
                tracker.log_summary(summary.to_json(), artifacts=[run.config, run.train_log, run.train_summary,
                                                                  run.adapter])
    dist.barrier()
    return summary


def encode_data(run: RunDir, settings: TrainSettings) -> TrainData:
    """The splits under the model's chat template, labels only on what is trained."""
    chat = base_chat(settings.model)
    examples = {name: load_split(run.split(name)) for name in ("train", "val")}
    for name, rows in examples.items():
        check_method_fits_data(settings.method, rows, run.split(name))
    train, val = (encode_items(settings.method, settings.system_prompt, chat, examples[name]) for name in ("train", "val"))
    max_seq_len = settings.train.max_seq_len or max(len(i) for i in train + val)
    kept = [r for r, item in enumerate(train) if len(item) <= max_seq_len]
    if not kept:
        raise TunewiseError(f"every training example is longer than {max_seq_len} tokens", field="train.max_seq_len")
    return TrainData(chat, [train[r] for r in kept], [i for i in val if len(i) <= max_seq_len], kept,
                     len(train) - len(kept), max_seq_len)


def build_model(settings: TrainSettings, data: TrainData, device: torch.device) -> tuple[Trainable, Placement, list]:
    """The method's trainable weights in fp32, the rest frozen in the compute dtype, on the device."""
    place = placement(settings.train.precision, device=device)
    tr = build(settings.method, adapter_shape(settings), resolve_base(settings.base), place.dtype, place=place)
    fast = cpu_fast_path(tr, place.dtype, data.max_seq_len) if settings.train.fast_path else []
    if place.device.type != "cpu" and settings.method != "qlora":
        tr.model.to(place.device)  # loaded there already; PEFT's new weights (prompt embeddings) follow
    return tr, place, fast


def make_plan(run: RunDir, settings: TrainSettings, data: TrainData, tr: Trainable, place: Placement, fast: list,
              dist) -> TrainPlan:
    """Every derived value, resolved once and the same on every process; a checkpoint trained
    under another plan is refused before anything is overwritten."""
    version = DataManifest.read(run.manifest).version if run.manifest.exists() else None
    plan = dist.broadcast(resolve_plan(
        settings, tr, lengths=data.lengths, answer_tokens=max(objective_answer_tokens(i) for i in data.train),
        max_seq_len=data.max_seq_len, dropped=data.dropped, dtype=place.dtype, device=place.device,
        world=dist.world, fast_path=fast,
        fingerprint_of=lambda global_batch, epochs: fingerprint(
            settings, data.chat.template, data.chat.kwargs, version, global_batch, epochs, data.max_seq_len,
            len(data.train))))
    found = list_checkpoints(run.checkpoints)
    if found:
        check_resumable(read_trainer_state(found[-1]), plan.fingerprint, run.config, found[-1])
    if dist.main:
        clean_partial(run.checkpoints)
    dist.barrier()
    return plan


def start_session(settings: TrainSettings, plan: TrainPlan, data: TrainData, tr: Trainable,
                  place: Placement) -> Session:
    """Gradient checkpointing as planned, the objective, AdamW and the schedule."""
    from transformers import get_scheduler

    if plan.gradient_checkpointing:
        tr.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pad_id = data.chat.tokenizer.pad_token_id
    pref = settings.preference
    objective = (PreferenceObjective(settings.method, data.train, data.val, pad_id, pref.beta, pref.sft_weight)
                 if settings.preference_pairs else SFTObjective(data.train, data.val, pad_id))
    optimizer = torch.optim.AdamW(tr.params, lr=plan.lr, weight_decay=plan.weight_decay)
    schedule = "constant_with_warmup" if plan.schedule == "constant" else plan.schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=plan.warmup_steps,
                              num_training_steps=plan.total_steps)
    scaler = torch.amp.GradScaler(place.device.type, enabled=place.loss_scaling)  # fp16 on pre-Ampere GPUs
    return Session(tr, place, objective, optimizer, scheduler, scaler, val_batch=plan.batch_size * 2)


def resume_or_start(run: RunDir, plan: TrainPlan, session: Session, chat: ChatFormat, console: Console,
                    main: bool) -> tuple[TrainerState, int | None]:
    """Continue exactly where the newest checkpoint left off (weights, optimizer, RNG), or
    validate the untrained model as step 0. Returns the state and the step resumed from."""
    tr, best_dir = session.tr, run.checkpoints / "best"
    tr.model.train()
    if isinstance(session.objective, PreferenceObjective):
        session.objective.precompute_reference(tr, session.val_batch, session.autocast)
    found = list_checkpoints(run.checkpoints)
    if found:
        state = load_checkpoint(found[-1], tr.model, session.optimizer, session.scheduler)
        if not (best_dir / "tunewise.json").exists():
            raise TunewiseError(f"{best_dir} is missing", fix=f"delete {run.checkpoints} to train this run again")
        best = WeightsRecord.read(best_dir / "tunewise.json")
        if best.step > state.best_step:  # a new best found after the checkpoint, before the kill
            state.best_step, state.best_val = best.step, best.val_loss
        console.print(f"  resuming from {found[-1]} (step {state.step} of {plan.total_steps})")
        return state, state.step
    first = session.validate()
    state = TrainerState(step=0, epoch=0, next_batch=0, tokens=0, seconds=0.0, last_loss=None,
                         first_val=first["val_loss"], best_val=first["val_loss"], best_step=0,
                         log=[{"step": 0, "epoch": 0.0, **first}], fingerprint=plan.fingerprint)
    if main:
        save_weights(tr, chat, best_dir, 0, first["val_loss"], plan)
    return state, None


def fit(run: RunDir, plan: TrainPlan, session: Session, data: TrainData, state: TrainerState, dist, tracker,
        progress) -> float:
    """Optimizer steps until the plan's last step or patience runs out: step k always takes the
    same batches (the epoch's seeded order, position k). Returns the seconds trained, all sessions."""
    order_epoch, batches = -1, []
    started = time.perf_counter() - state.seconds
    task = progress.add_task("training", total=plan.total_steps, completed=state.step, status="")
    while state.step < plan.total_steps and not patience_ran_out(state.log, state.best_step, plan.patience):
        epoch, position = divmod(state.step, plan.steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, batches = epoch, length_grouped_batches(data.lengths, plan.global_batch,
                                                                 plan.seeds["train"] + epoch)
        step_started = time.perf_counter()
        step_loss = optimizer_step(run, plan, session, data, batches[position], state, dist)
        state.step_seconds += time.perf_counter() - step_started
        state.step += 1
        state.epoch, position = divmod(state.step, plan.steps_per_epoch)
        state.next_batch, state.last_loss = position, step_loss  # the epoch's global batch to take next
        row = {"step": state.step, "epoch": round(state.step / plan.steps_per_epoch, 4), "train_loss": step_loss,
               "lr": session.scheduler.get_last_lr()[0], "tokens": state.tokens}
        if state.step % plan.eval_every == 0 or state.step == plan.total_steps:
            row.update(validate_and_keep_best(run, plan, session, data.chat, state, dist.main))
        state.log.append(row)
        if tracker is not None:
            tracker.log_metrics(row)
        if (state.step % plan.save_every == 0 or state.step == plan.total_steps) and dist.main:
            state.seconds = time.perf_counter() - started
            save_checkpoint(run.checkpoints, session.tr.model, session.optimizer, session.scheduler, state,
                            keep=plan.keep_checkpoints)
            atomic_write_jsonl(run.train_log, state.log)
        progress.update(task, advance=1, status=f"loss {step_loss:.3f} val {state.best_val:.3f}")
    return time.perf_counter() - started


def optimizer_step(run: RunDir, plan: TrainPlan, session: Session, data: TrainData, step_rows: list[int],
                   state: TrainerState, dist) -> float:
    """One optimizer step over the global batch `step_rows` (sorted by length: micro-batches of like
    lengths), the loss weighted by supervised units across micro-batches and processes; NaN/inf
    stops before the weights are touched. Returns the step's loss per unit."""
    tr, objective = session.tr, session.objective
    group = [step_rows[j : j + plan.batch_size] for j in range(0, len(step_rows), plan.batch_size)]
    units = sum(objective.units(data.train[i]) for idx in group for i in idx)  # the whole step, all processes
    state.tokens += sum(len(data.train[i]) for idx in group for i in idx)
    local_loss = 0.0
    for idx in group:
        mine = dist.shard(idx)
        if not mine:
            continue
        with out_of_memory(f"in training step {state.step + 1} (micro-batch of {len(mine)})",
                           device=session.place.device, needed=None, setting="train.batch_size",
                           fix="set train.batch_size lower (train.grad_accum higher keeps the global batch), "
                               "train.gradient_checkpointing: on, or train.max_seq_len lower"):
            with session.autocast():
                loss = objective.loss(tr, mine)
            session.scaler.scale(loss / max(units, 1)).backward()
        local_loss += float(loss.detach())
    (summed,) = dist.sum_grads(tr.params, extra=[local_loss])
    step_loss = summed / max(units, 1)
    session.scaler.unscale_(session.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(tr.params, 1.0))
    overflow = session.place.loss_scaling and not math.isfinite(grad_norm)  # fp16: the scaler skips the step
    for what, value in (("training loss", step_loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value) and not (overflow and what == "gradient norm"):
            rows = [data.kept_rows[i] for idx in group for i in idx]  # stop before this step touches the weights
            raise non_finite_error(what, value, state.step + 1, rows, plan.lr, session.place.dtype, run, state)
    session.scaler.step(session.optimizer)
    session.scaler.update()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return step_loss


def validate_and_keep_best(run: RunDir, plan: TrainPlan, session: Session, chat: ChatFormat, state: TrainerState,
                           main: bool) -> dict:
    """Validation after a step; a new lowest validation loss saves the weights as the best."""
    measured = session.validate()
    if not math.isfinite(measured["val_loss"]):
        raise non_finite_error("validation loss", measured["val_loss"], state.step, [], plan.lr,
                               session.place.dtype, run, state)
    if measured["val_loss"] < state.best_val:
        state.best_val, state.best_step = measured["val_loss"], state.step
        if main:
            save_weights(session.tr, chat, run.checkpoints / "best", state.step, state.best_val, plan)
    return measured


def summarize(plan: TrainPlan, state: TrainerState, seconds: float, resumed_from: int | None) -> TrainSummary:
    return TrainSummary(
        base=plan.base, method=plan.method, dtype=plan.dtype, lr=plan.lr, epochs=plan.epochs,
        batch_size=plan.batch_size, grad_accum=plan.grad_accum, max_seq_len=plan.max_seq_len, steps=state.step,
        train_examples=plan.train_examples, dropped_too_long=plan.dropped_too_long,
        trainable_params=plan.trainable_params, best_step=state.best_step, best_val_loss=state.best_val,
        first_val_loss=state.first_val,
        final_train_loss=state.last_loss if state.last_loss is not None else float("nan"), tokens=state.tokens,
        seconds=round(seconds, 2), tokens_per_second=round(state.tokens / max(seconds, 1e-9), 1),
        step_tokens_per_second=round(state.tokens / max(state.step_seconds, 1e-9), 1),
        peak_memory_mib=round(peak_memory_mib(), 1), gradient_checkpointing=plan.gradient_checkpointing,
        world_size=plan.world_size, stopped_early=state.step < plan.total_steps, resumed_from_step=resumed_from,
        fast_path=plan.fast_path,
    )


def finish(run: RunDir, best_dir: Path, summary: TrainSummary, plan: TrainPlan, log: list[dict]) -> None:
    """The best weights become the run's adapter, their record completed with provenance and summary."""
    atomic_write_jsonl(run.train_log, log)
    record = WeightsRecord.read(best_dir / "tunewise.json")
    record.provenance = Provenance.of(run, Seeds(**plan.seeds))
    record.train, record.plan = summary, plan
    record.write(best_dir / "tunewise.json")
    tmp = run.adapter.with_name(".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best_dir, tmp)
    replace_dir(tmp, run.adapter)
    summary.write(run.train_summary)
