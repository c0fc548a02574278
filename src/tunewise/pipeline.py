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

from tunewise.config import Config, dump_config, load_config
from tunewise.data import DataSettings, prepare, preview_rows, write_prepared
from tunewise.decide import recommend
from tunewise.decide.framework import FEW_EXAMPLES
from tunewise.errors import TunewiseError
from tunewise.evaluate.arms import BASELINE_ARMS, FINETUNED
from tunewise.evaluate.runner import (
    arm_scores,
    evaluate_arms,
    load_base_for_eval,
    load_finetuned_for_eval,
    test_items,
)
from tunewise.evaluate.verdict import decide_verdict, length_drift_flag, overfitting_flag
from tunewise.models import load_tokenizer, resolve_base
from tunewise.report.html import write_report
from tunewise.runs import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    new_run_dir,
    open_run_dir,
    read_json,
    read_jsonl,
)
from tunewise.train.sft import train_sft

ARMS = (*BASELINE_ARMS, FINETUNED)


def start_run(config_path: str | Path, overrides: list[str], runs_root: Path, console: Console) -> tuple[RunDir, Config]:
    """Validate config, model and data, then create the run folder with config and data splits."""
    config = load_config(config_path, overrides)
    tokenizer = load_tokenizer(resolve_base(config.model.base))
    settings = DataSettings.from_config(config)
    prepared = prepare([Path(p) for p in config.data.paths], settings, tokenizer=tokenizer,
                       log=lambda m: console.print(Text.assemble(("data ", "bold"), m)))
    run = new_run_dir(runs_root, config.task.name)
    atomic_write_text(run.config, dump_config(config))
    run.set_status("running")
    manifest = write_prepared(prepared, run.data, settings,
                              preview=preview_rows(tokenizer, prepared.splits["train"], config.task.system_prompt))
    print_data_summary(console, manifest, prepared.problems)
    return run, config


def print_data_summary(console: Console, manifest: dict, problems: list) -> None:
    c = manifest["counts"]
    removed = ", ".join(f"{c[k]} {k.replace('_', ' ')}" for k in
                        ("too_long", "exact_duplicates", "near_duplicates", "semantic_duplicates", "contaminated")
                        if c.get(k))
    console.print(
        f"[bold]data[/] {c['read']} read, {c['rejected']} rejected{', ' + removed if removed else ''}; "
        f"{manifest['split_strategy']} split {c['train']}/{c['val']}/{c['test']} (dataset {manifest['version']})"
    )
    for problem in problems[:10]:
        console.print(Text.assemble(("  skipped ", "yellow"), str(problem)))
    if len(problems) > 10:
        console.print(f"  ... and {len(problems) - 10} more in data/rejected.jsonl")
    for warning in manifest["warnings"]:
        console.print(Text.assemble(("warning ", "yellow"), warning))


def stage_decide(run: RunDir, config: Config, console: Console) -> None:
    counts = read_json(run.manifest)["counts"]
    warnings = []
    if counts["train"] < FEW_EXAMPLES:
        warnings.append(
            f"only {counts['train']} training examples (fewer than {FEW_EXAMPLES}): expect a weak fine-tune; "
            "collect more or rely on few-shot prompting"
        )
    decision: dict = {"train_examples": counts["train"], "warnings": warnings}
    if config.decide is not None:
        made = recommend(config.decide)
        decision = {**made.to_dict(), "train_examples": counts["train"], "warnings": [*made.warnings, *warnings]}
        console.print(f"[bold]decide[/] {made.headline()}")
    for warning in decision["warnings"]:
        console.print(Text.assemble(("warning ", "yellow"), warning))
    atomic_write_json(run.decision, decision)


def stage_baseline(run: RunDir, config: Config, console: Console) -> None:
    todo = [arm for arm in BASELINE_ARMS if not run.metrics(arm).exists()]
    model, tokenizer = load_base_for_eval(config)
    console.print(f"[bold]baseline[/] {', '.join(todo)} on {len(test_items(run, config))} test items")
    evaluate_arms(run, config, todo, model, tokenizer, console)


