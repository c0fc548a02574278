"""Statistics the data report shows: token lengths, label balance, variety, output format."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np

from tunewise.data.outputs import label_of, parse_json
from tunewise.data.records import Example

IMBALANCE_RATIO = 5.0  # the commonest label this many times the rarest: warn


def token_length_stats(lengths: list[int], max_seq_len: int | None) -> dict:
    x = np.asarray(lengths)
    return {
        "p50": int(np.percentile(x, 50)), "p95": int(np.percentile(x, 95)), "max": int(x.max()),
        "mean": round(float(x.mean()), 1), "max_seq_len": max_seq_len,
        "over_max_seq_len": int((x > max_seq_len).sum()) if max_seq_len else 0,
    }


def label_balance(examples: list[Example], output_type: str) -> dict | None:
    """Counts per label, and a warning when the commonest is IMBALANCE_RATIO x the rarest."""
    labels = [label_of(e.target, output_type) for e in examples]
    if output_type == "text" or None in labels:
        return None
    counts = Counter(labels)
    if len(counts) > 50:  # not a label set: too many distinct outputs to balance
        return None
    common, rare = counts.most_common()[0], counts.most_common()[-1]
    warning = None
    if common[1] >= IMBALANCE_RATIO * rare[1]:
        warning = (f"label imbalance: '{common[0]}' has {common[1]} examples, '{rare[0]}' only {rare[1]}; "
                   "collect more of the rare labels or expect the model to favour the common one")
    return {"counts": dict(counts.most_common()), "warning": warning}


def instruction_variety(examples: list[Example]) -> dict:
    """How different the prompts are: distinct prompts, distinct word bigrams, commonest openings."""
    prompts = [e.prompt_text for e in examples]
    words = [re.findall(r"\w+", p.lower()) for p in prompts]
    bigrams = [tuple(w[i : i + 2]) for w in words for i in range(len(w) - 1)]
    openings = Counter(" ".join(w[:2]) for w in words if w)
    return {
        "distinct_prompts": len(set(prompts)),
        "distinct_prompt_share": round(len(set(prompts)) / max(len(prompts), 1), 4),
        "distinct_bigram_share": round(len(set(bigrams)) / max(len(bigrams), 1), 4),
        "mean_prompt_words": round(float(np.mean([len(w) for w in words])), 1) if words else 0.0,
        "top_openings": openings.most_common(10),
    }


def output_format(examples: list[Example]) -> dict:
    """Share of outputs that parse as JSON, and share matching the majority schema (key set)."""
    parsed = [parse_json(e.target) for e in examples]
    objects = [p for p in parsed if isinstance(p, dict)]
    schemas = Counter(json.dumps(sorted(p)) for p in objects)
    majority, count = schemas.most_common(1)[0] if schemas else (None, 0)
    n = max(len(examples), 1)
    return {
        "json_share": round(sum(p is not None for p in parsed) / n, 4),
        "majority_schema": json.loads(majority) if majority else None,
        "majority_schema_share": round(count / n, 4),
        "mean_output_chars": round(float(np.mean([len(e.target) for e in examples])), 1) if examples else 0.0,
    }
