"""Per-item scores by output type: labels, JSON objects, free text.

Each scorer returns, per item, a dict of metric -> value in [0, 1]; an arm's metric is the mean.
The first metric of each type is the primary one the verdict uses; `BINARY` ones get McNemar.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

from tunewise.data.outputs import normalize_label, parse_json

PRIMARY = {"label": "accuracy", "json": "json_exact", "text": "token_f1"}
BINARY = {"accuracy", "json_valid", "json_exact"}


def score_label(prediction: str, reference: str) -> dict[str, float]:
    return {"accuracy": float(normalize_label(prediction) == normalize_label(reference))}


def score_json(prediction: str, reference: str) -> dict[str, float]:
    ref = parse_json(reference)
    pred = parse_json(prediction)
    fields = ref if isinstance(ref, dict) else {}
    scores = {
        "json_exact": float(pred == ref),
        "json_valid": float(pred is not None),
    }
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
    return {"token_f1": f1, "exact_match": float(" ".join(pred) == " ".join(ref))}


SCORERS: dict[str, Callable[[str, str], dict[str, float]]] = {
    "label": score_label,
    "json": score_json,
    "text": score_text,
}


def score_items(output_type: str, predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    scorer = SCORERS[output_type]
    return [scorer(p, r) for p, r in zip(predictions, references)]
