"""The baseline and evaluate stages: generate each arm on the test split, score, write files.

An arm's outputs come from a generator: the local model (base or base+adapter, batched greedy
generation) or an OpenAI-compatible endpoint. Either way outputs go through the generation
cache, keyed by model fingerprint + rendered prompt + settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from tunewise.artifacts import (
    ArmMetrics,
    DataManifest,
    Provenance,
    RegressionMetrics,
    Seeds,
    WeightsKind,
    weights_in,
)
from tunewise.config import EndpointConfig, ModelConfig
from tunewise.data import Example, load_split
from tunewise.data.outputs import normalize_label, parse_json
from tunewise.data.records import Message
from tunewise.errors import TunewiseError
from tunewise.evaluate import forgetting
from tunewise.evaluate.arms import build_prompts, pick_shots
from tunewise.evaluate.cache import (
    GenerationCache,
    cached_generate,
    default_path,
    model_fingerprint,
)
from tunewise.evaluate.endpoint import Endpoint, chat_many
from tunewise.evaluate.metrics import PRIMARY, infer_schema, macro_f1, score_items
from tunewise.evaluate.retrieval import retrieve_shots
from tunewise.evaluate.stats import bootstrap_ci, bootstrap_statistic
from tunewise.models import Answer, ChatFormat, base_chat, load_model, resolve_base
from tunewise.models.chat import split_reasoning
from tunewise.models.device import placement
from tunewise.models.generate import generate
from tunewise.runs import RunDir, atomic_write_jsonl, read_jsonl

GENERATION_VERSION = 3  # bump when generation changes outputs (2: adapters unmerged; 3: the family's stop tokens)
MAX_CONFUSION_LABELS = 20


@dataclass(frozen=True)
class EvalSettings:
    """The baseline and evaluate stages' inputs, built once by the pipeline (settings.py)."""

    model: ModelConfig  # base model and chat template: the prompts every local arm renders
    system_prompt: str
    few_shot_k: int
    max_new_tokens: int | None  # None: derived from the longest training output
    batch_size: int
    max_test: int | None
    primary_metric: str | None  # None: the output type's default
    json_schema: dict | None  # None: inferred from the training outputs
    bootstrap_samples: int
    alpha: float
    cache: bool
    seeds: Seeds  # eval: few-shot picks and bootstrap resamples; all three go into provenance
    config_file: Path | None = None  # named in errors about eval.* keys


@dataclass
class LocalGenerator:
    """The base model, or base + adapter: batched greedy generation with the KV cache."""

    model: torch.nn.Module
    chat: ChatFormat
    fingerprint: str
    batch_size: int

    def render(self, prompt: list[Message]) -> str:
        return self.chat.prompt(prompt)

    def settings(self, max_new_tokens: int) -> dict:
        dtype = str(next(self.model.parameters()).dtype)
        return {"engine": "tunewise", "version": GENERATION_VERSION, "decoding": "greedy",
                "max_new_tokens": max_new_tokens, "dtype": dtype, "stop_ids": list(self.chat.stop_ids)}

    def complete(self, prompts: list[list[Message]], max_new_tokens: int, console: Console, label: str,
                 keep=None) -> list[str]:
        return generate(self.model, self.chat, prompts, max_new_tokens=max_new_tokens,
                        batch_size=self.batch_size, console=console, label=label, on_outputs=keep)

    def split(self, output: str) -> Answer:
        return self.chat.split(output)


@dataclass
class RemoteGenerator:
    """An OpenAI-compatible endpoint, temperature 0."""

    endpoint: Endpoint

    @property
    def fingerprint(self) -> str:
        return self.endpoint.fingerprint()

    def render(self, prompt: list[Message]) -> str:
        return json.dumps(prompt, ensure_ascii=False)

    def settings(self, max_new_tokens: int) -> dict:
        return {"engine": "openai-compatible", "temperature": 0.0, "max_tokens": max_new_tokens}

    def complete(self, prompts: list[list[Message]], max_new_tokens: int, console: Console, label: str,
                 keep=None) -> list[str]:
        return chat_many(self.endpoint, prompts, max_tokens=max_new_tokens, console=console, label=label,
                         on_outputs=keep)

    def split(self, output: str) -> Answer:
        return split_reasoning(output)


Generator = LocalGenerator | RemoteGenerator


def open_cache(enabled: bool) -> GenerationCache:
    return GenerationCache(default_path() if enabled else None)


def generate_cached(
    gen: Generator, cache: GenerationCache, prompts: list[list[Message]], max_new_tokens: int, console: Console,
    label: str,
) -> list[str]:
    """Outputs of `gen` for `prompts`; only prompts not in the cache are generated."""
    texts = [gen.render(p) for p in prompts]
    outputs, hits = cached_generate(
        cache, gen.fingerprint, gen.settings(max_new_tokens), texts,
        lambda idx, keep: gen.complete([prompts[i] for i in idx], max_new_tokens, console, label, keep),
    )
    if hits:
        console.print(f"  {label}: {hits} of {len(prompts)} outputs from the cache")
    return outputs


