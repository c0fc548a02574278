"""`tunewise run`: the stages in order, each reading only what earlier stages wrote.

A stage whose output is already in the run folder is skipped, so `tunewise run --resume DIR`
continues an interrupted run. Bad input is found before the run folder is created.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.text import Text

from tunewise.artifacts import (
    ArmMetrics,
    DataManifest,
    DecideRecord,
    JudgeSummary,
    Provenance,
    RegressionMetrics,
    TrainSummary,
    Verdict,
)
from tunewise.config import Config, ModelConfig, dump_config, load_config
from tunewise.data import DataSettings, prepare, preview_rows, write_prepared
from tunewise.decide import recommend
from tunewise.decide.framework import FEW_EXAMPLES
from tunewise.errors import TunewiseError
from tunewise.evaluate.arms import BASELINE_ARMS, FINETUNED
from tunewise.evaluate.runner import (
    arm_scores,
    endpoint_arms,
    endpoint_of,
    evaluate_arms,
    evaluate_regression,
    load_base_for_eval,
    load_finetuned_for_eval,
    test_items,
)
from tunewise.evaluate.verdict import (
    decide_verdict,
    forgetting_flag,
    length_drift_flag,
    overfitting_flag,
    refusal_flag,
)
from tunewise.models import base_chat
from tunewise.report.data_report import write_data_report
from tunewise.report.html import write_report
from tunewise.report.terminal import print_chat, print_data_summary
from tunewise.runs import (
    RunDir,
    atomic_write_jsonl,
    atomic_write_text,
    new_run_dir,
    open_run_dir,
    read_json,
    read_jsonl,
)
from tunewise.settings import (
    data_settings,
    eval_settings,
    track_settings,
    train_settings,
)
from tunewise.train.distributed import init_distributed
from tunewise.train.loop import check_method_fits_data, train_model


def start_run(config_path: str | Path, overrides: list[str], runs_root: Path, console: Console) -> tuple[RunDir, Config]:
    """Validate config, model and data, then create the run folder with config and data splits."""
    config = load_config(config_path, overrides)
    data = prepare_data(config, config_path, console)
    run = new_run_dir(runs_root, config.task.name)
    atomic_write_text(run.config, dump_config(config))
    run.set_status("running")
    write_data(run, config, data, console)
    return run, config


def prepare_data(config: Config, config_path: str | Path, console: Console,
                 methods_of: list[Config] = ()) -> tuple:
    """Read, validate, clean and split the data in memory (nothing written); the method (and
    each of `methods_of`'s) must fit it. Returns (prepared, settings, chat format).

    The model's chat format is resolved first: a template tunewise cannot mask exactly is
    refused here, before any stage runs."""
    chat = base_chat(config.model)
    print_chat(console, config.model.base, chat)
    settings = data_settings(config)
    prepared = prepare([Path(p) for p in config.data.paths], settings, chat=chat,
                       log=lambda m: console.print(Text.assemble(("data ", "bold"), m)))
    examples = [e for split in prepared.splits.values() for e in split]
    for each in (config, *methods_of):
        check_method_fits_data(each.method, examples, config_path)
    return prepared, settings, chat


def write_data(run: RunDir, config: Config, data: tuple, console: Console) -> DataManifest:
    """The prepared splits, manifest and data report into the run folder; prints the summary."""
    prepared, settings, chat = data
    manifest = write_data_folder(prepared, run.data, settings, chat)
    print_data_summary(console, manifest, prepared.problems)
    return manifest


def write_data_folder(prepared, out_dir: Path, settings: DataSettings, chat) -> DataManifest:
    """Splits, rejected.jsonl, manifest.json and the data report (report.html) in `out_dir`, atomically;
    the report previews the first rows under `chat`, the model's chat format (None: no preview)."""
    preview = preview_rows(chat, prepared.splits["train"], settings.system_prompt) if chat is not None else []
    return write_prepared(prepared, out_dir, settings, also=lambda folder, manifest: write_data_report(
        prepared, manifest, folder / "report.html", preview=preview))


def data_in_memory(files: list[Path], config_path: Path | None, settings: DataSettings, model: str,
                   console: Console) -> tuple:
    """`tunewise data check / prepare`: the data stage in memory, with the settings of a config
    file when one is given (files given too replace its data.path), else `settings` and `model`.
    Returns (prepared, settings, chat format)."""
    if config_path is not None:
        config = load_config(config_path)
        paths = list(files) if files else [Path(p) for p in config.data.paths]
        settings, model_config = data_settings(config), config.model
    elif not files:
        raise TunewiseError("no data files given", fix="pass one or more data files (or -c tunewise.yaml)")
    else:
        paths, model_config = list(files), ModelConfig(base=model)
    chat = base_chat(model_config)
    prepared = prepare(paths, settings, chat=chat, log=lambda m: console.print(m, markup=False))
    return prepared, settings, chat


def train_run(run_dir: str | Path, console: Console) -> TrainSummary | None:
    """`tunewise train --resume RUN`: train the run (or continue its newest checkpoint). Under
    torchrun every process trains and the main one writes; the others, and a run already
    trained, return None."""
    run = open_run_dir(run_dir)
    if STAGES["train"][1](run, None):
        console.print(f"{run.root} is already trained; next: tunewise run --resume {run.root}")
        return None
    dist = init_distributed()
    if dist.active:
        config = load_config(run.config)
        summary = train_model(run, train_settings(config), console, track_settings(config))
        return summary if dist.main else None
    resume_pipeline(run.root, console, only="train")
    return TrainSummary.read(run.train_summary)


def stage_decide(run: RunDir, config: Config, console: Console) -> None:
    counts = DataManifest.read(run.manifest).counts
    warnings = []
    if counts["train"] < FEW_EXAMPLES:
        warnings.append(
            f"only {counts['train']} training examples (fewer than {FEW_EXAMPLES}): expect a weak fine-tune; "
            "collect more or rely on few-shot prompting"
        )
    decision = DecideRecord(train_examples=counts["train"], warnings=warnings)
    if config.decide is not None:
        made = recommend(config.decide)
        decision = DecideRecord.from_json({**made.to_dict(), "train_examples": counts["train"],
                                           "warnings": [*made.warnings, *warnings]})
        console.print(f"[bold]decide[/] {made.headline()}")
    for warning in decision.warnings:
        console.print(Text.assemble(("warning ", "yellow"), warning))
    decision.write(run.decision)


def all_arms(config: Config) -> list[str]:
    return [*BASELINE_ARMS, *(e.name for e in config.eval.endpoints), FINETUNED]


def counted_baselines(config: Config) -> list[str]:
    """The arms the fine-tune must beat: built-in baselines and endpoints not marked `baseline: false`."""
    return [*BASELINE_ARMS, *(e.name for e in config.eval.endpoints if e.baseline)]


def stage_baseline(run: RunDir, config: Config, console: Console) -> None:
    """Every baseline arm on the test items (outputs already cached are not generated again),
    plus the base model on the general regression set for the forgetting check."""
    ev = eval_settings(config, run.config)
    console.print(f"[bold]baseline[/] {', '.join(all_arms(config)[:-1])} on {len(test_items(run, ev.max_test))} "
                  "test items")
    gen = load_base_for_eval(ev.model, ev.batch_size)
    evaluate_arms(run, ev, {arm: gen for arm in BASELINE_ARMS} | endpoint_arms(config.eval.endpoints), console)
    if config.eval.forgetting:
        evaluate_regression(run, ev, "base", gen, console)


def stage_train(run: RunDir, config: Config, console: Console) -> None:
    summary = train_model(run, train_settings(config), console, track_settings(config))
    console.print(
        f"  best val loss {summary.best_val_loss:.4f} at step {summary.best_step} "
        f"(start {summary.first_val_loss:.4f}); {summary.tokens_per_second:.0f} tokens/s, "
        f"peak memory {summary.peak_memory_mib:,.0f} MiB"
    )
    warning = overfitting_flag(read_jsonl(run.train_log))
    if warning:  # the verdict and the report show it too
        console.print(Text.assemble(("warning ", "yellow"), warning))


def stage_evaluate(run: RunDir, config: Config, console: Console) -> None:
    ev = eval_settings(config, run.config)
    gen = load_finetuned_for_eval(run, ev.model, ev.batch_size)
    console.print("[bold]evaluate[/] fine-tuned model on the same test items")
    evaluate_arms(run, ev, {FINETUNED: gen}, console)
    if config.eval.forgetting:
        evaluate_regression(run, ev, "finetuned", gen, console)


def best_baseline(run: RunDir, config: Config) -> str:
    """The counted baseline arm with the highest mean on the primary metric."""
    counted = counted_baselines(config)
    means = {arm: ArmMetrics.read(run.metrics(arm)).primary_mean for arm in counted}
    return max(counted, key=means.__getitem__)


def stage_judge(run: RunDir, config: Config, console: Console) -> None:
    """LLM-as-judge on the first `max_items` test items: every arm against the rubric, and the
    fine-tune against the best baseline in both orders."""
    from tunewise.evaluate import judge

    cfg = config.eval.judge
    if cfg is None:
        return
    endpoint = endpoint_of(cfg, "eval.judge")
    arms = all_arms(config)
    predictions = {arm: read_jsonl(run.predictions(arm)) for arm in arms}
    first = predictions[FINETUNED][: cfg.max_items]
    items = [
        judge.JudgeItem(source=row["source"], prompt=row["prompt"], reference=row["reference"],
                        outputs={arm: predictions[arm][i]["output"] for arm in arms})
        for i, row in enumerate(first)
    ]
    ev = config.eval
    stats = dict(samples=ev.bootstrap_samples, alpha=ev.alpha, seed=ev.seed)
    console.print(f"[bold]judge[/] {cfg.model} at {cfg.url}: {len(items)} items x {len(arms)} arms")
    point = judge.pointwise(endpoint, items, arms, cfg.rubric, console=console)
    summary = JudgeSummary(judge={"url": cfg.url, "model": cfg.model}, rubric=cfg.rubric, n_items=len(items),
                           pointwise=judge.summarize_pointwise(point, arms, cfg.rubric, **stats))
    atomic_write_jsonl(run.judge_pointwise, point)
    if cfg.pairwise:
        best = best_baseline(run, config)
        pairs = judge.pairwise(endpoint, items, FINETUNED, best, console=console)
        atomic_write_jsonl(run.judge_pairwise, pairs)
        summary.pairwise = pw = judge.summarize_pairwise(pairs, FINETUNED, best, **stats)
        if pw["win_rate_a"]["mean"] is not None:
            win = pw["win_rate_a"]
            console.print(f"  fine-tune vs {best}: win rate {win['mean']:.3f} [{win['low']:.3f}, {win['high']:.3f}] "
                          f"over {pw['consistent']} order-consistent items, "
                          f"position-inconsistent {pw['position_inconsistency_rate']:.1%}")
        else:
            console.print(f"  fine-tune vs {best}: no order-consistent verdict; the judge is not usable for this task")
    summary.provenance = Provenance.of(run, config.seeds)
    summary.write(run.judge_summary)


def red_flags(run: RunDir, config: Config) -> list[dict]:
    """Every red flag found, each marked blocking when eval.block_on names it."""
    ev = config.eval
    finetuned = read_jsonl(run.predictions(FINETUNED))
    base = read_jsonl(run.predictions("zero_shot"))
    found = {
        "overfitting": overfitting_flag(read_jsonl(run.train_log)) if run.train_log.exists() else None,
        "length_drift": length_drift_flag([r["output"] for r in finetuned], [r["reference"] for r in finetuned],
                                          [r["output"] for r in base], ev.max_length_ratio),
        "refusal": refusal_flag([r["scores"]["refusal"] for r in finetuned], [r["scores"]["refusal"] for r in base],
                                ev.max_refusal_increase),
    }
    if ev.forgetting:
        found["forgetting"] = forgetting_flag(
            [r["passed"] for r in read_jsonl(run.regression_predictions("base"))],
            [r["passed"] for r in read_jsonl(run.regression_predictions("finetuned"))],
            ev.max_forgetting_drop,
        )
    return [{"name": name, "message": message, "blocking": name in ev.block_on}
            for name, message in found.items() if message]


def stage_verdict(run: RunDir, config: Config, console: Console) -> None:
    arms = all_arms(config)
    scores = {arm: arm_scores(run, arm) for arm in arms}
    primary = ArmMetrics.read(run.metrics(FINETUNED)).primary
    ev = config.eval
    verdict = decide_verdict(
        scores, primary=primary, margin=ev.margin, alpha=ev.alpha, samples=ev.bootstrap_samples,
        seed=ev.seed, red_flags=red_flags(run, config), baselines=counted_baselines(config),
    )
    if ev.forgetting:
        verdict.regression = {who: RegressionMetrics.read(run.regression_metrics(who)).accuracy
                              for who in ("base", "finetuned")}
    if (run.judge_summary).exists():
        verdict.judge = JudgeSummary.read(run.judge_summary).figures()
    verdict.provenance = Provenance.of(run, config.seeds)
    verdict.write(run.verdict)


def stage_report(run: RunDir, config: Config, console: Console) -> None:
    write_report(run, all_arms(config), config.eval.report_samples)


def _baseline_done(run: RunDir, config: Config) -> bool:
    arms = counted_baselines(config) + [e.name for e in config.eval.endpoints if not e.baseline]
    regression = not config.eval.forgetting or run.regression_metrics("base").exists()
    return all(run.metrics(a).exists() for a in arms) and regression


def _evaluate_done(run: RunDir, config: Config) -> bool:
    regression = not config.eval.forgetting or run.regression_metrics("finetuned").exists()
    return run.metrics(FINETUNED).exists() and regression


Stage = Callable[[RunDir, Config, Console], None]
STAGES: dict[str, tuple[Stage, Callable[[RunDir, Config], bool]]] = {
    "decide": (stage_decide, lambda r, c: r.decision.exists()),
    "baseline": (stage_baseline, _baseline_done),
    "train": (stage_train, lambda r, c: (r.adapter_provenance).exists() and r.train_summary.exists()),
    "evaluate": (stage_evaluate, _evaluate_done),
    "judge": (stage_judge, lambda r, c: c.eval.judge is None or (r.judge_summary).exists()),
    "verdict": (stage_verdict, lambda r, c: r.verdict.exists()),
    "report": (stage_report, lambda r, c: r.report.exists()),
}
EVALUATION_STAGES = ["baseline", "evaluate", "judge", "verdict", "report"]


def run_stages(run: RunDir, config: Config, console: Console, stages: list[str] | None = None) -> Verdict | None:
    """Run every stage not yet done (or exactly `stages`, done or not); returns the verdict."""
    timings = read_json(run.status).get("timings", {}) if run.status.exists() else {}
    run.set_status("running", timings=timings)
    for name, (stage, done) in STAGES.items():
        if (stages is not None and name not in stages) or (stages is None and done(run, config)):
            continue
        started = time.perf_counter()
        try:
            stage(run, config, console)
        except BaseException as err:
            state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            run.set_status(state, stage=name, error=str(err) or type(err).__name__, timings=timings)
            raise
        timings[name] = round(time.perf_counter() - started, 1)
        run.set_status("running", timings=timings)
    complete = run.verdict.exists() and run.report.exists()
    run.set_status("complete" if complete else "partial", timings=timings)
    return Verdict.read(run.verdict) if run.verdict.exists() else None


def run_pipeline(config_path: str | Path, overrides: list[str], runs_root: Path, console: Console) -> tuple[RunDir, Verdict | None]:
    started = time.perf_counter()
    run, config = start_run(config_path, overrides, runs_root, console)
    run.set_status("running", timings={"data": round(time.perf_counter() - started, 1)})
    return run, run_stages(run, config, console)


def resume_pipeline(run_dir: str | Path, console: Console, only: str | None = None) -> tuple[RunDir, Verdict | None]:
    run = open_run_dir(run_dir)
    config = load_config(run.config)
    if not run.manifest.exists():
        raise TunewiseError("the run has no data split", file=run.manifest, fix="start a new run with `tunewise run`")
    if only:
        if only not in STAGES:
            raise TunewiseError(f"unknown stage '{only}'", fix=f"one of: {', '.join(STAGES)}")
        _require_done(run, config, list(STAGES)[: list(STAGES).index(only)], f"stage '{only}'")
    return run, run_stages(run, config, console, stages=[only] if only else None)


def _require_done(run: RunDir, config: Config, names: list[str], what: str) -> None:
    missing = [name for name in names if not STAGES[name][1](run, config)]
    if missing:
        raise TunewiseError(
            f"{what} needs the output of {', '.join(missing)} first",
            file=run.root, fix=f"tunewise run --resume {run.root}",
        )


def evaluate_run(run_dir: str | Path, overrides: list[str], console: Console) -> tuple[RunDir, Verdict | None]:
    """`tunewise eval RUN`: every arm, metric, judge, red flag, verdict and report again for a
    trained run, with `--set eval.*` changes (new endpoints, a judge, another metric). Outputs
    whose model, prompt and settings are unchanged come from the generation cache."""
    run = open_run_dir(run_dir)
    other = [o for o in overrides if not o.strip().startswith("eval.")]
    if other:
        raise TunewiseError(
            f"`tunewise eval` changes only eval.* keys, not '{other[0]}'",
            fix="data, model and training changes need a new run: tunewise run -c tunewise.yaml --set ...",
        )
    config = load_config(run.config, overrides)
    _require_done(run, config, ["train"], "evaluation")
    if not run.manifest.exists():
        raise TunewiseError("the run has no data split", file=run.manifest, fix="start a new run with `tunewise run`")
    if overrides:
        atomic_write_text(run.config, dump_config(config))
    return run, run_stages(run, config, console, stages=EVALUATION_STAGES)
