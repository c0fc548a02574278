"""Typed run-folder artifacts that more than one stage reads.

`weights_in(folder)`: what a weights folder holds, read once from its files, where six places used
to probe `adapter_config.json` / `config.json` themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from tunewise.errors import TunewiseError

PROMPT_LEARNING = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # never loaded


class WeightsKind(str, Enum):
    LORA = "lora"  # a PEFT LoRA adapter (DoRA too): low-rank deltas that merge into the base
    PROMPT_LEARNING = "prompt_learning"  # PEFT prompt tuning and kin: vectors added to every prompt
    OTHER_ADAPTER = "other_adapter"  # another PEFT type (IA3, ...)
    WHOLE_MODEL = "whole_model"  # a transformers model folder (method: full)
    NONE = "none"  # nothing tunewise can load


@dataclass(frozen=True)
class Weights:
    folder: Path
    kind: WeightsKind
    peft_type: str | None = None
    safetensors: bool = False  # the weights file is safetensors (adapter_model / model.safetensors)
    pickled: tuple[str, ...] = ()  # pickle files lying there instead (never loaded)

    @property
    def is_adapter(self) -> bool:
        return self.kind in (WeightsKind.LORA, WeightsKind.PROMPT_LEARNING, WeightsKind.OTHER_ADAPTER)

    @property
    def config_file(self) -> Path:
        return self.folder / ("adapter_config.json" if self.is_adapter else "config.json")


def weights_in(folder: Path) -> Weights:
    """What `folder` holds; a TunewiseError when its adapter_config.json is not a JSON object."""
    folder = Path(folder)
    listing = sorted(folder.iterdir()) if folder.is_dir() else []
    pickled = tuple(p.name for p in listing if p.suffix in PICKLE_SUFFIXES)
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        try:
            peft_type = json.loads(adapter_config.read_text(encoding="utf-8")).get("peft_type")
        except (ValueError, AttributeError) as err:
            raise TunewiseError(f"adapter_config.json is not a JSON object ({err})", file=adapter_config,
                                fix="save the adapter again with PEFT (model.save_pretrained(folder))") from None
        kind = (WeightsKind.LORA if peft_type == "LORA" else WeightsKind.PROMPT_LEARNING
                if peft_type in PROMPT_LEARNING else WeightsKind.OTHER_ADAPTER)
        return Weights(folder, kind, peft_type, (folder / "adapter_model.safetensors").is_file(), pickled)
    if (folder / "config.json").is_file():
        safetensors = any(folder.glob("*.safetensors"))
        return Weights(folder, WeightsKind.WHOLE_MODEL, None, safetensors, pickled)
    return Weights(folder, WeightsKind.NONE, None, False, pickled)
