"""What tunewise prints on the terminal about its results: the verdict table, the data summary and
check, the chat format, the decide recommendation, the end of training. The HTML reports
(html.py, data_report.py) show the same artifacts at length; both read the typed artifacts."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunewise.artifacts import ArmMetrics, DataManifest, TrainSummary, Verdict
from tunewise.runs import RunDir


def print_verdict(console: Console, verdict: Verdict | None, run: RunDir) -> None:
    """The verdict as a table (every arm, its interval, the paired comparison), the decision, the red flags."""
    if verdict is None:
        console.print(f"no verdict yet: the run stopped before the verdict stage ({run.root})")
        return
    primary = verdict.primary_metric
    table = Table(title=f"{primary} on {verdict.n_items} test items")
    for column, justify in (("arm", "left"), ("mean", "right"), ("95% CI", "right"),
                            ("fine-tune minus arm (paired 95% CI)", "right"), ("p", "right")):
        table.add_column(column, justify=justify)
    for arm, mean in verdict.means.items():
        ci = ArmMetrics.read(run.metrics(arm)).interval(primary)
        cmp = verdict.comparisons.get(arm)
        diff = (f"{cmp['difference']['mean']:+.3f} [{cmp['difference']['low']:+.3f}, {cmp['difference']['high']:+.3f}]"
                if cmp else "")
        p = f"{cmp['test']['p_value']:.3g}" if cmp else ""
        name = arm if arm == "finetuned" or arm in verdict.baselines else f"{arm} (reference)"
        table.add_row(name, f"{mean:.3f}", f"[{ci['low']:.3f}, {ci['high']:.3f}]", diff, p,
                      style="bold" if arm in ("finetuned", verdict.best_baseline) else "")
    console.print(table)
    if verdict.regression is not None:
        base, ft = verdict.regression["base"], verdict.regression["finetuned"]
        console.print(f"general regression set: base {base['mean']:.3f}, fine-tune {ft['mean']:.3f}")
    pairwise = (verdict.judge or {}).get("pairwise")
    if pairwise and pairwise["win_rate_a"]["mean"] is not None:
        win = pairwise["win_rate_a"]
        console.print(f"judge: fine-tune vs {pairwise['arm_b']} win rate {win['mean']:.3f} "
                      f"[{win['low']:.3f}, {win['high']:.3f}] over {pairwise['consistent']} order-consistent items, "
                      f"position-inconsistent {pairwise['position_inconsistency_rate']:.1%}")
    colour = "green" if verdict.shipped else "red"
    console.print(Text(verdict.decision.value, style=f"bold {colour}"), Text(verdict.reason))
    for flag in verdict.red_flags:
        tag = "red flag (blocks SHIP)" if flag["blocking"] else "red flag"
        console.print(Text(f"{tag}: {flag['message']}", style="yellow"))
    console.print(f"report: {run.report}")


def print_chat(console: Console, model: str, chat) -> None:
    """One line on how the model is prompted (what training, evaluation and serving all use)."""
    tok = chat.tokenizer
    stops = ", ".join(tok.convert_ids_to_tokens(list(chat.stop_ids)))
    console.print(Text.assemble(("model ", "bold"), (
        f"{model}: chat template from {chat.source}; system prompt "
        f"{'folded into the first user turn' if chat.fold_system else 'as a system turn'}; stops at {stops}"
        + (f"; settings {chat.kwargs}" if chat.kwargs else ""))))
    for warning in chat.warnings:
        console.print(Text.assemble(("warning ", "yellow"), warning))


def print_data_summary(console: Console, manifest: DataManifest, problems: list) -> None:
    """The data stage in a few lines: counts, what was removed, the split, the first rejected rows."""
    c = manifest.counts
    removed = ", ".join(f"{c[k]} {k.replace('_', ' ')}" for k in
                        ("too_long", "exact_duplicates", "near_duplicates", "semantic_duplicates", "contaminated")
                        if c.get(k))
    console.print(
        f"[bold]data[/] {c['read']} read, {c['rejected']} rejected{', ' + removed if removed else ''}; "
        f"{manifest.split_strategy} split {c['train']}/{c['val']}/{c['test']} (dataset {manifest.version})"
    )
    for problem in problems[:10]:
        console.print(Text.assemble(("  skipped ", "yellow"), str(problem)))
    if len(problems) > 10:
        console.print(f"  ... and {len(problems) - 10} more in data/rejected.jsonl")
    for warning in manifest.warnings:
        console.print(Text.assemble(("warning ", "yellow"), warning))


def print_data_check(console: Console, prepared, preview: list[str]) -> None:
    """`tunewise data check`: every step's row count, formats, token lengths, warnings, rejected rows, a preview."""
    table = Table(title="data check")
    table.add_column("step")
    table.add_column("rows", justify="right")
    for key, value in prepared.counts.items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
    console.print(f"format: {', '.join(prepared.formats.values())}; outputs: {prepared.output_type}; "
                  f"split: {prepared.split_strategy}")
    if "tokens" in prepared.stats:
        t = prepared.stats["tokens"]
        console.print(f"tokens under the chat template: p50 {t['p50']}, p95 {t['p95']}, max {t['max']}")
    for warning in prepared.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
    for problem in prepared.problems[:20]:
        console.print(Text(f"rejected {problem}", style="red"))
    if len(prepared.problems) > 20:
        console.print(f"... and {len(prepared.problems) - 20} more")
    console.print("preview of the first rows as they will be trained:")
    for text in preview:
        console.print(Text(text, style="dim"))