def output_type(run: RunDir) -> str:
    """The data stage decided it (from the config or the outputs); the manifest says which."""
    return DataManifest.read(run.manifest).output_type


def max_new_tokens(given: int | None, tokenizer, train: list[Example]) -> int:
    """`given`, else twice the longest training output in tokens plus 32: room for a verbose base
    model to finish its answer, so a baseline is not scored invalid only because it was cut off."""
    if given:
        return given
    longest = max(len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) for e in train)
    return min(1024, 2 * longest + 32)


def test_items(run: RunDir, max_test: int | None) -> list[Example]:
    test = load_split(run.split("test"))
    return test[:max_test] if max_test else test


def primary_metric(chosen: str | None, kind: str, available: list[str], where: Path | None = None) -> str:
    """The verdict's metric: `chosen` if it exists for this output type, else the type's default."""
    chosen = chosen or PRIMARY[kind]
    if chosen not in available:
        raise TunewiseError(
            f"metric '{chosen}' is not computed for {kind} outputs", file=where, field="eval.primary_metric",
            fix=f"one of: {', '.join(m for m in available if not m.startswith('field:'))}",
        )
    return chosen


def confusion(predicted: list[str], actual: list[str]) -> dict | None:
    """Counts of (reference label, predicted label); predictions outside the labels are '(other)'."""
    from sklearn.metrics import confusion_matrix

    labels = sorted(set(actual))
    if not 2 <= len(labels) <= MAX_CONFUSION_LABELS:
        return None
    known = set(labels)
    pred = [p if p in known else "(other)" for p in predicted]
    columns = labels + (["(other)"] if "(other)" in pred else [])
    matrix = confusion_matrix(actual, pred, labels=columns)[: len(labels)]
    return {"labels": labels, "columns": columns, "matrix": matrix.tolist()}


def confusions(kind: str, outputs: list[str], references: list[str]) -> dict[str, dict]:
    """Labels: one matrix. JSON: one per field whose reference values are a few strings."""
    if kind == "label":
        matrix = confusion([normalize_label(o) for o in outputs], [normalize_label(r) for r in references])
        return {"label": matrix} if matrix else {}
    if kind != "json":
        return {}
    refs = [parse_json(r) if isinstance(parse_json(r), dict) else {} for r in references]
    preds = [parse_json(o) if isinstance(parse_json(o), dict) else {} for o in outputs]
    out = {}
    for key in dict.fromkeys(k for r in refs for k in r):
        values = [r.get(key) for r in refs]
        if not all(isinstance(v, str) for v in values):
            continue
        matrix = confusion([str(p.get(key, "(missing)")) for p in preds], values)
        if matrix:
            out[key] = matrix
    return out


def metric_intervals(
    scores: list[dict[str, float]], outputs: list[str], references: list[str], *, kind: str, samples: int,
    alpha: float, seed: int,
) -> dict[str, dict[str, float]]:
    """Every metric's bootstrap interval over the items (macro-F1 for labels too)."""
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
    return metrics


def endpoint_of(cfg: EndpointConfig | object, where: str) -> Endpoint:
    """An Endpoint from an endpoint or judge config; the API key is read from its environment variable."""
    import os

    key = None
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise TunewiseError(
                f"environment variable {cfg.api_key_env} is not set", field=f"{where}.api_key_env",
                fix=f"export {cfg.api_key_env}=<your key>, or remove api_key_env for a server without keys",
            )
    return Endpoint(url=cfg.url.rstrip("/"), model=cfg.model, api_key=key, timeout=cfg.timeout,
                    concurrency=cfg.concurrency)


