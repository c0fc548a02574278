"""The verdict: fine-tune vs the best baseline arm on the same items, paired test, margin, flags."""

from __future__ import annotations

import numpy as np

from tunewise.evaluate.arms import FINETUNED
from tunewise.evaluate.metrics import BINARY
from tunewise.evaluate.stats import mcnemar_exact, paired_bootstrap

SHIP, NO_SHIP = "SHIP", "DO NOT SHIP"


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


def length_drift_flag(outputs: list[str], references: list[str]) -> str | None:
    """The fine-tune's outputs are much longer or shorter than the references."""
    ratio = np.mean([len(o) for o in outputs]) / max(np.mean([len(r) for r in references]), 1e-9)
    if ratio > 2.0 or ratio < 0.5:
        return f"length drift: fine-tune outputs are {ratio:.2f}x the references' length"
    return None


def decide_verdict(
    scores: dict[str, list[dict[str, float]]],
    *,
    primary: str,
    margin: float,
    alpha: float,
    samples: int,
    seed: int,
    red_flags: list[str],
) -> dict:
    """Compare the fine-tune with the best baseline on `primary`; SHIP needs margin + significance."""
    means = {arm: float(np.mean([s[primary] for s in rows])) for arm, rows in scores.items()}
    baselines = {arm: m for arm, m in means.items() if arm != FINETUNED}
    best = max(baselines, key=baselines.get)
    ft = [s[primary] for s in scores[FINETUNED]]
    ref = [s[primary] for s in scores[best]]
    diff, p_boot = paired_bootstrap(ft, ref, samples=samples, alpha=alpha, seed=seed)
    test = {"name": "paired bootstrap", "p_value": p_boot}
    if primary in BINARY:
        only_ft, only_best, p = mcnemar_exact(ft, ref)
        test = {"name": "McNemar exact", "p_value": p, "finetune_only_right": only_ft, "baseline_only_right": only_best}
    significant = test["p_value"] < alpha and diff.low > 0
    enough = diff.mean >= margin
    ship = significant and enough

    gain = f"{diff.mean:+.3f} (95% CI {diff.low:+.3f} to {diff.high:+.3f}, {test['name']} p={test['p_value']:.3g})"
    head = f"{_pretty(best)} reaches {means[best]:.3f} on {primary}; the fine-tune reaches {means[FINETUNED]:.3f}, {gain}"
    if ship:
        reason = f"{head}: significant and at least the margin of {margin}."
    elif diff.mean <= 0:
        reason = f"{head}: the fine-tune does not beat {_pretty(best)}; use {_pretty(best)} instead."
    elif not significant:
        reason = f"{head}: not significant at alpha={alpha}."
    else:
        reason = f"{head}: significant, but below the required margin of {margin}."
    return {
        "decision": SHIP if ship else NO_SHIP,
        "reason": reason,
        "primary_metric": primary,
        "best_baseline": best,
        "means": means,
        "difference": diff.to_dict(),
        "test": test,
        "margin": margin,
        "alpha": alpha,
        "n_items": len(ft),
        "red_flags": red_flags,
    }
