"""Train/val/test splits, made after cleaning and before anything trains.

Strategies: `random` (seeded shuffle), `stratified` (each label keeps its share in every
split), `group` (all rows sharing a key stay in one split), `time` (the newest rows are the
test set, the next newest validation: no peeking into the future).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Callable

from tunewise.data.records import Example
from tunewise.errors import TunewiseError

Splits = dict[str, list[Example]]


def _sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise TunewiseError(
            f"only {n} usable examples: too few to split into train/val/test",
            field="data.path",
            fix="add examples (a fine-tune needs hundreds; fewer than 200 is a warning)",
        )
    return n_val, n_test


def _cut(ordered: list[Example], n_val: int, n_test: int) -> Splits:
    return {
        "test": ordered[:n_test],
        "val": ordered[n_test : n_test + n_val],
        "train": ordered[n_test + n_val :],
    }


def random_split(examples: list[Example], val_fraction: float, test_fraction: float, seed: int) -> Splits:
    order = list(examples)
    random.Random(seed).shuffle(order)
    return _cut(order, *_sizes(len(order), val_fraction, test_fraction))


def stratified_split(
    examples: list[Example], val_fraction: float, test_fraction: float, seed: int, label: Callable[[Example], str]
) -> Splits:
    """Largest-remainder allocation per label, so every split mirrors the label shares."""
    n_val, n_test = _sizes(len(examples), val_fraction, test_fraction)
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[label(example)].append(example)
    out: Splits = {"test": [], "val": [], "train": []}
    for name, total in (("test", n_test), ("val", n_val)):
        pool = sum(len(v) for v in by_label.values())
        quotas = {k: total * len(v) / pool for k, v in by_label.items()}
        take = {k: int(q) for k, q in quotas.items()}
        for k in sorted(quotas, key=lambda k: quotas[k] - take[k], reverse=True)[: total - sum(take.values())]:
            take[k] += 1
        for key in sorted(by_label):
            members = by_label[key]
            rng.shuffle(members)
            out[name] += members[: take[key]]
            by_label[key] = members[take[key] :]
    out["train"] = [e for key in sorted(by_label) for e in by_label[key]]
    for name in out:
        rng.shuffle(out[name])
    return out


def group_split(examples: list[Example], val_fraction: float, test_fraction: float, seed: int, key: str) -> Splits:
    """Whole groups go to test, then val, until each reaches its share; the rest train."""
    n_val, n_test = _sizes(len(examples), val_fraction, test_fraction)
    groups: dict[Any, list[Example]] = defaultdict(list)
    for example in examples:
        groups[str(example.meta[key])].append(example)
    if len(groups) < 3:
        raise TunewiseError(f"only {len(groups)} distinct values of '{key}': cannot make three splits",
                            field="data.group_key", fix="group by a finer key, or use data.split: random")
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    out: Splits = {"test": [], "val": [], "train": []}
    for name in names:
        target = "test" if len(out["test"]) < n_test else "val" if len(out["val"]) < n_val else "train"
        out[target] += groups[name]
    if not out["train"] or not out["val"]:
        raise TunewiseError(f"groups of '{key}' are too large to leave rows for training and validation",
                            field="data.group_key")
    return out


def _as_numbers(values: list[Any]) -> list[Any]:
    """The values as numbers when every one is a number or the text of one (a CSV column), else as they are."""
    try:
        return [v if isinstance(v, (int, float)) and not isinstance(v, bool) else float(v) for v in values]
    except (TypeError, ValueError):
        return values


def time_split(examples: list[Example], val_fraction: float, test_fraction: float, key: str) -> Splits:
    """Newest rows are the test set, the next newest validation (sorted by `key`, ties by source).
    Keys compare as numbers when all of them are numbers or numeric text ("9" before "10")."""
    n_val, n_test = _sizes(len(examples), val_fraction, test_fraction)
    keys = _as_numbers([e.meta[key] for e in examples])
    try:
        order = sorted(range(len(examples)), key=lambda i: (keys[i], examples[i].source), reverse=True)
        newest_first = [examples[i] for i in order]
    except TypeError:
        raise TunewiseError(f"values of '{key}' are not comparable (mixed types)", field="data.time_key",
                            fix="use ISO dates (2024-01-31) or numbers throughout")
    return _cut(newest_first, n_val, n_test)
