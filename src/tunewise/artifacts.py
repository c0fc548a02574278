"""Typed run-folder artifacts that more than one stage reads.

Each file another stage reads has one dataclass with `read` / `write` (and `from_json` /
`to_json`); a file that is not one tunewise wrote is refused with the file and the fix, and files
written by older versions are still read:

| file                           | type               | written by          | read by                          |
|--------------------------------|--------------------|---------------------|----------------------------------|
| verdict.json                   | Verdict (Decision) | verdict             | cli, report, export, registry    |
| metrics/<arm>.json             | ArmMetrics         | baseline, evaluate  | verdict, judge, report, export   |
| metrics/regression_<who>.json  | RegressionMetrics  | baseline, evaluate  | verdict, report                  |
| train_summary.json             | TrainSummary       | train               | cli, report, sweep               |
| adapter/tunewise.json          | WeightsRecord      | train               | export, registry, serve, train   |
| (inside it)                    | TrainPlan          | train               | export, model card, tracking     |
| data/manifest.json             | DataManifest       | data                | every later stage                |
| decision.json                  | DecideRecord       | decide              | report                           |
| judge/summary.json             | JudgeSummary       | judge               | verdict, report                  |
| (inside each of them)          | Provenance (Seeds) | every stage         | export, tracking                 |

`weights_in(folder)`: what a weights folder holds, read once from its files, where six places used
to probe `adapter_config.json` / `config.json` themselves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from tunewise.errors import TunewiseError
from tunewise.runs import RunDir, atomic_write_json, library_versions, sha256_file

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
    max_rank: int | None = None  # LoRA: the largest rank of any layer (r, or rank_pattern's)

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
            saved = json.loads(adapter_config.read_text(encoding="utf-8"))
            peft_type = saved.get("peft_type")
            ranks = [saved.get("r") or 8, *(saved.get("rank_pattern") or {}).values()]
            max_rank = max(int(r) for r in ranks) if peft_type == "LORA" else None
        except (ValueError, TypeError, AttributeError) as err:
            raise TunewiseError(f"adapter_config.json is not a JSON object ({err})", file=adapter_config,
                                fix="save the adapter again with PEFT (model.save_pretrained(folder))") from None
        kind = (WeightsKind.LORA if peft_type == "LORA" else WeightsKind.PROMPT_LEARNING
                if peft_type in PROMPT_LEARNING else WeightsKind.OTHER_ADAPTER)
        return Weights(folder, kind, peft_type, (folder / "adapter_model.safetensors").is_file(), pickled, max_rank)
    if (folder / "config.json").is_file():
        safetensors = any(folder.glob("*.safetensors"))
        return Weights(folder, WeightsKind.WHOLE_MODEL, None, safetensors, pickled)
    return Weights(folder, WeightsKind.NONE, None, False, pickled)


# --- provenance and the run's seeds -------------------------------------------------------------

@dataclass(frozen=True)
class Seeds:
    """A run's seeds, one per purpose (data.seed, eval.seed, train.seed)."""

    data: int  # the split shuffle and the max_examples sample
    eval: int  # the few-shot picks and every bootstrap resample (arm intervals, paired test, judge)
    train: int  # adapter init, dropout and batch order

    def to_json(self) -> dict[str, int]:
        return {"data": self.data, "eval": self.eval, "train": self.train}


