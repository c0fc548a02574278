"""The baseline and evaluate stages: generate each arm on the test split, score, write files."""

from __future__ import annotations

import torch
from rich.console import Console

from tunewise.config import Config
from tunewise.data import Example, load_split
from tunewise.evaluate.arms import build_prompts, pick_shots
from tunewise.evaluate.retrieval import retrieve_shots
from tunewise.evaluate.generate import generate
from tunewise.evaluate.metrics import PRIMARY, infer_schema, macro_f1, score_items
from tunewise.evaluate.stats import bootstrap_ci, bootstrap_statistic
from tunewise.models import compute_dtype, load_model, load_tokenizer, resolve_base
from tunewise.runs import RunDir, atomic_write_json, atomic_write_jsonl, read_json, read_jsonl


def output_type(run: RunDir) -> str:
    """The data stage decided it (from the config or the outputs); the manifest says which."""
    return read_json(run.manifest)["output_type"]


def max_new_tokens(config: Config, tokenizer, train: list[Example]) -> int:
    """Twice the longest training output in tokens plus 32: room for a verbose base model to
    finish its answer, so a baseline is not scored invalid only because it was cut off."""
    if config.eval.max_new_tokens:
        return config.eval.max_new_tokens
    longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in train)
    return min(1024, 2 * longest + 32)


def test_items(run: RunDir, config: Config) -> list[Example]:
    test = load_split(run.split("test"))
    return test[: config.eval.max_test] if config.eval.max_test else test


def arm_metrics(
    scores: list[dict[str, float]], outputs: list[str], references: list[str], *, kind: str, samples: int,
    alpha: float, seed: int,
) -> dict:
    names = list(dict.fromkeys(k for s in scores for k in s))
    metrics = {}
    for name in names:
        values = [s.get(name, 0.0) for s in scores]
        metrics[name] = bootstrap_ci(values, samples=samples, alpha=alpha, seed=seed).to_dict()
    if kind == "label":  # macro-F1 is not a mean over items: bootstrap the statistic itself
        metrics["macro_f1"] = bootstrap_statistic(
            lambda idx: macro_f1([outputs[i] for i in idx], [references[i] for i in idx]),
            len(outputs), samples=min(samples, 500), alpha=alpha, seed=seed,
        ).to_dict()
    return {"output_type": kind, "primary": PRIMARY[kind], "n": len(scores), "metrics": metrics}


def evaluate_arms(run: RunDir, config: Config, arms: list[str], model, tokenizer, console: Console) -> None:
    """Generate, score and write predictions/<arm>.jsonl and metrics/<arm>.json for each arm."""
    train = load_split(run.split("train"))
    test = test_items(run, config)
    kind = output_type(run)
    budget = max_new_tokens(config, tokenizer, train)
    fixed = pick_shots(train, config.eval.few_shot_k, config.data.seed)
    schema = None
    if kind == "json":
        schema = config.eval.json_schema or infer_schema([e.target for e in train])
    references = [e.target for e in test]
    for arm in arms:
        shots = [fixed] * len(test)
        if arm == "retrieved_few_shot":
            shots = retrieve_shots(train, test, config.eval.few_shot_k, run.index)
        prompts = build_prompts(arm, test, config.task.system_prompt, shots)
        outputs = generate(
            model, tokenizer, prompts, max_new_tokens=budget, batch_size=config.eval.batch_size,
            console=console, label=arm,
        )
        scores = score_items(kind, outputs, references, schema=schema)
        rows = [
            {"source": e.source, "prompt": e.prompt_messages[-1]["content"], "reference": r, "output": o, "scores": s}
            | ({"shots": [x.source for x in item_shots]} if arm.endswith("few_shot") else {})
            for e, r, o, s, item_shots in zip(test, references, outputs, scores, shots)
        ]
        atomic_write_jsonl(run.predictions(arm), rows)
        ev = config.eval
        metrics = arm_metrics(scores, outputs, references, kind=kind, samples=ev.bootstrap_samples, alpha=ev.alpha,
                              seed=config.data.seed)
        metrics.update(arm=arm, shots=[s.source for s in fixed] if arm == "few_shot" else [], json_schema=schema,
                       max_new_tokens=budget, provenance=run.provenance(config.data.seed))
        atomic_write_json(run.metrics(arm), metrics)
        primary = metrics["metrics"][metrics["primary"]]
        console.print(f"  {arm}: {metrics['primary']} = {primary['mean']:.3f} [{primary['low']:.3f}, {primary['high']:.3f}]")


def load_base_for_eval(config: Config):
    path = resolve_base(config.model.base)
    model = load_model(path, dtype=compute_dtype())
    return model.to("cuda") if torch.cuda.is_available() else model, load_tokenizer(path)


def load_finetuned_for_eval(run: RunDir, config: Config):
    """Base + the run's adapter, merged for generation speed (same weights as base+adapter)."""
    from peft import PeftModel

    model, tokenizer = load_base_for_eval(config)
    model = PeftModel.from_pretrained(model, run.adapter).merge_and_unload()
    return model, tokenizer


def arm_scores(run: RunDir, arm: str) -> list[dict[str, float]]:
    return [row["scores"] for row in read_jsonl(run.predictions(arm))]