def evaluate_arms(run: RunDir, ev: EvalSettings, arms: dict[str, Generator], console: Console) -> None:
    """Generate, score and write predictions/<arm>.jsonl and metrics/<arm>.json for each arm.

    Built-in arms build their prompts from the test item (and shots); endpoint arms get the
    zero-shot prompt, as a user of that model would send it."""
    local = next((gen for gen in arms.values() if isinstance(gen, LocalGenerator)), None)
    chat = local.chat if local is not None else base_chat(ev.model)  # built (and checked) once per stage
    train = load_split(run.split("train"))
    test = test_items(run, ev.max_test)
    kind = output_type(run)
    budget = max_new_tokens(ev.max_new_tokens, chat.tokenizer, train)
    fixed = pick_shots(train, ev.few_shot_k, ev.seeds.eval)
    schema = None
    if kind == "json":
        schema = ev.json_schema or infer_schema([e.target for e in train])
    references = [e.target for e in test]
    cache = open_cache(ev.cache)
    for arm, gen in arms.items():
        shots = [fixed] * len(test)
        if arm == "retrieved_few_shot":
            shots = retrieve_shots(train, test, ev.few_shot_k, run.index)
        prompts = build_prompts(arm, test, ev.system_prompt, shots)
        answers = [gen.split(o) for o in generate_cached(gen, cache, prompts, budget, console, arm)]
        outputs = [a.text for a in answers]  # scored without the reasoning block
        scores = score_items(kind, outputs, references, schema=schema)
        rows = [
            {"source": e.source, "prompt": e.prompt_messages[-1]["content"], "reference": r, "output": a.text,
             "scores": s}
            | ({"reasoning": a.reasoning} if a.reasoning else {})
            | ({"shots": [x.source for x in item_shots]} if arm.endswith("few_shot") else {})
            for e, r, a, s, item_shots in zip(test, references, answers, scores, shots)
        ]
        atomic_write_jsonl(run.predictions(arm), rows)
        intervals = metric_intervals(scores, outputs, references, kind=kind, samples=ev.bootstrap_samples,
                                     alpha=ev.alpha, seed=ev.seeds.eval)
        metrics = ArmMetrics(
            output_type=kind, n=len(scores), metrics=intervals, confusion=confusions(kind, outputs, references),
            arm=arm, primary=primary_metric(ev.primary_metric, kind, list(intervals), ev.config_file),
            model=gen.fingerprint,
            shots=[s.source for s in fixed] if arm == "few_shot" else [], json_schema=schema,
            max_new_tokens=budget, provenance=Provenance.of(run, ev.seeds))
        metrics.write(run.metrics(arm))
        primary, value = metrics.primary, metrics.interval()
        console.print(f"  {arm}: {primary} = {value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]")


def evaluate_regression(run: RunDir, ev: EvalSettings, who: str, gen: LocalGenerator,
                        console: Console) -> RegressionMetrics:
    """Score base or fine-tune on tunewise's general regression set (the forgetting check)."""
    items = forgetting.load_regression_set()
    raw = generate_cached(gen, open_cache(ev.cache), forgetting.prompts(items), forgetting.MAX_NEW_TOKENS, console,
                          f"regression set ({who})")
    outputs = [gen.split(o).text for o in raw]
    scores = forgetting.score(items, outputs)
    atomic_write_jsonl(run.regression_predictions(who), [
        {"id": it.id, "category": it.category, "prompt": it.prompt, "output": o, "passed": s}
        for it, o, s in zip(items, outputs, scores)
    ])
    interval = bootstrap_ci(scores, samples=ev.bootstrap_samples, alpha=ev.alpha, seed=ev.seeds.eval)
    by_category: dict[str, list[float]] = {}
    for it, s in zip(items, scores):
        by_category.setdefault(it.category, []).append(s)
    metrics = RegressionMetrics(who=who, n=len(items), accuracy=interval.to_dict(),
                                by_category={c: sum(v) / len(v) for c, v in by_category.items()},
                                model=gen.fingerprint, provenance=Provenance.of(run, ev.seeds))
    metrics.write(run.regression_metrics(who))
    console.print(f"  regression set ({who}): accuracy {interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]")
    return metrics


def load_base_for_eval(model_config: ModelConfig, batch_size: int) -> LocalGenerator:
    path = resolve_base(model_config.base)
    place = placement()
    model = load_model(path, dtype=place.dtype, place=place, spread=True)
    return LocalGenerator(model, base_chat(model_config), model_fingerprint(path), batch_size)


def load_finetuned_for_eval(run: RunDir, model_config: ModelConfig, batch_size: int) -> LocalGenerator:
    """Base + the run's adapter, unmerged: the weights `tunewise serve` runs. Merging in bf16 rounds
    base + B@A into new weights and changed 10% of the demo's greedy outputs (135/150 identical),
    so the evaluated model would not be the served one; unmerged costs little here (see bench/README.md)."""
    from peft import PeftModel

    path = resolve_base(model_config.base)
    if weights_in(run.adapter).kind is WeightsKind.WHOLE_MODEL:  # method: full wrote a whole model
        place = placement()
        model = load_model(run.adapter, dtype=place.dtype, place=place, spread=True).eval()
        return LocalGenerator(model, base_chat(model_config), model_fingerprint(run.adapter), batch_size)
    base = load_base_for_eval(model_config, batch_size)
    model = PeftModel.from_pretrained(base.model, run.adapter).eval()
    return LocalGenerator(model, base.chat, model_fingerprint(path, run.adapter), batch_size)


def endpoint_arms(endpoints: list[EndpointConfig]) -> dict[str, RemoteGenerator]:
    return {e.name: RemoteGenerator(endpoint_of(e, f"eval.endpoints[{e.name}]")) for e in endpoints}


def arm_scores(run: RunDir, arm: str) -> list[dict[str, float]]:
    return [row["scores"] for row in read_jsonl(run.predictions(arm))]
