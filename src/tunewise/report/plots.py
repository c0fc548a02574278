"""Plots for the HTML reports, as base64 PNG strings (matplotlib, no display needed)."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunewise.artifacts import ArmMetrics


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


def metric_plot(arms: dict[str, "ArmMetrics"], metric: str) -> str:
    plt = _pyplot()

    names = list(arms)
    means = [arms[a].interval(metric)["mean"] for a in names]
    lows = [m - arms[a].interval(metric)["low"] for a, m in zip(names, means)]
    highs = [arms[a].interval(metric)["high"] - m for a, m in zip(names, means)]
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


def confusion_plot(matrices: dict[str, dict], title: str) -> str:
    """Side-by-side confusion matrices (rows: reference, columns: prediction), one per arm."""
    import numpy as np

    plt = _pyplot()
    arms = list(matrices)
    size = max(len(m["columns"]) for m in matrices.values())
    cell = 0.42 if size > 8 else 0.6
    fig, axes = plt.subplots(1, len(arms), figsize=(max(4.5, 1.8 + cell * size) * len(arms), 1.6 + cell * size),
                             squeeze=False)
    for ax, arm in zip(axes[0], arms):
        m = matrices[arm]
        counts = np.asarray(m["matrix"], dtype=float)  # (labels, columns)
        rows = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, int(n), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "#222")
        ax.set_xticks(range(len(m["columns"])), m["columns"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(m["labels"])), m["labels"], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        accuracy = np.trace(counts[:, : len(m["labels"])]) / max(counts.sum(), 1)
        ax.set_title(f"{arm} (accuracy {accuracy:.2f})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png(fig)


def regression_plot(base: dict[str, float], finetuned: dict[str, float]) -> str:
    """General regression set accuracy per category, base vs fine-tune."""
    import numpy as np

    plt = _pyplot()
    names = list(base)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.45 * len(names)))
    ax.barh(y - 0.2, [base[n] for n in names], height=0.4, color="#4C72B0", label="base")
    ax.barh(y + 0.2, [finetuned.get(n, 0.0) for n in names], height=0.4, color="#DD8452", label="fine-tune")
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of regression items passed")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return png(fig)


def metrics_grid_plot(arms: dict[str, dict], metrics: list[str]) -> str:
    """One small bar chart with 95% interval whiskers per metric, every arm in each."""
    plt = _pyplot()
    names = list(arms)
    columns = 3
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(11, rows * (0.5 + 0.32 * len(names))), squeeze=False)
    colors = ["#DD8452" if a == "finetuned" else "#4C72B0" for a in names]
    for ax, metric in zip(axes.flat, metrics):
        values = [arms[a].metrics.get(metric, {"mean": 0.0, "low": 0.0, "high": 0.0}) for a in names]
        means = [v["mean"] for v in values]
        err = [[m - v["low"] for m, v in zip(means, values)], [v["high"] - m for m, v in zip(means, values)]]
        ax.barh(names, means, xerr=err, color=colors, capsize=3)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        if metric != "length_ratio":
            ax.set_xlim(0, 1)
        else:
            ax.axvline(1.0, color="#555", lw=0.8, ls="--")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def sweep_curves_plot(curves: dict[str, list[tuple[float, float]]], *, xlabel: str, best: str | None) -> str | None:
    """Validation loss of every sweep trial against training progress; the best trial drawn bold."""
    if not any(curves.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for label, points in curves.items():
        if points:
            bold = label == best
            ax.plot(*zip(*points), "o-", ms=3 if not bold else 5, lw=2.5 if bold else 1, alpha=1 if bold else 0.75,
                    label=f"{label} (best)" if bold else label, zorder=3 if bold else 2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return png(fig)


def sweep_best_plot(losses: dict[str, float | None], *, best: str | None) -> str:
    """Each sweep trial's best validation loss as a dot (lower is better); trials without one say why."""
    plt = _pyplot()
    names = list(losses)
    found = [v for v in losses.values() if v is not None]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.35 * len(names)))
    for y, name in enumerate(names):
        value = losses[name]
        if value is None:
            ax.text(0.01, y, "no result (failed or not trained)", va="center", fontsize=8, color="#C44E52",
                    transform=ax.get_yaxis_transform())
        else:
            ax.plot([value], [y], "o", ms=8 if name == best else 6, color="#DD8452" if name == best else "#4C72B0")
    if found:
        low, high = min(found), max(found)
        pad = (high - low) * 0.1 or 0.05 * abs(high) or 0.1
        ax.set_xlim(low - pad, high + pad)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("best validation loss (lower is better)")
    ax.grid(axis="x", alpha=0.3)
    return png(fig)
