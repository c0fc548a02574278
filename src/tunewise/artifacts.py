"""Typed run-folder artifacts that more than one stage reads.

`weights_in(folder)`: what a weights folder holds, read once from its files, where six places used
to probe `adapter_config.json` / `config.json` themselves.
"""

from __future__ import annotations

import dataclasses
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


# --- the verdict ---------------------------------------------------------------------------------

class Decision(str, Enum):
    SHIP = "SHIP"
    DO_NOT_SHIP = "DO NOT SHIP"


@dataclass
class Verdict:
    """verdict.json: the fine-tune against the best baseline on the primary metric."""

    decision: Decision
    reason: str
    primary_metric: str
    best_baseline: str
    baselines: list[str]
    means: dict[str, float]  # arm -> mean of the primary metric
    difference: dict  # fine-tune minus best baseline: {mean, low, high}
    test: dict  # {name, p_value, ...}
    comparisons: dict[str, dict]  # arm -> {difference, test}
    margin: float
    alpha: float
    n_items: int
    red_flags: list[dict]  # {name, message, blocking}
    regression: dict | None = None  # general regression set: {base, finetuned} accuracy intervals
    judge: dict | None = None  # the LLM judge's summary
    provenance: dict | None = None

    @property
    def shipped(self) -> bool:
        return self.decision is Decision.SHIP

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["decision"] = self.decision.value
        return {k: v for k, v in data.items() if v is not None or k not in ("regression", "judge", "provenance")}

    @classmethod
    def from_json(cls, data: dict, where: Path | None = None) -> "Verdict":
        """A verdict read back; a TunewiseError naming the file when it is not one tunewise wrote."""
        fix = "re-run the verdict stage: tunewise run --resume RUN"
        if not isinstance(data, dict):
            raise TunewiseError("verdict.json is not a JSON object", file=where, fix=fix)
        try:
            decision = Decision(data.get("decision"))
        except ValueError:
            raise TunewiseError(f"unknown verdict decision {data.get('decision')!r}", file=where, field="decision",
                                fix=fix) from None
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "decision"}
        optional = {"baselines"} | {n for n, f in fields.items() if f.default is not dataclasses.MISSING}
        missing = [n for n in fields if n not in data and n not in optional]
        if missing:
            raise TunewiseError(f"verdict.json lacks {', '.join(missing)}", file=where, fix=fix)
        values = {n: data[n] for n in fields if n in data}
        values.setdefault("baselines", [a for a in data["means"] if a != "finetuned"])  # before baselines were named
        return cls(decision=decision, **values)

    @classmethod
    def read(cls, path: Path) -> "Verdict":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as err:
            raise TunewiseError(f"verdict.json is not JSON ({err})", file=path,
                                fix="re-run the verdict stage: tunewise run --resume RUN") from None
        return cls.from_json(data, path)

    def write(self, path: Path) -> None:
        from tunewise.runs import atomic_write_json

        atomic_write_json(path, self.to_json())
