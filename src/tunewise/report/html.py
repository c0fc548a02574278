"""report.html: the verdict, metrics per arm with intervals, loss curves, test items side by side."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from tunewise.report.plots import loss_plot, metric_plot
from tunewise.runs import RunDir, atomic_write_text, read_json, read_jsonl


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
