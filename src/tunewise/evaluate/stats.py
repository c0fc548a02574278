"""Bootstrap intervals, the paired bootstrap of a difference, and McNemar's exact test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap_ci(scores: list[float], *, samples: int, alpha: float, seed: int) -> Interval:
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(x.mean()), float(low), float(high))


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], float], n: int, *, samples: int, alpha: float, seed: int
) -> Interval:
    """Percentile bootstrap of any statistic of the items, given as a function of item indices."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(samples)]
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return Interval(float(statistic(np.arange(n))), float(low), float(high))


def paired_bootstrap(a: list[float], b: list[float], *, samples: int, alpha: float, seed: int) -> tuple[Interval, float]:
    """Interval of mean(a - b) resampling items jointly, and a two-sided bootstrap p-value."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # share of resampled means on the other side of zero, doubled (percentile-method p-value)
    p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    return Interval(float(diff.mean()), float(low), float(high)), float(min(1.0, p))


def mcnemar_exact(a: list[float], b: list[float]) -> tuple[int, int, float]:
    """Exact McNemar test on paired 0/1 outcomes: (a right b wrong, a wrong b right, p-value)."""
    x, y = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
