"""Per-item scores by output type: labels, JSON objects, free text.

Each scorer returns, per item, a dict of metric -> value; an arm's metric is the mean (with a
bootstrap interval). The first metric of each type is the primary one the verdict uses;
`BINARY` ones get McNemar. Every type also gets `length_ratio` (output / reference characters)
and `refusal`. Reference libraries compute what they define: jsonschema validates,
rouge-score gives ROUGE-L, sacrebleu gives chrF and BLEU, scikit-learn gives macro-F1.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from typing import Any

from tunewise.data.outputs import normalize_label, parse_json

PRIMARY = {"label": "accuracy", "json": "json_exact", "text": "token_f1"}
BINARY = {"accuracy", "json_valid", "json_exact", "json_schema_valid", "refusal"}
MAX_ENUM = 20  # string fields with at most this many distinct training values become enums

_REFUSAL = re.compile(
    r"\b(i can(?:no|')t|i am (?:not able|unable)|i'm (?:not able|unable|sorry)|i apologi[sz]e|"
    r"as an ai\b|i (?:won't|will not) (?:help|provide|answer))",
    re.I,
)


def score_label(prediction: str, reference: str) -> dict[str, float]:
    return {"accuracy": float(normalize_label(prediction) == normalize_label(reference))}


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}[type(value)]


def infer_schema(targets: list[str]) -> dict:
    """A JSON Schema for the training outputs: the keys every output has are required, no
    others allowed; each key's types; string keys with few distinct values become enums."""
    objects = [o for o in (parse_json(t) for t in targets) if isinstance(o, dict)]
    keys = list(dict.fromkeys(k for o in objects for k in o))
    properties = {}
    for key in keys:
        values = [o[key] for o in objects if key in o]
        types = sorted({_json_type(v) for v in values})
        prop: dict = {"type": types[0] if len(types) == 1 else types}
        if types == ["string"] and len(set(values)) <= MAX_ENUM:
            prop["enum"] = sorted(set(values))
        properties[key] = prop
    required = [k for k in keys if all(k in o for o in objects)]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


@lru_cache(maxsize=4)
def _validator(schema_json: str):
    from jsonschema import Draft202012Validator

    schema = json.loads(schema_json)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def score_json(prediction: str, reference: str, schema: dict | None = None) -> dict[str, float]:
    ref = parse_json(reference)
    pred = parse_json(prediction)
    fields = ref if isinstance(ref, dict) else {}
    scores = {
        "json_exact": float(pred == ref),
        "json_valid": float(pred is not None),
    }
    if schema is not None:
        scores["json_schema_valid"] = float(pred is not None and _validator(json.dumps(schema, sort_keys=True)).is_valid(pred))
    hits = [isinstance(pred, dict) and key in pred and pred[key] == value for key, value in fields.items()]
    scores["field_accuracy"] = sum(hits) / len(hits) if hits else scores["json_exact"]
    for (key, _), hit in zip(fields.items(), hits):
        scores[f"field:{key}"] = float(hit)
    return scores


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def score_text(prediction: str, reference: str) -> dict[str, float]:
    """SQuAD-style token F1 on lowercased word tokens."""
    pred, ref = _tokens(prediction), _tokens(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        f1 = float(pred == ref)
    elif common == 0:
        f1 = 0.0
    else:
        precision, recall = common / len(pred), common / len(ref)
        f1 = 2 * precision * recall / (precision + recall)
    return {"token_f1": f1, "exact_match": float(" ".join(pred) == " ".join(ref)),
            **_library_text_scores(prediction, reference)}


def _library_text_scores(prediction: str, reference: str) -> dict[str, float]:
    from sacrebleu.metrics import BLEU, CHRF

    return {
        "rouge_l": _rouge().score(reference, prediction)["rougeL"].fmeasure,
        "chrf": CHRF().sentence_score(prediction, [reference]).score / 100,
        "bleu": BLEU(effective_order=True).sentence_score(prediction, [reference]).score / 100,
    }


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def common_scores(prediction: str, reference: str) -> dict[str, float]:
    """Every output type: length relative to the reference, and whether the model refused."""
    return {"length_ratio": len(prediction) / max(len(reference), 1),
            "refusal": float(bool(_REFUSAL.search(prediction)))}


def score_items(
    output_type: str, predictions: list[str], references: list[str], *, schema: dict | None = None
) -> list[dict[str, float]]:
    out = []
    for p, r in zip(predictions, references):
        if output_type == "json":
            scores = score_json(p, r, schema)
        elif output_type == "label":
            scores = score_label(p, r)
        else:
            scores = score_text(p, r)
        out.append({**scores, **common_scores(p, r)})
    return out


def macro_f1(predictions: list[str], references: list[str]) -> float:
    """Macro-averaged F1 over the reference labels (scikit-learn); unknown predictions count as wrong."""
    from sklearn.metrics import f1_score

    refs = [normalize_label(r) for r in references]
    preds = [normalize_label(p) for p in predictions]
    return float(f1_score(refs, preds, labels=sorted(set(refs)), average="macro", zero_division=0))
