"""Wiring: the config turned into each stage's own settings, once (DESIGN.md "Stage boundaries").

Only the wiring modules (this one, pipeline.py, sweep.py, cli.py, config.py) see the root
`Config`; every stage receives its settings object or plain values:

| stage              | settings        | built here from                                             |
|--------------------|-----------------|-------------------------------------------------------------|
| data               | DataSettings    | data.*, task.system_prompt / output_type, train.max_seq_len |
| baseline, evaluate | EvalSettings    | eval.*, model, task.system_prompt, the seeds                |
| train              | TrainSettings   | model, method, lora, prompt_tuning, preference, train.*     |
| tracking           | TrackSettings   | track, task.name, the whole config as dotted keys           |

Training then resolves its derived values into a TrainPlan (train/plan.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunewise.config import Config, dump_config
from tunewise.data import DataSettings
from tunewise.evaluate.runner import EvalSettings
from tunewise.train.plan import TrainSettings
from tunewise.train.tracking import TrackSettings


def data_settings(config: Config) -> DataSettings:
    d = config.data
    return DataSettings(
        val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed, split=d.split,
        group_key=d.group_key, time_key=d.time_key, near_dup_threshold=d.near_dup_threshold,
        semantic_threshold=d.semantic_threshold, decontaminate=d.decontaminate,
        eval_files=tuple(d.eval_files), max_examples=d.max_examples, strict=d.strict, mapping=dict(d.map),
        max_seq_len=config.train.max_seq_len, system_prompt=config.task.system_prompt,
        output_type=config.task.output_type,
    )


def eval_settings(config: Config, config_file: Path | None = None) -> EvalSettings:
    ev = config.eval
    return EvalSettings(
        model=config.model, system_prompt=config.task.system_prompt, few_shot_k=ev.few_shot_k,
        max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, max_test=ev.max_test,
        primary_metric=ev.primary_metric, json_schema=ev.json_schema, bootstrap_samples=ev.bootstrap_samples,
        alpha=ev.alpha, cache=ev.cache, seeds=config.seeds, config_file=config_file,
    )


def train_settings(config: Config) -> TrainSettings:
    return TrainSettings(
        model=config.model, task=config.task.name, system_prompt=config.task.system_prompt, method=config.method,
        lora=config.lora, prompt_tuning=config.prompt_tuning, preference=config.preference, train=config.train,
        seeds=config.seeds,
    )


def track_settings(config: Config) -> TrackSettings:
    return TrackSettings(backend=config.track, experiment=config.task.name, params=flat_config(config),
                         config_yaml=dump_config(config), method=config.method, seeds=config.seeds)


def flat_config(config: Config) -> dict[str, Any]:
    """The resolved config as dotted keys (`train.seed`) -> JSON values; lists and dicts stay whole."""
    out: dict[str, Any] = {}

    def walk(model: BaseModel, dumped: dict[str, Any], prefix: str) -> None:
        for name, value in dumped.items():
            child = getattr(model, name)
            if isinstance(child, BaseModel):
                walk(child, value, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = value

    walk(config, config.model_dump(mode="json"), "")
    return out
