"""report.html: the verdict, metrics per arm with intervals, confusion matrices, loss curves,
red flags, the judge, and every test item with each arm's output side by side (filterable)."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from tunewise.artifacts import (
    ArmMetrics,
    DataManifest,
    DecideRecord,
    JudgeSummary,
    RegressionMetrics,
    TrainSummary,
    Verdict,
)
from tunewise.data.outputs import normalize_label
from tunewise.report.plots import (
    confusion_plot,
    loss_plot,
    metric_plot,
    metrics_grid_plot,
    regression_plot,
)
from tunewise.runs import RunDir, atomic_write_text, read_jsonl

FINETUNED = "finetuned"
JUDGE_SAMPLES = 8  # judge reasons shown per arm


def _items(predictions: dict[str, list[dict]], arms: list[str], primary: str, best: str, limit: int) -> list[dict]:
    """Test items with every arm's output and the facts the table filters on."""
    items = []
    for i, row in enumerate(predictions[arms[0]][:limit]):
        outputs = {arm: predictions[arm][i] for arm in arms}
        right = {arm: o["scores"].get(primary, 0.0) >= 1 for arm, o in outputs.items()}
        texts = {normalize_label(o["output"]) for o in outputs.values()}
        items.append({
            "index": i + 1, "source": row["source"], "prompt": row["prompt"], "reference": row["reference"],
            "outputs": outputs, "right": right,
            "disagree_score": len(set(right.values())) > 1,
            "disagree_output": len(texts) > 1,
            "ft_only": right.get(FINETUNED, False) and not right.get(best, False),
            "best_only": right.get(best, False) and not right.get(FINETUNED, False),
        })
    return items


def _confusions(metrics: dict[str, ArmMetrics], show: list[str]) -> list[tuple[str, str]]:
    """(title, png) per confusion-matrix target (the label, or each enum JSON field), arms side by side."""
    plots = []
    targets = list(dict.fromkeys(t for arm in show for t in metrics[arm].confusion))
    for target in targets:
        matrices = {arm: metrics[arm].confusion[target] for arm in show if target in metrics[arm].confusion}
        title = "labels" if target == "label" else f"field '{target}'"
        plots.append((title, confusion_plot(matrices, f"confusion matrix: {title} (rows: reference)")))
    return plots


def _judge(run: RunDir, arms: list[str]) -> dict | None:
    if not (run.judge_summary).exists():
        return None
    summary = JudgeSummary.read(run.judge_summary)
    point = read_jsonl(run.judge_pointwise)
    samples = {arm: [r for r in point if r["arm"] == arm][:JUDGE_SAMPLES] for arm in arms}
    pairs = read_jsonl(run.judge_pairwise)[:JUDGE_SAMPLES] if (run.judge_pairwise).exists() else []
    return {"summary": summary, "samples": samples, "pairs": pairs}


def write_report(run: RunDir, arms: list[str], samples: int) -> Path:
    verdict = Verdict.read(run.verdict)
    primary, best = verdict.primary_metric, verdict.best_baseline
    metrics = {arm: ArmMetrics.read(run.metrics(arm)) for arm in arms}
    predictions = {arm: read_jsonl(run.predictions(arm)) for arm in arms}
    log_rows = read_jsonl(run.train_log) if run.train_log.exists() else []
    metric_names = list(next(iter(metrics.values())).metrics)
    headline = [m for m in metric_names if not m.startswith("field:")]
    regression = None
    if verdict.regression is not None:
        base, ft = (RegressionMetrics.read(run.regression_metrics(w)) for w in ("base", "finetuned"))
        regression = {"base": base, "finetuned": ft, "plot": regression_plot(base.by_category, ft.by_category)}
    env = Environment(loader=PackageLoader("tunewise.report", "templates"), autoescape=select_autoescape())
    html = env.get_template("report.html").render(
        run=run.root.name,
        verdict=verdict,
        arms=arms,
        best=best,
        metrics=metrics,
        metric_names=metric_names,
        primary=primary,
        primary_plot=metric_plot(metrics, primary),
        grid_plot=metrics_grid_plot(metrics, [m for m in headline if m != primary]),
        confusion_plots=_confusions(metrics, [a for a in (best, FINETUNED) if a in metrics]),
        loss_png=loss_plot(log_rows),
        manifest=DataManifest.read(run.manifest),
        train=TrainSummary.read(run.train_summary) if run.train_summary.exists() else None,
        decision=DecideRecord.read(run.decision) if run.decision.exists() else None,
        regression=regression,
        judge=_judge(run, arms),
        items=_items(predictions, arms, primary, best, samples),
        n_test=len(predictions[arms[0]]),
    )
    atomic_write_text(run.report, html)
    return run.report
