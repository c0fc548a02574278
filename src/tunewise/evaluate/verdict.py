"""The verdict: fine-tune vs the best baseline arm on the same items, paired test, margin, flags."""

from __future__ import annotations

import numpy as np

from tunewise.artifacts import Decision, Verdict
from tunewise.evaluate.arms import FINETUNED
from tunewise.evaluate.metrics import BINARY
from tunewise.evaluate.stats import mcnemar_exact, paired_bootstrap


def _pretty(arm: str) -> str:
    names = {"zero_shot": "zero-shot prompting", "few_shot": "few-shot prompting",
             "retrieved_few_shot": "retrieved few-shot prompting", FINETUNED: "the fine-tune"}
    return names.get(arm, arm)


def overfitting_flag(log_rows: list[dict]) -> str | None:
    """Validation loss rose above its minimum while training loss kept falling."""
    vals = [(r["step"], r["val_loss"]) for r in log_rows if "val_loss" in r]
    trains = [r["train_loss"] for r in log_rows if "train_loss" in r]
    if len(vals) < 3 or len(trains) < 4:
        return None
    best_step, best = min(vals, key=lambda v: v[1])
    last_step, last = vals[-1]
    quarter = max(1, len(trains) // 4)
    train_fell = np.mean(trains[-quarter:]) < np.mean(trains[:quarter])
    if last > best * 1.05 and last_step > best_step and train_fell:
        return (
            f"overfitting: validation loss rose from {best:.3f} (step {best_step}) to {last:.3f} "
            f"(step {last_step}) while training loss fell; the best checkpoint (step {best_step}) is used"
        )
    return None


def length_drift_flag(outputs: list[str], references: list[str], base_outputs: list[str], max_ratio: float) -> str | None:
    """The fine-tune's outputs are much longer or shorter than the references (the base model's
    ratio is given for comparison: drift the base already had is not the fine-tune's doing)."""
    def mean_len(texts: list[str]) -> float:
        return max(float(np.mean([len(t) for t in texts])), 1e-9) if texts else 1e-9

    ratio = mean_len(outputs) / mean_len(references)
    if ratio > max_ratio or ratio < 1 / max_ratio:
        base = f"; the base model's zero-shot outputs are {mean_len(base_outputs) / mean_len(references):.2f}x" if base_outputs else ""
        return f"length drift: fine-tune outputs are {ratio:.2f}x the references' length (limit {max_ratio:g}x){base}"
    return None


def refusal_flag(finetuned: list[float], base: list[float], max_increase: float) -> str | None:
    """The fine-tune refuses more often than the base model (zero-shot) on the same items."""
    ft, b = float(np.mean(finetuned)), float(np.mean(base))
    if ft - b > max_increase:
        _, _, p = mcnemar_exact(finetuned, base)
        return (f"refusals: the fine-tune refuses {ft:.1%} of test items, the base model {b:.1%} "
                f"(+{ft - b:.1%}, limit +{max_increase:.0%}; McNemar p={p:.3g})")
    return None


def forgetting_flag(base: list[float], finetuned: list[float], max_drop: float) -> str | None:
    """Accuracy on the general regression set fell after fine-tuning."""
    b, ft = float(np.mean(base)), float(np.mean(finetuned))
    if b - ft > max_drop:
        _, only_base, p = mcnemar_exact(finetuned, base)
        return (f"forgetting: general regression set accuracy fell from {b:.3f} (base) to {ft:.3f} "
                f"(limit -{max_drop:g}; {only_base} items lost; McNemar p={p:.3g})")
    return None


def compare(ft: list[float], other: list[float], *, binary: bool, alpha: float, samples: int, seed: int) -> dict:
    """Paired difference fine-tune minus arm on the same items, with its test."""
    diff, p_boot = paired_bootstrap(ft, other, samples=samples, alpha=alpha, seed=seed)
    test = {"name": "paired bootstrap", "p_value": p_boot}
    if binary:
        only_ft, only_other, p = mcnemar_exact(ft, other)
        test = {"name": "McNemar exact", "p_value": p, "finetune_only_right": only_ft, "baseline_only_right": only_other}
    return {"difference": diff.to_dict(), "test": test}


def decide_verdict(
    scores: dict[str, list[dict[str, float]]],
    *,
    primary: str,
    margin: float,
    alpha: float,
    samples: int,
    seed: int,
    red_flags: list[dict],
    baselines: list[str] | None = None,
) -> Verdict:
    """Compare the fine-tune with the best baseline on `primary`; SHIP needs margin + significance
    and no blocking red flag. `red_flags` are {name, message, blocking}; `baselines` are the arms
    the fine-tune must beat (default: every other arm)."""
    means = {arm: float(np.mean([s[primary] for s in rows])) for arm, rows in scores.items()}
    counted = baselines if baselines is not None else [a for a in scores if a != FINETUNED]
    best = max(counted, key=lambda a: means[a])
    ft = [s[primary] for s in scores[FINETUNED]]
    comparisons = {
        arm: compare(ft, [s[primary] for s in rows], binary=primary in BINARY, alpha=alpha, samples=samples, seed=seed)
        for arm, rows in scores.items() if arm != FINETUNED
    }
    diff, test = comparisons[best]["difference"], comparisons[best]["test"]
    significant = test["p_value"] < alpha and diff["low"] > 0
    enough = diff["mean"] >= margin
    blocking = [f["name"] for f in red_flags if f["blocking"]]
    ship = significant and enough and not blocking

    gain = (f"{diff['mean']:+.3f} (95% CI {diff['low']:+.3f} to {diff['high']:+.3f}, "
            f"{test['name']} p={test['p_value']:.3g})")
    head = f"{_pretty(best)} reaches {means[best]:.3f} on {primary}; the fine-tune reaches {means[FINETUNED]:.3f}, {gain}"
    if diff["mean"] <= 0:
        reason = f"{head}: the fine-tune does not beat {_pretty(best)}; use {_pretty(best)} instead."
    elif not significant:
        reason = f"{head}: not significant at alpha={alpha}."
    elif not enough:
        reason = f"{head}: significant, but below the required margin of {margin}."
    elif blocking:
        reason = f"{head}: significant and above the margin, but blocked by red flags: {', '.join(blocking)}."
    else:
        reason = f"{head}: significant and at least the margin of {margin}."
    return Verdict(decision=Decision.SHIP if ship else Decision.DO_NOT_SHIP, reason=reason, primary_metric=primary,
                   best_baseline=best, baselines=counted, means=means, difference=diff, test=test,
                   comparisons=comparisons, margin=margin, alpha=alpha, n_items=len(ft), red_flags=red_flags)
