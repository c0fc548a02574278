"""report.html: the verdict, metrics per arm with intervals, loss curves, test items side by side."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from tunewise.runs import RunDir, atomic_write_text, read_json, read_jsonl


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def loss_plot(log_rows: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return _png(fig)


def metric_plot(arms: dict[str, dict], metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return _png(fig)


def write_report(run: RunDir, arms: list[str], samples: int) -> Path:
    verdict = read_json(run.verdict)
    metrics = {arm: read_json(run.metrics(arm)) for arm in arms}
    predictions = {arm: read_jsonl(run.predictions(arm)) for arm in arms}
    log_rows = read_jsonl(run.train_log) if run.train_log.exists() else []
    first = predictions[arms[0]]
    items = [
        {"source": row["source"], "prompt": row["prompt"], "reference": row["reference"],
         "outputs": {arm: predictions[arm][i] for arm in arms}}
        for i, row in enumerate(first[:samples])
    ]
    metric_names = list(next(iter(metrics.values()))["metrics"])
    env = Environment(loader=PackageLoader("tunewise.report", "templates"), autoescape=select_autoescape())
    html = env.get_template("report.html").render(
        run=run.root.name,
        verdict=verdict,
        arms=arms,
        metrics=metrics,
        metric_names=metric_names,
        primary=verdict["primary_metric"],
        primary_plot=metric_plot(metrics, verdict["primary_metric"]),
        loss_png=loss_plot(log_rows),
        manifest=read_json(run.manifest),
        train=read_json(run.train_summary) if run.train_summary.exists() else None,
        decision=read_json(run.decision) if run.decision.exists() else None,
        items=items,
    )
    atomic_write_text(run.report, html)
    return run.report
