"""Training checkpoints: everything needed to continue a run exactly, written atomically.

```
checkpoints/
  best/                  the adapter with the lowest validation loss so far (PEFT folder + tokenizer)
  step-000040/           one every `train.save_every` steps; the newest `train.keep_checkpoints` are kept
    adapter_config.json, adapter_model.safetensors   adapter weights (PEFT format: loads with PeftModel)
      or config.json, model.safetensors               the whole model (method: full; loads with transformers)
    optimizer.pt, scheduler.pt                       AdamW moments and step, LR-schedule position
    rng_state.pt                                     torch (and CUDA) and python RNG states
    trainer_state.json                               step, epoch, next batch in the epoch's order,
                                                     loss history, best so far, settings fingerprint
  .step-000048.tmp/      being written: renamed into place only when complete, never read
```

A `kill -9` at any moment leaves either a complete `step-*` folder or a dot-folder that resume
ignores and removes. numpy's global RNG is not used by the training loop, so it is not saved.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tunewise.errors import TunewiseError
from tunewise.runs import replace_dir

ADAPTER, MODEL, STATE = "adapter_model.safetensors", "model.safetensors", "trainer_state.json"
FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt", STATE)  # besides the weights: ADAPTER or MODEL
_STEP = re.compile(r"step-(\d+)")


@dataclass
class TrainerState:
    """Where training is, in plain values (trainer_state.json)."""

    step: int  # optimizer steps done
    epoch: int  # epoch of the next step
    next_batch: int  # index of the next batch in that epoch's (seeded) batch order
    tokens: int
    seconds: float
    last_loss: float | None
    first_val: float
    best_val: float
    best_step: int
    log: list[dict] = field(default_factory=list)  # train_log.jsonl rows so far
    step_seconds: float = 0.0  # time inside optimizer steps only (no validation, no checkpoint writes)
    fingerprint: dict = field(default_factory=dict)  # the settings that shape the result


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP.fullmatch(p.name)) and all((p / f).exists() for f in FILES)
             and ((p / ADAPTER).exists() or (p / MODEL).exists())]
    return [p for _, p in sorted(found)]


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / STATE).read_text(encoding="utf-8")))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, model, optimizer, scheduler, state: TrainerState, keep: int) -> Path:
    """Write `step-N/` through a temp folder and a rename, then drop all but the newest `keep`."""
    final = folder / checkpoint_name(state.step)
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng_state.pt")
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=1) + "\n", encoding="utf-8")
    for path in tmp.iterdir():  # on disk before the rename makes the folder count as complete
        _fsync(path)
    _fsync(tmp)
    replace_dir(tmp, final)
    _fsync(folder)
    for old in list_checkpoints(folder)[:-keep]:
        retired = folder / f".{old.name}.del"  # renamed first: a half-deleted folder is never picked
        os.replace(old, retired)
        shutil.rmtree(retired, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainerState:
    """Put weights, optimizer, schedule and RNG back exactly as they were after step N."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file, load_model

    if isinstance(model, PeftModel) and (path / ADAPTER).exists():
        loaded = set_peft_model_state_dict(model, load_file(path / ADAPTER))
        unexpected, missing = loaded.unexpected_keys, [k for k in loaded.missing_keys if "lora_" in k]
    elif not isinstance(model, PeftModel) and (path / MODEL).exists():
        missing, unexpected = load_model(model, path / MODEL, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        missing = [k for k in missing if k not in tied]
    else:
        unexpected, missing = ["(another method's weights)"], []
    if unexpected or missing:
        raise TunewiseError(
            f"the checkpoint's weights do not fit this model (unexpected {unexpected[:3]}, "
            f"missing {missing[:3]})",
            file=path,
            fix=f"delete {path.parent} to train this run again from scratch",
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    set_rng_state(torch.load(path / "rng_state.pt", map_location="cpu", weights_only=True))
    return read_trainer_state(path)


def clean_partial(folder: Path) -> None:
    """After a kill: put back a `best/` caught between the two renames of its replacement, and
    remove folders that were being written or deleted."""
    if not folder.is_dir():
        return
    best, old_best = folder / "best", folder / ".best.old"
    if not best.exists() and old_best.exists():
        os.replace(old_best, best)
    for path in folder.iterdir():
        if path.name.startswith(".") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def differing_keys(saved: dict, now: dict) -> list[str]:
    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