def stage_train(run: RunDir, config: Config, console: Console) -> None:
    summary = train_sft(run, config, console)
    console.print(
        f"  best val loss {summary.best_val_loss:.4f} at step {summary.best_step} "
        f"(start {summary.first_val_loss:.4f}); {summary.tokens_per_second:.0f} tokens/s"
    )


def stage_evaluate(run: RunDir, config: Config, console: Console) -> None:
    model, tokenizer = load_finetuned_for_eval(run, config)
    console.print("[bold]evaluate[/] fine-tuned model on the same test items")
    evaluate_arms(run, config, [FINETUNED], model, tokenizer, console)


def stage_verdict(run: RunDir, config: Config, console: Console) -> None:
    scores = {arm: arm_scores(run, arm) for arm in ARMS}
    primary = read_json(run.metrics(FINETUNED))["primary"]
    finetuned_rows = read_jsonl(run.predictions(FINETUNED))
    flags = [
        flag
        for flag in (
            overfitting_flag(read_jsonl(run.train_log)),
            length_drift_flag([r["output"] for r in finetuned_rows], [r["reference"] for r in finetuned_rows]),
        )
        if flag
    ]
    ev = config.eval
    verdict = decide_verdict(
        scores, primary=primary, margin=ev.margin, alpha=ev.alpha, samples=ev.bootstrap_samples,
        seed=config.data.seed, red_flags=flags,
    )
    verdict["provenance"] = run.provenance(config.data.seed)
    atomic_write_json(run.verdict, verdict)


def stage_report(run: RunDir, config: Config, console: Console) -> None:
    write_report(run, list(ARMS), config.eval.report_samples)


Stage = Callable[[RunDir, Config, Console], None]
STAGES: dict[str, tuple[Stage, Callable[[RunDir], bool]]] = {
    "decide": (stage_decide, lambda r: r.decision.exists()),
    "baseline": (stage_baseline, lambda r: all(r.metrics(a).exists() for a in BASELINE_ARMS)),
    "train": (stage_train, lambda r: (r.adapter / "tunewise.json").exists() and r.train_summary.exists()),
    "evaluate": (stage_evaluate, lambda r: r.metrics(FINETUNED).exists()),
    "verdict": (stage_verdict, lambda r: r.verdict.exists()),
    "report": (stage_report, lambda r: r.report.exists()),
}


def run_stages(run: RunDir, config: Config, console: Console, only: str | None = None) -> dict:
    """Run every stage not yet done (or just `only`); returns the verdict."""
    timings = read_json(run.status).get("timings", {}) if run.status.exists() else {}
    run.set_status("running", timings=timings)
    for name, (stage, done) in STAGES.items():
        if (only and name != only) or (not only and done(run)):
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
    return read_json(run.verdict) if run.verdict.exists() else {}


def run_pipeline(config_path: str | Path, overrides: list[str], runs_root: Path, console: Console) -> tuple[RunDir, dict]:
    started = time.perf_counter()
    run, config = start_run(config_path, overrides, runs_root, console)
    run.set_status("running", timings={"data": round(time.perf_counter() - started, 1)})
    return run, run_stages(run, config, console)


def resume_pipeline(run_dir: str | Path, console: Console, only: str | None = None) -> tuple[RunDir, dict]:
    run = open_run_dir(run_dir)
    config = load_config(run.config)
    if not run.manifest.exists():
        raise TunewiseError("the run has no data split", file=run.manifest, fix="start a new run with `tunewise run`")
    if only:
        if only not in STAGES:
            raise TunewiseError(f"unknown stage '{only}'", fix=f"one of: {', '.join(STAGES)}")
        missing = [name for name in list(STAGES)[: list(STAGES).index(only)] if not STAGES[name][1](run)]
        if missing:
            raise TunewiseError(
                f"stage '{only}' needs the output of {', '.join(missing)} first",
                file=run.root, fix=f"tunewise run --resume {run.root}",
            )
    return run, run_stages(run, config, console, only=only)
