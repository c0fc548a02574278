"""The typed config tree (task, data, model, lora, train, eval, decide) loaded from YAML.

A `tunewise.yaml` is a serialized `Config`. Unknown keys and wrong types are errors that name
the key (and its line in the file); `--set a.b=value` overrides any leaf before validation.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunewise.artifacts import Seeds
from tunewise.errors import TunewiseError


class Answers(BaseModel):
    """The `decide:` section: what the user knows about their project, one field per question in
    decide.QUESTIONS (`tunewise decide` asks them; decide.recommend reads them)."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    problem: Literal["behavior", "knowledge", "capability", "unsure"] = Field(
        description="What the model gets wrong: behavior (format, style, a narrow task), "
        "knowledge (facts it does not know), capability (reasoning it cannot do), or unsure."
    )
    changes_often: bool = Field(
        description="Whether the requirement or the knowledge behind it changes weekly or faster."
    )
    n_examples: int = Field(ge=0, description="How many good input -> output examples exist.")
    prompt_tried: bool = Field(
        description="Whether a strong few-shot prompt was tried and measured on held-out examples."
    )
    prompt_meets_target: bool | None = Field(
        default=None, description="Whether that measured prompt reached the quality target."
    )
    requests_per_day: int = Field(default=0, ge=0, description="Expected requests per day.")
    latency_sensitive: bool = Field(default=False, description="Whether response time matters.")
    private_data: bool = Field(default=False, description="Whether data must stay on own hardware.")
    model_params_b: float = Field(
        default=0.135, gt=0, description="Size of the base model, in billions of parameters."
    )
    gpu_memory_gb: float = Field(
        default=0.0, ge=0, description="Memory of the largest GPU in GB; 0 means CPU only."
    )

    @model_validator(mode="after")
    def _measured_prompt_has_result(self) -> Answers:
        if self.prompt_tried and self.prompt_meets_target is None:
            raise ValueError(
                "prompt_tried is true, so prompt_meets_target must say whether the prompt "
                "reached the quality target (true or false)"
            )
        return self


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Strict):
    name: str = Field("task", description="Short name; used in the run folder name.")
    system_prompt: str = Field(
        "", description="System prompt for every arm and for training (a record's own wins)."
    )
    output_type: Literal["auto", "label", "json", "text"] = Field(
        "auto", description="How outputs are scored; auto detects it from the training outputs."
    )


class DataConfig(_Strict):
    path: str | list[str] = Field(
        ..., description="Data file(s): JSONL, JSON array, CSV, Parquet or a datasets.save_to_disk folder."
    )
    map: dict[str, str] = Field(
        default_factory=dict, description="Rename fields, e.g. {question: user, answer: assistant}."
    )
    strict: bool = Field(False, description="Stop at the first bad row instead of skipping bad rows.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of examples held out for validation.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of examples held out for the verdict.")
    seed: int = Field(0, description="Seed of the split shuffle.")
    split: Literal["auto", "random", "stratified", "group", "time"] = Field(
        "auto", description="auto = stratified when outputs are labels, else random."
    )
    group_key: str | None = Field(None, description="Field whose rows stay together in one split (split: group).")
    time_key: str | None = Field(None, description="Field ordering rows in time; newest are the test set (split: time).")
    near_dup_threshold: float | None = Field(
        0.8, gt=0, le=1, description="MinHash Jaccard of two inputs (shared phrasing left out) at which rows with "
        "the same answer are near-duplicates, and a training input too close to a held-out one; null: off."
    )
    semantic_threshold: float | None = Field(
        0.95, gt=0, le=1, description="Embedding cosine of two inputs (shared phrasing left out) above which rows "
        "with the same answer are duplicates, and a training input too close to a held-out one; null: off."
    )
    decontaminate: bool = Field(True, description="Remove training examples that overlap val/test or eval_files.")
    eval_files: list[str] = Field(
        default_factory=list, description="Other evaluation sets training examples must not overlap."
    )
    max_examples: int | None = Field(
        None, gt=0, description="Use a seeded sample of this many examples (quick runs)."
    )

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @model_validator(mode="after")
    def _split_keys(self) -> "DataConfig":
        if self.split == "group" and not self.group_key:
            raise ValueError("data.split: group needs data.group_key")
        if self.split == "time" and not self.time_key:
            raise ValueError("data.split: time needs data.time_key")
        return self