def print_decision(console: Console, decision) -> None:
    """`tunewise decide`'s recommendation (a decide.Decision): headline, reasons, warnings, next steps."""
    console.print(Text(decision.headline(), style="bold"))
    for reason in decision.reasons:
        console.print(f"  - {reason}", markup=False)
    for warning in decision.warnings:
        console.print(Text(f"  warning: {warning}", style="yellow"))
    for step in decision.next_steps:
        console.print(f"  next: {step}", markup=False)


def print_trained(console: Console, summary: TrainSummary, root: Path) -> None:
    """The end of `tunewise train`: steps, resume, early stop, the best validation loss, what next."""
    resumed = summary.resumed_from_step
    console.print(f"train done in {root}: {summary.steps} steps"
                  + (f" (resumed from step {resumed})" if resumed else "")
                  + (", stopped early" if summary.stopped_early else "")
                  + f"; best val loss {summary.best_val_loss:.4f} at step {summary.best_step}. "
                  f"Next: tunewise run --resume {root}")


def print_sweep(console: Console, table_rows: tuple[list[str], list], result: dict, root: Path) -> None:
    """`tunewise sweep`'s table (`table_rows`: sweep.sweep_table's columns and rows, the best in green)
    and the winner."""
    columns, rows = table_rows
    table = Table(title=f"{len(rows)} trials: the best has the lowest validation loss")
    for n, column in enumerate(columns):
        last = n == len(columns) - 1
        table.add_column(column, justify="left" if n == 0 or last else "right", no_wrap=not last,
                         min_width=6 if last else None)
    for cells, best in rows:
        table.add_row(*map(Text, cells), style="bold green" if best else "")
    console.print(table)
    console.print(f"report: {root / 'sweep.html'}")
    if result["winner"] is None:
        console.print(Text("no trial finished training", style="bold red"))
        return
    console.print(f"best: {result['winner']}; evaluate it against the baselines with: "
                  f"tunewise run --resume {root / 'trials' / result['winner']}")


def print_registry(console: Console, versions: list, routes: dict) -> None:
    """`tunewise registry list`: every version with its route state, verdict, score, dataset, run."""
    table = Table("name", "version", "route", "verdict", "fine-tune", "dataset", "run", "added")
    for v in versions:
        route, state = routes.get(v.name), []
        if route and route.current and route.current.version == v.version:
            state.append("current")
        if route and route.canary and route.canary.version == v.version:
            state.append(f"canary {route.share:.0%}")
        score = f"{v.finetuned:.3f}" if v.finetuned is not None else "-"
        table.add_row(v.name, f"v{v.version}", ", ".join(state), v.decision or "-",
                      f"{v.primary_metric or '-'} {score}", (v.dataset_version or "-")[:8], Path(v.run).name,
                      v.created[:16].replace("T", " "))
    console.print(table if table.rows else "the registry is empty: tunewise registry add NAME RUN")
