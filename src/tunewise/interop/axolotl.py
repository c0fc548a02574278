"""Axolotl interop, both ways.

`tunewise import-axolotl config.yml` writes the equivalent tunewise.yaml; `tunewise
export-axolotl RUN` writes an Axolotl config and the run's train and validation splits, so a
recipe tuned here can be handed to an Axolotl cluster.

Axolotl is the seed system many users already have a recipe in. What carries over: the base
model, the adapter and its LoRA shape, the local datasets and their types, the sequence length,
batch, epochs, learning rate and schedule, validation split, seed, precision, gradient
checkpointing, early stopping and W&B. Every other key is listed with the reason it was not
carried over, in the command's output and as comments at the end of the written file: nothing
is dropped silently.

Hub datasets are not downloaded (tunewise never fetches data at run time): name a local copy
with `--data FILE`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunewise.errors import TunewiseError

METHODS = {"lora": "lora", "qlora": "qlora"}
RL_METHODS = {"dpo": "dpo", "orpo": "orpo"}
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant"}
LOCAL_TYPES = {"json", "csv", "parquet", "text", "arrow"}  # `ds_type`s of local files tunewise reads
# keys that only say how Axolotl runs, not what is learned: tunewise has its own answer for each
NOT_CARRIED = {
    "output_dir": "a tunewise run writes into its own run folder (--runs)",
    "dataset_prepared_path": "tunewise prepares the data into the run folder",
    "sample_packing": "tunewise does not pack examples; it groups them by length instead",
    "eval_sample_packing": "tunewise does not pack examples",
    "pad_to_sequence_len": "tunewise pads each batch to its longest example",
    "optimizer": "tunewise trains with AdamW (fp32 moments)",
    "flash_attention": "tunewise picks the attention kernel per device",
    "xformers_attention": "tunewise picks the attention kernel per device",
    "sdp_attention": "tunewise picks the attention kernel per device",
    "special_tokens": "tunewise uses the model family's own special tokens and end-of-turn stops",
    "train_on_inputs": "tunewise trains on the assistant's tokens only",
    "warmup_steps": "tunewise sets warmup as a share of the steps (train.warmup_ratio, default 0.05)",
    "saves_per_epoch": "tunewise checkpoints at every validation (train.save_every in steps)",
    "logging_steps": "tunewise logs every optimizer step",
    "deepspeed": "multi-GPU sharding under accelerate is not in tunewise yet",
    "fsdp": "multi-GPU sharding under accelerate is not in tunewise yet",
    "fsdp_config": "multi-GPU sharding under accelerate is not in tunewise yet",
    "load_in_8bit": "tunewise has no 8-bit training; the adapter trains on a 16-bit base (lora) or 4-bit (qlora)",
    "model_type": "transformers reads the architecture from the model's config.json",
    "tokenizer_type": "transformers reads the tokenizer class from the model's files",
    "lora_fan_in_fan_out": "PEFT detects Conv1D layers itself",
    "group_by_length": "tunewise always groups batches by length",
    "tf32": "tunewise decides matmul precision per device",
    "strict": "Axolotl's own config check",
}
DATASET_KEYS = {"path", "ds_type", "type", "field_messages", "message_property_mappings", "message_field_role",
                "message_field_content", "field_chosen", "field_rejected", "field", "roles"}
SILENT = {"wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "lora_model_dir", "resume_from_checkpoint",
          "local_rank", "debug", "hub_model_id", "eval_table_size", "eval_max_new_tokens", "s2_attention",
          "loss_watchdog_threshold", "loss_watchdog_patience"}  # run-time knobs with no effect on what is learned


@dataclass
class Imported:
    """The tunewise config (as YAML-ready values) and every Axolotl key it does not carry."""

    config: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why

    def yaml(self, source: Path) -> str:
        head = f"# tunewise.yaml imported from the Axolotl config {source}\n"
        body = yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True)
        tail = "".join(f"#   {k}: {why}\n" for k, why in self.skipped.items())
        return head + body + (f"\n# Axolotl keys not carried over:\n{tail}" if tail else "")


def import_axolotl(path: Path, data: list[Path] = (), task: str | None = None) -> Imported:
    """Translate an Axolotl config file; `data` are local files for its hub datasets."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunewiseError("Axolotl config not found", file=path) from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise TunewiseError(f"not valid YAML: {err}", file=path) from None
    if not isinstance(raw, dict) or "base_model" not in raw:
        raise TunewiseError("not an Axolotl config (no base_model)", file=path, field="base_model")
    out = Imported({})
    used = {"base_model", "datasets", "val_set_size", "test_datasets"}
    out.config["task"] = {"name": task or Path(path).stem}
    out.config["data"] = _data(raw, Path(path), list(data), out)
    out.config["model"] = {"base": raw["base_model"]}
    if raw.get("chat_template_jinja"):
        out.config["model"]["chat_template"] = raw["chat_template_jinja"]
    elif raw.get("chat_template") not in (None, "tokenizer_default"):
        out.skipped["chat_template"] = (f"'{raw['chat_template']}' is Axolotl's named template; tunewise uses the "
                                        "model's own (set model.chat_template to a Jinja template to override)")
    used |= {"chat_template", "chat_template_jinja"}
    out.config["method"] = _method(raw, out, Path(path))
    used |= {"adapter", "load_in_4bit", "rl", "peft_use_dora"}
    if out.config["method"] != "full":
        out.config["lora"] = _lora(raw, used)
    out.config["train"] = _train(raw, used, out)
    if raw.get("wandb_project"):
        out.config["track"] = "wandb"
        out.config["task"]["name"] = task or str(raw["wandb_project"])
    used.add("wandb_project")
    for key, value in raw.items():
        if key in used or key in SILENT or key in out.skipped or value in (None, False, "", [], {}):
            continue
        out.skipped[key] = NOT_CARRIED.get(key, "no tunewise equivalent")
    _validate(out.config, path)
    return out


