"""What training was asked for (`TrainSettings`) and what it resolved that into (`TrainPlan`).

The pipeline builds `TrainSettings` once from the config (settings.py). Every value training
derives from the data and the hardware is resolved here, once, into a `TrainPlan`: the learning
rate by method, the adapter's shape (LoRA alpha's default is set in `adapter_shape` and nowhere
else), the micro-batch and accumulation the memory plan allows for the global batch, epochs, steps,
the longest example. The plan prints the start-up line, is the resume fingerprint, and is saved
in the weights' tunewise.json, so export, tracking and the model card read the numbers training
used instead of re-deriving them from the config's unset defaults.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from tunewise.artifacts import Seeds, TrainPlan
from tunewise.config import (
    PREFERENCE_METHODS,
    LoraConfig,
    ModelConfig,
    PreferenceConfig,
    PromptTuningConfig,
    TrainConfig,
)
from tunewise.errors import TunewiseError
from tunewise.models.chat import IGNORE, Encoded

DEFAULT_LR = {"lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "full": 2e-5, "prompt_tuning": 3e-2, "dpo": 5e-5,
              "orpo": 1e-4}
NOT_IN_FINGERPRINT = ("save_every", "keep_checkpoints")  # how often state is saved, not what is learned


@dataclass(frozen=True)
class TrainSettings:
    """The train stage's inputs as the user gave them: the config's sections, built once by the pipeline."""

    model: ModelConfig
    task: str  # task.name
    system_prompt: str
    method: str
    lora: LoraConfig
    prompt_tuning: PromptTuningConfig
    preference: PreferenceConfig
    train: TrainConfig
    seeds: Seeds

    @property
    def base(self) -> str:
        return self.model.base

    @property
    def preference_pairs(self) -> bool:
        return self.method in PREFERENCE_METHODS


def learning_rate(settings: TrainSettings) -> float:
    return settings.train.lr or DEFAULT_LR[settings.method]


def adapter_shape(settings: TrainSettings) -> dict[str, Any]:
    """The adapter as it will be built: LoRA's r, alpha (default 2*r, set here only), dropout,
    targets (a preset until the model resolves it) and bias; prompt tuning's virtual tokens and
    init text (default: the system prompt); nothing for a full fine-tune."""
    if settings.method == "full":
        return {}
    if settings.method == "prompt_tuning":
        pt = settings.prompt_tuning
        text = pt.init_text if pt.init_text is not None else settings.system_prompt or None
        return {"virtual_tokens": pt.virtual_tokens, "init_text": text}
    lora = settings.lora
    return {"r": lora.r, "alpha": lora.alpha or 2 * lora.r, "dropout": lora.dropout,
            "target_modules": lora.target_modules, "bias": lora.bias, "use_dora": settings.method == "dora"}


def derive_batch_size(lengths: list[int], tokens_per_batch: int = 2048) -> int:
    """About `tokens_per_batch` tokens a step, as a power of two between 1 and 32."""
    typical = sorted(lengths)[int(0.95 * (len(lengths) - 1))]
    size = max(1, min(32, tokens_per_batch // max(typical, 1)))
    return 1 << (size.bit_length() - 1)


def derive_epochs(n_train: int) -> int:
    """Small sets need more passes; large ones one pass (overfitting shows up on val anyway)."""
    return 3 if n_train < 500 else 2 if n_train < 1500 else 1


def objective_answer_tokens(item) -> int:
    """Supervised positions of one training row (a preference pair: its longer side)."""
    if isinstance(item, Encoded):
        return sum(1 for label in item.labels if label != IGNORE)
    return max(objective_answer_tokens(item.chosen), objective_answer_tokens(item.rejected))


def memory_plan(trainable, batch_size: int, grad_accum: int, seq_len: int, setting: str,
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


def _flat(section: str, values: BaseModel, skip: tuple[str, ...] = ()) -> dict:
    return {f"{section}.{k}": v for k, v in values.model_dump(mode="json").items() if k not in skip}


def fingerprint(settings: TrainSettings, chat_template: str, chat_kwargs: dict, dataset_version: str | None,
                global_batch: int, epochs: int, max_seq_len: int, train_examples: int) -> dict[str, Any]:
    """The settings a checkpoint is tied to: the user's choices and the derived sizes, but the
    global batch, not the memory-derived micro-batch, so a resume on a machine with other free
    memory takes the same examples per step (only how they are split into micro-batches differs)."""
    return {
        "model.base": settings.base, "task.system_prompt": settings.system_prompt, "method": settings.method,
        "chat_template (sha256)": hashlib.sha256(chat_template.encode()).hexdigest(),
        "chat_template_kwargs": chat_kwargs, "dataset_version": dataset_version,
        **_flat("lora", settings.lora), **_flat("train", settings.train, skip=NOT_IN_FINGERPRINT),
        **(_flat("prompt_tuning", settings.prompt_tuning) if settings.method == "prompt_tuning" else {}),
        **(_flat("preference", settings.preference) if settings.preference_pairs else {}),
        "global batch (derived)": global_batch, "epochs (derived)": epochs,
        "max_seq_len (derived)": max_seq_len, "train_examples": train_examples,
    }


def resolve_plan(settings: TrainSettings, trainable, *, lengths: list[int], answer_tokens: int, max_seq_len: int,
                 dropped: int, dtype: torch.dtype, device: torch.device, world: int, fast_path: list[str],
                 fingerprint_of) -> TrainPlan:
    """Every derived value, once: batch (the memory plan's micro-batch for the global batch), epochs,
    steps, validation and checkpoint cadence, learning rate. `fingerprint_of(global_batch, epochs)`
    gives the resume fingerprint (it needs the chat template and the dataset version)."""
    hp = settings.train
    batch_size = hp.batch_size or derive_batch_size(lengths)
    global_batch = batch_size * hp.grad_accum  # examples per optimizer step, whatever the memory plan does
    batch_size, grad_accum, checkpointing, note = memory_plan(
        trainable, batch_size, hp.grad_accum, max_seq_len, hp.gradient_checkpointing,
        2 if settings.preference_pairs else 1, answer_tokens)
    epochs = hp.epochs or derive_epochs(len(lengths))
    steps_per_epoch = math.ceil(len(lengths) / global_batch)
    total_steps = steps_per_epoch * epochs
    eval_every = max(1, steps_per_epoch // hp.evals_per_epoch)
    preference = settings.preference
    return TrainPlan(
        base=settings.base, method=settings.method, task=settings.task, system_prompt=settings.system_prompt,
        describe=trainable.describe, adapter=trainable.shape,
        preference={"beta": preference.beta, "sft_weight": preference.sft_weight} if settings.preference_pairs
        else None,
        dtype=str(dtype).removeprefix("torch."), device=str(device),
        engine=f"{world} processes (torchrun)" if world > 1 else "one process", world_size=world,
        lr=learning_rate(settings), lr_default=hp.lr is None, schedule=hp.schedule, warmup_ratio=hp.warmup_ratio,
        warmup_steps=int(hp.warmup_ratio * total_steps), weight_decay=hp.weight_decay, batch_size=batch_size,
        grad_accum=grad_accum, global_batch=global_batch, memory_note=note, gradient_checkpointing=checkpointing,
        epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total_steps, eval_every=eval_every,
        save_every=hp.save_every or eval_every, keep_checkpoints=hp.keep_checkpoints, patience=hp.patience,
        max_seq_len=max_seq_len, train_examples=len(lengths), dropped_too_long=dropped,
        trainable_params=trainable.n_params, fast_path=fast_path, seeds=settings.seeds.to_json(),
        fingerprint=fingerprint_of(global_batch, epochs),
    )