class ModelConfig(_Strict):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Embedded model name, a local Hugging Face folder, or a hub id (org/name).",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template (text, or the path of a .jinja file) used everywhere instead of the "
                    "model's own; a base model without one gets a recorded default.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings the chat template reads, e.g. enable_thinking: false (Qwen3) or date_string "
                    "(Llama 3.1+); tunewise fixes those two unless set here.",
    )


Method = Literal["lora", "dora", "qlora", "full", "prompt_tuning", "dpo", "orpo"]
METHODS: tuple[str, ...] = typing.get_args(Method)
PREFERENCE_METHODS = ("dpo", "orpo")


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank (lora, dora, qlora, dpo, orpo).")
    alpha: int | None = Field(None, gt=0, description="LoRA alpha; default 2*r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: Literal["attention", "all-linear"] | list[str] = Field(
        "attention", description="Preset ('attention', 'all-linear') or module names."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train with the adapter.")


class PromptTuningConfig(_Strict):
    virtual_tokens: int = Field(20, gt=0, le=512, description="Trained soft-prompt vectors prepended to every input.")
    init_text: str | None = Field(
        None, description="Initialize the soft prompt from this text's embeddings (default: the task's system "
        "prompt when it has one, else random)."
    )


class PreferenceConfig(_Strict):
    beta: float = Field(
        0.1, gt=0, description="DPO: strength of the KL tie to the reference model; ORPO: weight of the odds-ratio term."
    )
    sft_weight: float = Field(
        0.0, ge=0, description="DPO only: add this times the chosen answers' SFT loss (RPO); ORPO always includes it."
    )


class TrainConfig(_Strict):
    epochs: int | None = Field(None, gt=0, description="Passes over the train split; derived if unset.")
    lr: float | None = Field(
        None, gt=0, description="Peak learning rate; default by method (LoRA family 2e-4, full 2e-5, "
        "prompt tuning 3e-2, DPO 5e-5, ORPO 1e-4)."
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    batch_size: int | None = Field(None, gt=0, description="Examples per step; derived if unset.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_seq_len: int | None = Field(None, gt=8, description="Longest example in tokens; derived if unset.")
    evals_per_epoch: int = Field(2, gt=0, description="Validation-loss evaluations per epoch.")
    patience: int | None = Field(
        3, gt=0, description="Stop after this many validations without a new best val loss; null: never."
    )
    save_every: int | None = Field(
        None, gt=0, description="Resumable checkpoint every this many optimizer steps; default: at every validation."
    )
    keep_checkpoints: int = Field(2, gt=0, description="Newest step checkpoints kept (the best one is kept besides).")
    seed: int = Field(0, description="Seed of LoRA init, dropout and batch order.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute dtype under autocast (trained weights stay fp32); auto: bf16 where the "
        "hardware has it, else fp16 on GPU, else fp32."
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="Recompute activations in backward to save memory; auto: only when memory requires it."
    )
    fast_path: bool = Field(
        True, description="CPU speed levers (cheap shared dropout masks, fused LoRA forward, fused RMSNorm, grouped "
        "eager attention, 16-bit LoRA inputs); false: the model and PEFT exactly as they come, e.g. to compare against."
    )


RED_FLAGS = ("overfitting", "length_drift", "refusal", "forgetting")
BUILTIN_ARMS = ("zero_shot", "few_shot", "retrieved_few_shot", "finetuned")


class _Remote(_Strict):
    url: str = Field(..., description="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="Model name sent with each request.")
    api_key_env: str | None = Field(
        None, description="Environment variable that holds the API key (the key itself never goes in YAML)."
    )
    concurrency: int = Field(4, gt=0, le=64, description="Requests in flight at once.")
    timeout: float = Field(120.0, gt=0, description="Seconds before a request is abandoned.")


class EndpointConfig(_Remote):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Arm name in the tables and the report.")
    baseline: bool = Field(
        True, description="Count this arm as a baseline the fine-tune must beat (false: shown for reference)."
    )


class JudgeConfig(_Remote):
    rubric: dict[str, str] = Field(
        default_factory=lambda: {
            "correctness": "The answer says what the reference says; nothing false or missing.",
            "format": "The answer has the form the task asks for, with nothing extra.",
        },
        description="Dimension -> what a 5 means; each answer gets 1-5 per dimension with a reason.",
    )
    pairwise: bool = Field(True, description="Also ask which of fine-tune and best baseline is better, both orders.")
    max_items: int | None = Field(50, gt=0, description="Judge only the first N test items (judges cost money).")


class EvalConfig(_Strict):
    few_shot_k: int = Field(3, ge=1, description="Examples from the train split in the few-shot arms.")
    seed: int = Field(0, description="Seed of the few-shot picks and of every bootstrap resample.")
    max_new_tokens: int | None = Field(None, gt=0, description="Generation budget; derived if unset.")
    batch_size: int = Field(32, gt=0, description="Prompts generated together.")
    max_test: int | None = Field(None, gt=0, description="Score only the first N test items.")
    primary_metric: str | None = Field(
        None, description="Metric the verdict uses; default by output type (accuracy, json_exact, token_f1)."
    )
    margin: float = Field(0.02, ge=0, description="Gain over the best baseline required to ship.")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level of the paired test.")
    bootstrap_samples: int = Field(2000, ge=100, description="Resamples for bootstrap intervals.")
    report_samples: int = Field(200, ge=0, description="Test items in the report's side-by-side table.")
    json_schema: dict | None = Field(
        None, description="JSON Schema outputs must follow; inferred from the training outputs if unset."
    )
    endpoints: list[EndpointConfig] = Field(
        default_factory=list, description="Extra arms: OpenAI-compatible endpoints (hosted, vLLM, llama.cpp)."
    )
    judge: JudgeConfig | None = Field(None, description="LLM-as-judge through an OpenAI-compatible endpoint.")
    forgetting: bool = Field(True, description="Score base and fine-tune on tunewise's general regression set.")
    block_on: list[Literal["overfitting", "length_drift", "refusal", "forgetting"]] = Field(
        default_factory=lambda: ["length_drift", "refusal", "forgetting"],
        description="Red flags that turn SHIP into DO NOT SHIP (overfitting is shown but does not block by "
        "default: the best checkpoint, from before validation loss rose, is the one evaluated).",
    )
    max_length_ratio: float = Field(
        2.0, gt=1, description="Length drift: outputs longer than this many times (or shorter than 1/x) the references."
    )
    max_refusal_increase: float = Field(
        0.05, ge=0, description="Refusal flag: fine-tune refuses this much more often than the base model."
    )
    max_forgetting_drop: float = Field(
        0.1, ge=0, description="Forgetting flag: regression-set accuracy falls by more than this."
    )
    cache: bool = Field(True, description="Reuse outputs cached by model + prompt + generation settings.")

    @model_validator(mode="after")
    def _arm_names(self) -> "EvalConfig":
        names = [e.name for e in self.endpoints]
        clash = [n for n in names if n in BUILTIN_ARMS or names.count(n) > 1]
        if clash:
            raise ValueError(f"eval.endpoints: name '{clash[0]}' is taken; built-in arms are {', '.join(BUILTIN_ARMS)}")
        return self


class Config(_Strict):
    task: TaskConfig = Field(default_factory=TaskConfig, description="What the model must do.")
    data: DataConfig = Field(..., description="Where the examples are and how they are split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    method: Method = Field(
        "lora", description="lora | dora | qlora (4-bit NF4 base) | full | prompt_tuning on chats; "
        "dpo | orpo (LoRA) on prompt/chosen/rejected pairs."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter shape.")
    prompt_tuning: PromptTuningConfig = Field(default_factory=PromptTuningConfig, description="Soft-prompt shape.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="DPO / ORPO settings.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimizer and schedule.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Baselines, metrics, verdict.")
    decide: Answers | None = Field(None, description="Answers to `tunewise decide`'s questions.")
    track: Literal["mlflow", "wandb", "tensorboard", "none"] = Field(
        "mlflow", description="Experiment tracking: MLflow (a local store in the runs folder), W&B (offline unless "
        "WANDB_MODE says otherwise), TensorBoard, or none."
    )

    @property
    def seeds(self) -> Seeds:
        return Seeds(data=self.data.seed, eval=self.eval.seed, train=self.train.seed)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> "Config":
        if self.data.val_fraction + self.data.test_fraction >= 0.5:
            raise ValueError("data.val_fraction + data.test_fraction must be below 0.5")
        return self


def _key_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node on the path `loc`, if the file has it."""
    node, line = root, None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model of the section at `loc` (to list its valid keys)."""
    model: type[BaseModel] | None = Config
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return None
        candidates = (field.annotation, *typing.get_args(field.annotation))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _apply_override(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise TunewiseError(
            f"override '{assignment}' is not of the form key=value", fix="e.g. --set train.lr=1e-4"
        )
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TunewiseError(f"cannot set '{key}': '{part}' is not a section", field=key)
    try:  # a number, a bool, a list ... as YAML reads it; text that is not YAML stays text (a template)
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config file; data paths become absolute."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TunewiseError("config file not found", file=path, fix="run `tunewise init DIR` to write one")
    except (OSError, UnicodeDecodeError) as err:
        raise TunewiseError(f"cannot read config file: {err}", file=path)
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise TunewiseError(
            f"not valid YAML: {getattr(err, 'problem', err)}",
            file=path,
            line=mark.line + 1 if mark else None,
        )
    if not isinstance(raw, dict):
        raise TunewiseError("the config must be a mapping of sections (task, data, ...)", file=path)
    for assignment in overrides:
        _apply_override(raw, assignment)
    return _validate(raw, path, root)


def _validate(raw: dict, path: Path, root: yaml.Node | None) -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if first["type"] == "extra_forbidden":
            parent = _section_model(loc[:-1])
            valid = ", ".join(parent.model_fields) if parent else ""
            raise TunewiseError(
                "unknown key",
                file=path,
                line=_key_line(root, loc),
                field=key,
                fix=f"valid keys here: {valid}" if valid else "remove it",
            )
        if first["type"] == "missing":
            raise TunewiseError("required key is missing", file=path, field=key, fix=f"add '{key}:'")
        raise TunewiseError(
            f"{first['msg']} (got {first.get('input')!r})",
            file=path,
            line=_key_line(root, loc),
            field=key,
        )
    def absolute(p: str) -> str:
        return p if Path(p).is_absolute() else str((path.parent / p).resolve())

    paths = [absolute(p) for p in config.data.paths]
    config.data.path = paths[0] if isinstance(config.data.path, str) else paths
    config.data.eval_files = [absolute(p) for p in config.data.eval_files]
    template = config.model.chat_template
    if template is not None and "{" not in template:  # a .jinja file: the run keeps its text
        try:
            config.model.chat_template = Path(absolute(template)).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TunewiseError(f"cannot read the chat template file '{template}' ({err.__class__.__name__})",
                                file=path, line=_key_line(root, ("model", "chat_template")),
                                field="model.chat_template", fix="give the path of a .jinja file, relative to the "
                                "config, or the template text itself") from None
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what a run actually used)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