@dataclass
class Provenance:
    """What every artifact carries: the run, its config's hash, the dataset version, the seeds,
    the library versions and when it was written."""

    run: str
    config_sha256: str | None
    dataset_version: str | None
    seeds: dict[str, int]  # Seeds.to_json(); a file from before the seeds were split: {"stage": its one seed}
    libraries: dict[str, str]
    created: str

    KEYS: ClassVar[tuple[str, ...]] = ("run", "config_sha256", "dataset_version", "libraries", "created")

    @classmethod
    def of(cls, run: RunDir, seeds: Seeds) -> "Provenance":
        version = DataManifest.read(run.manifest).version if run.manifest.exists() else None
        return cls(run=run.root.name, config_sha256=sha256_file(run.config) if run.config.exists() else None,
                   dataset_version=version, seeds=seeds.to_json(), libraries=library_versions(),
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict:
        return {"run": self.run, "config_sha256": self.config_sha256, "dataset_version": self.dataset_version,
                "seeds": self.seeds, "libraries": self.libraries, "created": self.created}

    @classmethod
    def from_json(cls, data: Any) -> "Provenance | None":
        """None for anything that is not a provenance record (an artifact may not have one)."""
        if not isinstance(data, dict) or "run" not in data:
            return None
        seeds = data.get("seeds") if isinstance(data.get("seeds"), dict) else (
            {"stage": data["seed"]} if isinstance(data.get("seed"), int) else {})
        return cls(run=str(data["run"]), config_sha256=data.get("config_sha256"),
                   dataset_version=data.get("dataset_version"), seeds=seeds,
                   libraries=data.get("libraries") or {}, created=str(data.get("created") or ""))


# --- JSON artifacts: one dataclass per file, read back or refused naming the file ------------------

class JsonArtifact:
    """`read` / `write` / `from_json` / `to_json` for a dataclass whose fields are the file's keys.
    Fields with defaults may be absent (older files); `provenance` fields are Provenance records."""

    NAME: ClassVar[str] = "the file"
    FIX: ClassVar[str] = "re-run the stage that writes it: tunewise run --resume RUN"

    @classmethod
    def from_json(cls, data: Any, where: Path | None = None):
        if not isinstance(data, dict):
            raise TunewiseError(f"{cls.NAME} is not a JSON object", file=where, fix=cls.FIX)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise TunewiseError(f"{cls.NAME} lacks {', '.join(missing)}: it was not written by this version of "
                                "tunewise", file=where, fix=cls.FIX)
        values = {n: data[n] for n in fields if n in data}
        if "provenance" in values:
            values["provenance"] = Provenance.from_json(values["provenance"])
        return cls(**values)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(out.get("provenance"), Provenance):
            out["provenance"] = out["provenance"].to_json()
        return out

    @classmethod
    def read(cls, path: Path):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise TunewiseError(f"{cls.NAME} is not JSON ({err})", file=path, fix=cls.FIX) from None
        return cls.from_json(data, path)

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


@dataclass
class DataManifest(JsonArtifact):
    """data/manifest.json: what the data stage made of the inputs (the version every later
    artifact names, the output type evaluation scores by, the counts the report shows)."""

    version: str  # the dataset version: a hash of contents, settings, counts and findings
    tunewise_version: str
    inputs: dict[str, str]  # file -> sha256
    formats: dict[str, str]  # file -> detected format
    settings: dict
    split_strategy: str
    output_type: str  # label | json | text
    counts: dict[str, int]  # read, rejected, removed per kind, train / val / test
    rejected_by_kind: dict[str, int]
    sha256: dict[str, str]  # split file -> sha256
    stats: dict
    warnings: list[str]
    clusters: list[dict]
    contaminated: list[dict]
    conflicts: list[dict] = dataclasses.field(default_factory=list)
    shared_phrasing: list[dict] = dataclasses.field(default_factory=list)

    NAME: ClassVar[str] = "data/manifest.json"
    FIX: ClassVar[str] = "prepare the data again: start a new run with tunewise run -c tunewise.yaml"

    def to_json(self) -> dict:  # the order the file has always had
        order = ("tunewise_version", "inputs", "formats", "settings", "split_strategy", "output_type", "counts",
                 "rejected_by_kind", "sha256", "stats", "warnings", "clusters", "conflicts", "shared_phrasing",
                 "contaminated", "version")
        return {k: getattr(self, k) for k in order}


@dataclass
class DecideRecord(JsonArtifact):
    """decision.json: the decide stage's warnings from the data, and its recommendation when the
    config answered the questionnaire (decide.framework.Decision's fields)."""

    train_examples: int
    warnings: list[str]
    headline: str | None = None
    recommendation: str | None = None
    method: str | None = None
    reasons: list[str] | None = None
    next_steps: list[str] | None = None
    memory_gb: dict[str, float] | None = None

    NAME: ClassVar[str] = "decision.json"
    FIX: ClassVar[str] = "re-run the decide stage: tunewise stage decide RUN"

    def to_json(self) -> dict:
        return {k: v for k, v in super().to_json().items() if v is not None}


@dataclass
class JudgeSummary(JsonArtifact):
    """judge/summary.json: the LLM judge's pointwise scores per arm and its pairwise win rate."""

    judge: dict[str, str]  # {url, model}
    rubric: dict[str, str]
    n_items: int
    pointwise: dict
    pairwise: dict | None = None  # {arm_a, arm_b, win_rate_a, consistent, position_inconsistency_rate, ...}
    provenance: Provenance | None = None

    NAME: ClassVar[str] = "judge/summary.json"
    FIX: ClassVar[str] = "re-run the judge stage: tunewise stage judge RUN"

    def figures(self) -> dict:
        """What the verdict carries: everything but the provenance."""
        return {k: v for k, v in self.to_json().items() if k != "provenance" and v is not None}


# --- the verdict ---------------------------------------------------------------------------------

class Decision(str, Enum):
    SHIP = "SHIP"
    DO_NOT_SHIP = "DO NOT SHIP"


@dataclass
class Verdict(JsonArtifact):
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
    provenance: Provenance | None = None

    NAME: ClassVar[str] = "verdict.json"
    FIX: ClassVar[str] = "re-run the verdict stage: tunewise run --resume RUN"

    @property
    def shipped(self) -> bool:
        return self.decision is Decision.SHIP

    def to_json(self) -> dict:
        data = super().to_json()
        data["decision"] = self.decision.value
        return {k: v for k, v in data.items() if v is not None or k not in ("regression", "judge", "provenance")}

    @classmethod
    def from_json(cls, data: Any, where: Path | None = None) -> "Verdict":
        """A verdict read back; a TunewiseError naming the file when it is not one tunewise wrote."""
        if isinstance(data, dict):
            try:
                decision = Decision(data.get("decision"))
            except ValueError:
                raise TunewiseError(f"unknown verdict decision {data.get('decision')!r}", file=where,
                                    field="decision", fix=cls.FIX) from None
            data = {**data, "decision": decision}
            if "baselines" not in data and isinstance(data.get("means"), dict):  # before baselines were named
                data["baselines"] = [a for a in data["means"] if a != "finetuned"]
        return super().from_json(data, where)


@dataclass
class ArmMetrics(JsonArtifact):
    """metrics/<arm>.json: one arm's scores on the test items, each metric a bootstrap interval."""

    output_type: str
    n: int
    metrics: dict[str, dict[str, float]]  # metric -> {mean, low, high}
    confusion: dict[str, dict]  # "label" or a JSON field -> {labels, columns, matrix}
    arm: str
    primary: str
    model: str  # the generator's fingerprint
    shots: list[str] = dataclasses.field(default_factory=list)  # few_shot: the sources of its fixed examples
    json_schema: dict | None = None
    max_new_tokens: int | None = None
    provenance: Provenance | None = None

    NAME: ClassVar[str] = "an arm's metrics file"

    def interval(self, metric: str | None = None) -> dict[str, float]:
        """{mean, low, high} of `metric` (default: the primary metric)."""
        return self.metrics[metric or self.primary]

    @property
    def primary_mean(self) -> float:
        return self.interval()["mean"]


@dataclass
class RegressionMetrics(JsonArtifact):
    """metrics/regression_<who>.json: base or fine-tune on the general regression set."""

    who: str
    n: int
    accuracy: dict[str, float]  # {mean, low, high}
    by_category: dict[str, float]
    model: str
    provenance: Provenance | None = None

    NAME: ClassVar[str] = "a regression-set metrics file"


@dataclass
class TrainSummary(JsonArtifact):
    """train_summary.json: what training did (and the same figures in the adapter's tunewise.json)."""

    base: str
    method: str
    dtype: str
    lr: float
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
    step_tokens_per_second: float  # counting only the time inside optimizer steps
    peak_memory_mib: float
    gradient_checkpointing: bool
    world_size: int
    stopped_early: bool
    resumed_from_step: int | None
    fast_path: list[str]  # the CPU levers that were on (train/fast.py)

    NAME: ClassVar[str] = "train_summary.json"
    FIX: ClassVar[str] = "train the run again: tunewise train --resume RUN"


@dataclass
class TrainPlan(JsonArtifact):
    """Every value the train stage ran with, resolved once by train/plan.py: printed at the start,
    the resume fingerprint, saved with the weights (WeightsRecord.plan)."""

    base: str
    method: str
    task: str
    system_prompt: str
    describe: str  # what is trained, e.g. "LoRA r=16 alpha=32 trained with DPO"
    adapter: dict[str, Any]  # adapter_shape(), targets resolved against the model
    preference: dict[str, float] | None  # dpo / orpo: {beta, sft_weight}
    dtype: str  # compute dtype under autocast
    device: str
    engine: str  # "one process" or "N processes (torchrun)"
    world_size: int
    lr: float
    lr_default: bool  # train.lr unset: the method's default
    schedule: str
    warmup_ratio: float
    warmup_steps: int
    weight_decay: float
    batch_size: int  # micro-batch, per process
    grad_accum: int
    global_batch: int  # examples (pairs) per optimizer step, whatever the memory plan does
    memory_note: str
    gradient_checkpointing: bool
    epochs: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    save_every: int
    keep_checkpoints: int
    patience: int | None
    max_seq_len: int
    train_examples: int
    dropped_too_long: int
    trainable_params: int
    fast_path: list[str]  # the CPU levers that are on (train/fast.py)
    seeds: dict[str, int]
    fingerprint: dict[str, Any]  # what a checkpoint must have been trained with to be continued

    NAME: ClassVar[str] = "the training plan"
    FIX: ClassVar[str] = "train the run again: tunewise train --resume RUN"

    @property
    def unit(self) -> str:
        return "pairs" if self.preference is not None else "examples"

    def startup_line(self) -> str:
        return (
            f"[bold]train[/] {self.describe} on {self.base} ({self.dtype} compute); "
            f"{self.train_examples} {self.unit} (dropped {self.dropped_too_long} > {self.max_seq_len} tokens); "
            f"batch {self.batch_size}{self.memory_note} x accum {self.grad_accum}"
            f"{f' x {self.world_size} processes' if self.world_size > 1 else ''}, {self.epochs} epoch(s) = "
            f"{self.total_steps} steps; lr {self.lr:g}{' (default for ' + self.method + ')' if self.lr_default else ''} "
            f"{self.schedule}, warmup {self.warmup_ratio:g}, weight decay "
            f"{self.weight_decay:g}; {self.trainable_params:,} trainable params; gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}"
            f"{'; CPU path: ' + ', '.join(self.fast_path) if self.fast_path else ''}; val every {self.eval_every} steps"
            f"{f', stop after {self.patience} without a new best' if self.patience else ''}, "
            f"checkpoint every {self.save_every} (keep {self.keep_checkpoints})"
        )

    def params(self) -> dict[str, Any]:
        """The plan as dotted keys for an experiment tracker (`plan.lr`, `plan.adapter.alpha`)."""
        out = {f"plan.{k}": v for k, v in self.to_json().items() if k not in ("fingerprint", "adapter", "seeds")}
        return out | {f"plan.adapter.{k}": v for k, v in self.adapter.items()}


@dataclass
class WeightsRecord(JsonArtifact):
    """tunewise.json next to trained weights (the adapter, a checkpoint's best, a merged export):
    which step they are from, what they were trained on and how, and the chat format they were
    trained under. Files from before the provenance was nested carry its keys at the top level."""

    step: int
    val_loss: float
    chat: dict | None = None  # ChatFormat.record(): template source, settings, stops
    provenance: Provenance | None = None
    train: TrainSummary | None = None
    plan: TrainPlan | None = None  # what training resolved (method, lr, adapter shape, batch, ...)
    export: dict | None = None  # a merged export: {provenance, merged_dtype, files}

    NAME: ClassVar[str] = "the weights' tunewise.json"
    FIX: ClassVar[str] = "train the run again: tunewise train --resume RUN"

    @classmethod
    def from_json(cls, data: Any, where: Path | None = None) -> "WeightsRecord":
        if isinstance(data, dict) and "provenance" not in data and "run" in data:  # provenance at the top level
            data = {**data, "provenance": {k: data[k] for k in (*Provenance.KEYS, "seed") if k in data}}
        record = super().from_json(data, where)
        if isinstance(record.train, dict):
            record.train = TrainSummary.from_json(record.train, where)
        if isinstance(record.plan, dict):
            record.plan = TrainPlan.from_json(record.plan, where)
        return record

    def to_json(self) -> dict:
        out = super().to_json()
        if self.train is not None:
            out["train"] = self.train.to_json()
        if self.plan is not None:
            out["plan"] = self.plan.to_json()
        return {k: v for k, v in out.items() if v is not None}