def _method(raw: dict, out: Imported, source: Path) -> str:
    rl = raw.get("rl")
    if rl:
        if rl not in RL_METHODS:
            raise TunewiseError(f"rl: {rl} has no tunewise equivalent", file=source, field="rl",
                                fix=f"tunewise trains {', '.join(RL_METHODS)} on preference pairs")
        if not raw.get("adapter"):
            out.skipped["adapter"] = f"(none: a full {rl} run) tunewise's {rl} trains a LoRA adapter"
        if raw.get("load_in_4bit") or raw.get("adapter") == "qlora":
            out.skipped["load_in_4bit"] = f"tunewise's {rl} trains LoRA on a 16-bit base"
        return RL_METHODS[rl]
    adapter = raw.get("adapter")
    if not adapter:
        return "full"
    if adapter not in METHODS:
        raise TunewiseError(f"adapter: {adapter} has no tunewise equivalent", file=source, field="adapter",
                            fix="tunewise trains lora, qlora, dora, prompt tuning or full")
    if adapter == "lora" and raw.get("load_in_4bit"):
        return "qlora"
    return "dora" if raw.get("peft_use_dora") else METHODS[adapter]


def _lora(raw: dict, used: set) -> dict:
    used |= {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear"}
    lora: dict[str, Any] = {}
    for key, ours in (("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout")):
        if raw.get(key) is not None:
            lora[ours] = raw[key]
    if raw.get("lora_target_linear"):
        lora["target_modules"] = "all-linear"
    elif raw.get("lora_target_modules"):
        targets = raw["lora_target_modules"]
        lora["target_modules"] = [targets] if isinstance(targets, str) else list(targets)
    return lora


def _train(raw: dict, used: set, out: Imported) -> dict:
    train: dict[str, Any] = {}
    pairs = (("num_epochs", "epochs"), ("learning_rate", "lr"), ("micro_batch_size", "batch_size"),
             ("gradient_accumulation_steps", "grad_accum"), ("sequence_len", "max_seq_len"),
             ("weight_decay", "weight_decay"), ("warmup_ratio", "warmup_ratio"), ("seed", "seed"),
             ("evals_per_epoch", "evals_per_epoch"), ("early_stopping_patience", "patience"))
    for key, ours in pairs:
        used.add(key)
        if raw.get(key) is not None:
            train[ours] = float(raw[key]) if ours == "lr" else raw[key]
    if raw.get("seed") is not None:  # Axolotl's seed also shuffles its split
        out.config["data"]["seed"] = raw["seed"]
    schedule = raw.get("lr_scheduler")
    used.add("lr_scheduler")
    if schedule in SCHEDULES:
        train["schedule"] = SCHEDULES[schedule]
    elif schedule:
        out.skipped["lr_scheduler"] = f"'{schedule}': tunewise has cosine, linear and constant"
    used |= {"bf16", "fp16", "gradient_checkpointing"}
    if raw.get("bf16") is True:
        train["precision"] = "bf16"
    elif raw.get("fp16") is True:
        train["precision"] = "fp16"
    if raw.get("gradient_checkpointing") is True:
        train["gradient_checkpointing"] = "on"
    return train


def _data(raw: dict, source: Path, given: list[Path], out: Imported) -> dict:
    """data.path and data.map from `datasets:`; hub datasets take the `--data` files in order."""
    datasets = raw.get("datasets") or []
    if not isinstance(datasets, list) or not isinstance(raw.get("test_datasets") or [], list):
        raise TunewiseError("datasets and test_datasets must be lists of mappings (path, type)", file=source,
                            field="datasets")
    datasets = list(datasets)
    if raw.get("test_datasets"):  # a fixed validation set: tunewise makes its own val/test split from all rows
        datasets += list(raw["test_datasets"])
        out.skipped["test_datasets"] = ("read as data too: tunewise splits every row into train/val/test itself "
                                        "(data.val_fraction, data.test_fraction)")
    if not datasets:
        raise TunewiseError("the Axolotl config has no datasets", file=source, field="datasets")
    paths, mapping, hub = [], {}, []
    for i, ds in enumerate(datasets):
        where = f"datasets[{i}]"
        if not isinstance(ds, dict):
            raise TunewiseError(f"{where} is not a mapping with path and type", file=source, field=where)
        for key in sorted(set(ds) - DATASET_KEYS):
            if key == "split" and ds[key] == "train":  # a local JSON file's only split
                continue
            out.skipped[f"{where}.{key}"] = "tunewise reads the whole local file (split it beforehand if needed)"
        local = source.parent / str(ds.get("path", ""))
        if ds.get("path") and (local.exists() or ds.get("ds_type") in LOCAL_TYPES and local.suffix):
            paths.append(str(local.resolve()))
        elif given:
            paths.append(str(Path(given.pop(0)).resolve()))
        else:
            hub.append(str(ds.get("path")))
            continue
        mapping |= _fields(ds, where, out)
    if hub:
        raise TunewiseError(
            f"{', '.join(hub)} {'is a' if len(hub) == 1 else 'are'} Hugging Face hub dataset(s); tunewise reads "
            "local files only", file=source, field="datasets",
            fix="save a copy (python -c \"import datasets; datasets.load_dataset('NAME', split='train')"
                ".to_json('data.jsonl')\") and pass --data data.jsonl, once per hub dataset, in order")
    data: dict[str, Any] = {"path": paths[0] if len(paths) == 1 else paths}
    if mapping:
        data["map"] = mapping
    val = raw.get("val_set_size")
    if isinstance(val, float) and 0 < val < 0.5:
        data["val_fraction"] = val
    elif val:
        out.skipped["val_set_size"] = f"{val}: tunewise takes a share below 0.5 (data.val_fraction)"
    out.skipped.setdefault("(test split)", "tunewise also holds out data.test_fraction (default 0.1) for the "
                           "verdict; Axolotl has no test split")
    return data


def _fields(ds: dict, where: str, out: Imported) -> dict[str, str]:
    """data.map entries for one dataset, by Axolotl `type`."""
    kind = str(ds.get("type") or "")
    base = kind.split(".")[0]
    if base in ("alpaca", "completion") or not kind:
        return {ds["field"]: "text"} if base == "completion" and ds.get("field") else {}
    if base != "chat_template":
        out.skipped[f"{where}.type"] = f"'{kind}': tunewise reads chat, ShareGPT, Alpaca, prompt/completion, " \
                                       "preference pairs and text; check the data with tunewise data check"
        return {}
    roles = ds.get("roles") or {}
    if any(list(names) != [role] for role, names in roles.items()):
        out.skipped[f"{where}.roles"] = ("tunewise reads the roles system/user/assistant (and ShareGPT's "
                                         "human/gpt); rename other role names in the data")
    props = ds.get("message_property_mappings") or {}
    role = props.get("role") or ds.get("message_field_role") or "role"
    content = props.get("content") or ds.get("message_field_content") or "content"
    messages = ds.get("field_messages") or "messages"
    mapping: dict[str, str] = {}
    if (role, content) == ("from", "value"):
        target = "conversations"  # ShareGPT-style turns
    elif (role, content) == ("role", "content"):
        target = "messages"
    else:
        out.skipped[f"{where}.message_property_mappings"] = (f"turns with '{role}'/'{content}' fields: tunewise "
                                                             "reads role/content or from/value")
        target = "messages"
    if "field_chosen" in ds or "field_rejected" in ds:  # a preference dataset: the conversation is the prompt
        target = "prompt"
        mapping |= {ds.get("field_chosen", "chosen"): "chosen", ds.get("field_rejected", "rejected"): "rejected"}
    if messages != target:
        mapping[messages] = target
    return {k: v for k, v in mapping.items() if k != v}


def _validate(config: dict, source: Path) -> None:
    from pydantic import ValidationError

    from tunewise.config import Config

    try:
        Config.model_validate(config)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise TunewiseError(f"the imported value of {key} is not valid for tunewise: {first['msg']}", file=source,
                            field=key, fix="edit the Axolotl config or the written tunewise.yaml") from None


# --- export: a trained run as an Axolotl recipe -------------------------------------------------

def export_axolotl(run_dir: Path, out: Path) -> Path:
    """axolotl.yml, train.jsonl and val.jsonl (the run's own splits; the test split stays held
    out) into `out`, atomically; the settings are the training plan's, so the recipe is what ran."""
    import json

    from tunewise.data import load_split
    from tunewise.deploy.export import trained_record
    from tunewise.runs import atomic_write_text, open_run_dir, replace_dir

    run = open_run_dir(run_dir)
    plan = trained_record(run).plan
    if plan.method == "prompt_tuning":
        raise TunewiseError("Axolotl has no prompt tuning", file=run.adapter, field="method",
                            fix="export a LoRA, QLoRA, DoRA, full, DPO or ORPO run")
    template = run.adapter / "chat_template.jinja"
    recipe = _recipe(plan, template.read_text(encoding="utf-8") if template.exists() else None)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed export's leftovers
    tmp.mkdir(parents=True)
    for split in ("train", "val"):
        rows = [_row(e, plan) for e in load_split(run.split(split))]
        atomic_write_text(tmp / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(tmp / "axolotl.yml", f"# Axolotl recipe exported by tunewise from {run.root}\n"
                      "# train.jsonl / val.jsonl: the run's own splits (its test split stays held out)\n"
                      + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    replace_dir(tmp, Path(out))
    return Path(out) / "axolotl.yml"


def _row(example, plan) -> dict:
    from tunewise.data import with_system

    messages = with_system(example.messages, plan.system_prompt)
    if example.rejected is None:
        return {"messages": messages}
    return {"conversation": messages[:-1], "chosen": messages[-1],
            "rejected": {"role": "assistant", "content": example.rejected}}


def _recipe(plan, template: str | None) -> dict:
    from tunewise.models import resolve_base

    preference = plan.preference is not None
    dataset = {"path": "train.jsonl", "ds_type": "json", "type": "chat_template"}
    if preference:
        dataset.update(type="chat_template.default", field_messages="conversation", field_chosen="chosen",
                       field_rejected="rejected")
    recipe: dict[str, Any] = {"base_model": str(resolve_base(plan.base))}
    if template:
        recipe |= {"chat_template": "jinja", "chat_template_jinja": template}
    if preference:
        recipe["rl"] = plan.method
    recipe |= {"datasets": [dataset], "test_datasets": [{**dataset, "path": "val.jsonl", "split": "train"}],
               "val_set_size": 0.0, "output_dir": f"./outputs/{plan.task}",
               "sequence_len": plan.max_seq_len, "sample_packing": False, "train_on_inputs": False}
    shape = plan.adapter
    if plan.method != "full":
        recipe |= {"adapter": "qlora" if plan.method == "qlora" else "lora", "load_in_4bit": plan.method == "qlora",
                   "lora_r": shape["r"], "lora_alpha": shape["alpha"], "lora_dropout": shape["dropout"]}
        targets = shape["target_modules"]
        recipe |= {"lora_target_linear": True} if targets == "all-linear" else {"lora_target_modules": list(targets)}
        if plan.method == "dora":
            recipe["peft_use_dora"] = True
    recipe |= {
        "micro_batch_size": plan.batch_size, "gradient_accumulation_steps": plan.grad_accum,
        "num_epochs": plan.epochs, "learning_rate": plan.lr, "lr_scheduler": plan.schedule,
        "warmup_ratio": plan.warmup_ratio, "weight_decay": plan.weight_decay, "optimizer": "adamw_torch",
        "evals_per_epoch": max(1, round(plan.steps_per_epoch / plan.eval_every)),
        "bf16": plan.dtype == "bfloat16", "fp16": plan.dtype == "float16",
        "gradient_checkpointing": plan.gradient_checkpointing, "seed": plan.seeds.get("train", 0),
    }
    if plan.patience:
        recipe["early_stopping_patience"] = plan.patience
    return recipe
