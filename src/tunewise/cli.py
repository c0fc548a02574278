"""The tunewise command line: parse, call one function of the Python API, print."""

from __future__ import annotations

import shutil
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunewise.errors import TunewiseError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Decide whether to fine-tune, prepare the data, beat the baselines, ship.")
model_app = typer.Typer(no_args_is_help=True, help="Base models.")
app.add_typer(model_app, name="model")
console = Console(highlight=False)

DEMO = "debian-sections"
RunsOpt = Annotated[Path, typer.Option("--runs", help="Folder that holds the run folders.")]


def _example_dir() -> Path:
    return Path(str(resources.files("tunewise") / "examples" / DEMO))


def print_verdict(verdict: dict, run_root: Path) -> None:
    table = Table(title=f"{verdict['primary_metric']} on {verdict['n_items']} test items")
    table.add_column("arm")
    table.add_column("mean", justify="right")
    table.add_column("95% CI", justify="right")
    from tunewise.runs import read_json

    for arm, mean in verdict["means"].items():
        ci = read_json(run_root / "metrics" / f"{arm}.json")["metrics"][verdict["primary_metric"]]
        style = "bold" if arm in ("finetuned", verdict["best_baseline"]) else ""
        table.add_row(arm, f"{mean:.3f}", f"[{ci['low']:.3f}, {ci['high']:.3f}]", style=style)
    console.print(table)
    colour = "green" if verdict["decision"] == "SHIP" else "red"
    console.print(Text(verdict["decision"], style=f"bold {colour}"), Text(verdict["reason"]))
    for flag in verdict["red_flags"]:
        console.print(Text(f"red flag: {flag}", style="yellow"))
    console.print(f"report: {run_root / 'report.html'}")


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Folder to create the project in.")]) -> None:
    """Write a commented tunewise.yaml and an example data file (the Debian sections task)."""
    directory.mkdir(parents=True, exist_ok=True)
    targets = [directory / "tunewise.yaml", directory / "packages.jsonl"]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise TunewiseError(f"would overwrite {', '.join(existing)}", fix="choose an empty folder")
    for target in targets:
        shutil.copyfile(_example_dir() / target.name, target)
    console.print(f"wrote {targets[0]} and {targets[1]}; next: tunewise run -c {targets[0]}")


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Option("-c", "--config", help="tunewise.yaml")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set train.lr=1e-4")] = [],
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run folder.")] = None,
    runs: RunsOpt = Path("runs"),
) -> None:
    """Run every stage: data, decide, baseline, train, evaluate, verdict, report."""
    from tunewise.pipeline import resume_pipeline, run_pipeline

    if resume is not None:
        run_dir, verdict = resume_pipeline(resume, console)
    elif config is not None:
        run_dir, verdict = run_pipeline(config, set_, runs, console)
    else:
        raise TunewiseError("nothing to run", fix="pass -c tunewise.yaml (or --resume RUN_DIR)")
    print_verdict(verdict, run_dir.root)


@app.command()
def demo(
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set data.max_examples=500")] = [],
    runs: RunsOpt = Path("runs"),
) -> None:
    """Run the whole pipeline on the bundled Debian sections task with the embedded model."""
    from tunewise.pipeline import run_pipeline

    run_dir, verdict = run_pipeline(_example_dir() / "tunewise.yaml", set_, runs, console)
    print_verdict(verdict, run_dir.root)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="decide | baseline | train | evaluate | verdict | report")],
    run_dir: Annotated[Path, typer.Argument(help="A run folder made by `tunewise run`.")],
) -> None:
    """Run (or re-run) one stage of an existing run."""
    from tunewise.pipeline import resume_pipeline

    resume_pipeline(run_dir, console, only=name)
    console.print(f"stage {name} done in {run_dir}")


@app.command()
def decide(
    answers: Annotated[Optional[Path], typer.Option("--answers", "-a", help="YAML file with the answers.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write decision.json here.")] = None,
) -> None:
    """Is fine-tuning the right tool? Asks the questions (or reads them) and recommends."""
    from rich.prompt import Prompt

    from tunewise import decide as decide_api
    from tunewise.runs import atomic_write_json

    if answers is not None:
        given = decide_api.load_answers(answers)
    elif sys.stdin.isatty():
        def prompt(q: decide_api.Question) -> str:
            hint = f" ({'/'.join(q.choices)})" if q.choices else " (yes/no)" if q.kind == "bool" else ""
            return Prompt.ask(f"[bold]{q.text}[/]{hint}", console=console)

        given = decide_api.ask(prompt)
    else:
        raise TunewiseError("no answers and no terminal to ask them on", fix="pass --answers answers.yaml")
    decision = decide_api.recommend(given)
    console.print(Text(decision.headline(), style="bold"))
    for reason in decision.reasons:
        console.print(f"  - {reason}", markup=False)
    for warning in decision.warnings:
        console.print(Text(f"  warning: {warning}", style="yellow"))
    for step in decision.next_steps:
        console.print(f"  next: {step}", markup=False)
    if output is not None:
        atomic_write_json(output, decision.to_dict())


@model_app.command("import")
def model_import(
    name: Annotated[str, typer.Argument(help="Embedded model name.")] = "smollm2-135m-instruct",
    force: Annotated[bool, typer.Option(help="Re-import even if cached.")] = False,
) -> None:
    """Import an embedded GGUF model into the local cache as safetensors (once)."""
    from tunewise.models import EMBEDDED, import_embedded

    if name not in EMBEDDED:
        raise TunewiseError(f"'{name}' is not an embedded model", fix=f"one of: {', '.join(EMBEDDED)}")
    console.print(f"{name}: {import_embedded(name, force=force)}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill` gets the same clean stop as Ctrl-C: status says interrupted


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except TunewiseError as err:
        Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(str(err)))
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
