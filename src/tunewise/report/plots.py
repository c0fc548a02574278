"""Plots for the HTML reports, as base64 PNG strings (matplotlib, no display needed)."""

from __future__ import annotations

import base64
import io


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def loss_plot(log_rows: list[dict]) -> str | None:
    plt = _pyplot()

    train = [(r["step"], r["train_loss"]) for r in log_rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in log_rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=2, label="validation loss")
        best = min(val, key=lambda v: v[1])
        ax.annotate("best", best, textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


def metric_plot(arms: dict[str, dict], metric: str) -> str:
    plt = _pyplot()

    names = list(arms)
    means = [arms[a]["metrics"][metric]["mean"] for a in names]
    lows = [m - arms[a]["metrics"][metric]["low"] for a, m in zip(names, means)]
    highs = [arms[a]["metrics"][metric]["high"] - m for a, m in zip(names, means)]
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.55 * len(names)))
    colors = ["#4C72B0" if a != "finetuned" else "#DD8452" for a in names]
    ax.barh(names, means, xerr=[lows, highs], color=colors, capsize=4)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{metric} (95% bootstrap interval)")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    return png(fig)


def histogram_plot(values: list[int], *, xlabel: str, limit: int | None = None) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(values, bins=min(60, max(10, len(set(values)))), color="#4C72B0")
    if limit:
        ax.axvline(limit, color="#C44E52", ls="--", label=f"max_seq_len {limit}")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    ax.grid(alpha=0.3)
    return png(fig)


def bar_plot(counts: dict[str, int], *, xlabel: str) -> str:
    plt = _pyplot()
    names = list(counts)
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.3 * len(names)))
    ax.barh(names, [counts[n] for n in names], color="#4C72B0")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    return png(fig)
