"""Seeded train/val/test split, done before anything trains."""

from __future__ import annotations

import random

from tunewise.data.records import Example
from tunewise.errors import TunewiseError


def split_examples(
    examples: list[Example], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Example]]:
    """Shuffle with `seed` and cut into train/val/test; val and test get at least one each."""
    n = len(examples)
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise TunewiseError(
            f"only {n} usable examples: too few to split into train/val/test",
            field="data.path",
            fix="add examples (a fine-tune needs hundreds; fewer than 200 is a warning)",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    return {
        "test": shuffled[:n_test],
        "val": shuffled[n_test : n_test + n_val],
        "train": shuffled[n_test + n_val :],
    }
