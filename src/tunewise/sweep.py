"""`tunewise sweep`: a grid of training settings, trained one trial after another, ranked by
validation loss.

Every trial is an ordinary run folder under `<sweep>/trials/` whose config is the trial's
resolved config. The data is prepared once and copied, so every trial trains on the same split
and is ranked on the same validation examples; the test split stays untouched until the
winner's evaluation (`tunewise run --resume <winner>`). sweep.json and sweep.html are
rewritten after each trial, so an interrupted sweep continues with `tunewise sweep --resume
DIR`: trained trials are skipped and a trial killed part-way continues from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
import time
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from rich.console import Console
from rich.text import Text

from tunewise.artifacts import DataManifest, TrainSummary
from tunewise.config import Config, dump_config, load_config
from tunewise.errors import TunewiseError
from tunewise.pipeline import STAGES, prepare_data, run_stages, stage_decide, write_data
from tunewise.report.plots import sweep_best_plot, sweep_curves_plot
from tunewise.runs import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    library_versions,
    new_run_dir,
    read_json,
    read_jsonl,
    replace_dir,
    sha256_file,
)
from tunewise.settings import data_settings

SWEEP_FILE = "sweep.json"
REPORT_FILE = "sweep.html"
SWEEPABLE_SECTIONS = ("train", "lora", "prompt_tuning", "preference")  # and the key `method`
SWEEPABLE_HELP = "train.*, lora.*, method, prompt_tuning.*, preference.*"
# learning rate x LoRA rank x epochs, the grid the usual LoRA guides suggest
DEFAULT_GRID = {"train.lr": ["1e-4", "2e-4", "4e-4"], "lora.r": ["8", "16"], "train.epochs": ["1", "2"]}
DEFAULT_GRID_METHODS = ("lora", "dora", "qlora")
METRIC = "best_val_loss"
METRIC_NOTE = (
    "Trials are ranked by their lowest validation loss (loss on the assistant tokens of the validation "
    "split): the one metric every method reports, measured on the same split for every trial, since the "
    "data is prepared once. The test split is not used to choose, so the winner's verdict stays unbiased. "
    "Ties go to the trial with fewer steps."
)
TRAINED = "done"
RESULT_KEYS = ("best_val_loss", "best_step", "steps", "epochs", "seconds", "tokens_per_second", "stopped_early")


# --- the plan: grid options, trials, every trial's config validated before anything is written

def split_values(text: str) -> list[str]:
    """'1e-4,2e-4' -> ['1e-4', '2e-4']; commas inside [...], {...} or quotes do not split."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def check_sweepable(key: str) -> None:
    """Trials may differ only in how they train; data, model, eval and task settings are shared."""
    section = key.split(".", 1)[0]
    if key == "method" or (section in SWEEPABLE_SECTIONS and "." in key):
        return
    if section in Config.model_fields:
        raise TunewiseError(
            f"'{key}' cannot be swept: the trials of a sweep share one data split, base model and "
            "evaluation, so that their validation losses compare",
            field=key, fix=f"set it for every trial with --set {key}=..., and sweep keys under {SWEEPABLE_HELP}",
        )
    raise TunewiseError(f"unknown key '{key}'", field=key, fix=f"sweepable keys: {SWEEPABLE_HELP}")


def parse_grid(options: list[str]) -> dict[str, list[str]]:
    """`--grid KEY=A,B,C` options -> {KEY: [A, B, C]}; each value is read as YAML, like --set."""
    grid: dict[str, list[str]] = {}
    for option in options:
        key, sep, text = option.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise TunewiseError(f"--grid '{option}' is not KEY=VALUE,VALUE,...", field="--grid",
                                fix="e.g. --grid train.lr=1e-4,2e-4,4e-4")
        check_sweepable(key)
        if key in grid:
            raise TunewiseError(f"--grid {key} is given twice", field=key,
                                fix=f"list every value in one option: --grid {key}=A,B,C")
        values = split_values(text)
        if not all(values):
            raise TunewiseError(f"--grid {option}: a value is empty", field=key, fix=f"e.g. --grid {key}=A,B,C")
        grid[key] = values
    return grid


def default_grid(config: Config, overrides: list[str]) -> dict[str, list[str]]:
    """DEFAULT_GRID for the LoRA family, less the keys fixed with --set."""
    if config.method not in DEFAULT_GRID_METHODS:
        raise TunewiseError(
            f"there is no default grid for method '{config.method}' (it is for {', '.join(DEFAULT_GRID_METHODS)})",
            field="method", fix="choose the values to try: --grid train.lr=A,B,C (and more --grid options)",
        )
    fixed = {o.partition("=")[0].strip() for o in overrides}
    grid = {key: values for key, values in DEFAULT_GRID.items() if key not in fixed}
    if not grid:
        raise TunewiseError("--set fixes every key of the default grid", fix="choose the values to try with --grid")
    return grid


def distinct(values) -> list:
    out: list = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def value_at(config: Config, key: str):
    """The resolved value of a dotted key, as JSON."""
    node = config.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


def _in_trial(err: TunewiseError, sets: list[str]) -> TunewiseError:
    """A trial's config error, said as the --grid value that caused it (or the trial that has it)."""
    for assignment in sets:
        key, _, value = assignment.partition("=")
        if err.field and (err.field == key or err.field.startswith(key + ".")):
            return TunewiseError(f"--grid {key}={value}: {err.message}", field=err.field,
                                 fix=err.fix or f"change '{value}' in the --grid {key} values")
    return TunewiseError(f"with {' '.join(sets)}: {err.message}", file=err.file, line=err.line,
                         field=err.field, fix=err.fix)


def plan_trials(config_path: Path, grid: dict[str, list[str]], overrides: list[str],
                base: Config) -> tuple[list[dict], list[Config]]:
    """Every combination of the grid, each with its validated config (errors name the key)."""
    fixed = {o.partition("=")[0].strip() for o in overrides}
    for key in grid:
        if key in fixed:
            raise TunewiseError(f"'{key}' is both swept (--grid) and fixed (--set)", field=key,
                                fix="drop one of the two options")
    combos = list(itertools.product(*grid.values()))
    width = max(2, len(str(len(combos))))
    trials, configs, settings = [], [], data_settings(base)
    for n, values in enumerate(combos, 1):
        sets = [f"{key}={value}" for key, value in zip(grid, values)]
        try:
            config = load_config(config_path, [*overrides, *sets])
        except TunewiseError as err:
            raise _in_trial(err, sets) from None
        changed = [f.name for f in dataclasses.fields(settings)
                   if getattr(settings, f.name) != getattr(data_settings(config), f.name)]
        if changed:
            raise TunewiseError(
                f"with {' '.join(sets)} the data would be prepared differently ({', '.join(changed)}), so the "
                "trials would not share one validation split", field=sets[0].partition("=")[0],
                fix="set it for every trial with --set instead of --grid",
            )
        trials.append({"name": f"trial-{n:0{width}d}", "overrides": sets,
                       "values": {key: value_at(config, key) for key in grid}, "status": "pending"})
        configs.append(config)
    for n, (key, raws) in enumerate(grid.items()):  # a value given twice would train a trial twice
        resolved = {t["overrides"][n].partition("=")[2]: repr(t["values"][key]) for t in trials}
        for i, raw in enumerate(raws):
            earlier = next((e for e in raws[:i] if resolved[e] == resolved[raw]), None)
            if earlier is not None:
                same = "is given twice" if earlier == raw else f"is the same value as '{earlier}'"
                raise TunewiseError(f"--grid {key}: '{raw}' {same}", field=key, fix="list each value once")
    return trials, configs


# --- running: set up once, then one trial after another

def run_sweep(config_path: str | Path, grid_options: list[str], overrides: list[str], runs_root: Path,
              console: Console) -> tuple[Path, dict]:
    """Validate every trial and the data, create the sweep folder, train the trials; returns
    (sweep folder, the content of sweep.json)."""
    config_path = Path(config_path)
    base = load_config(config_path, overrides)
    grid = parse_grid(grid_options) if grid_options else default_grid(base, overrides)
    trials, configs = plan_trials(config_path, grid, overrides, base)
    console.print(Text.assemble(
        ("sweep ", "bold"), f"{len(trials)} trials: ",
        " x ".join(f"{key} in {{{', '.join(values)}}}" for key, values in grid.items()),
        "" if grid_options else " (the default grid; choose with --grid KEY=A,B,C)",
    ))

    # the data split, prepared once (bad data is found before the sweep folder is created)
    started = time.perf_counter()
    data = prepare_data(base, config_path, console, methods_of=configs)
    root = new_run_dir(runs_root, f"{base.task.name}-sweep").root
    runs = [trial_run(root, trial) for trial in trials]
    first = runs[0]
    atomic_write_text(first.config, dump_config(configs[0]))
    manifest = write_data(first, base, data, console)
    stage_decide(first, configs[0], console)
    for run, config in zip(runs[1:], configs[1:]):  # same data settings (checked above): same split
        atomic_write_text(run.config, dump_config(config))
        tmp = run.root / ".data.tmp"
        shutil.copytree(first.data, tmp)
        replace_dir(tmp, run.data)
        shutil.copyfile(first.decision, run.decision)
    data_seconds = round(time.perf_counter() - started, 1)
    for run in runs:
        run.set_status("pending", timings={"data": data_seconds})
    sweep = {
        "sweep": root.name,
        "task": base.task.name,
        "state": "running",
        "grid": {key: distinct(trial["values"][key] for trial in trials) for key in grid},
        "overrides": list(overrides),
        "metric": METRIC,
        "note": METRIC_NOTE,
        "dataset_version": manifest.version,
        "trials": trials,
        "winner": None,
        "provenance": {"config_file": str(config_path.resolve()), "config_sha256": sha256_file(config_path),
                       "libraries": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    save_sweep(root, sweep)
    return root, run_trials(root, sweep, console)


def resume_sweep(sweep_dir: str | Path, console: Console) -> tuple[Path, dict]:
    """Continue a sweep: trials whose training finished are skipped, the others (re)train."""
    root = Path(sweep_dir)
    if not (root / SWEEP_FILE).exists():
        partial = (root / "trials").is_dir()
        raise TunewiseError(
            "the sweep was interrupted while it was being set up (no sweep.json)" if partial
            else f"not a tunewise sweep folder (no {SWEEP_FILE})",
            file=root,
            fix="start it again: tunewise sweep -c tunewise.yaml --grid ..." if partial
            else "pass a folder made by `tunewise sweep`, e.g. runs/20260101-120000-task-sweep",
        )
    sweep = read_json(root / SWEEP_FILE)
    done = sum(is_trained(trial_run(root, t)) for t in sweep["trials"])
    console.print(Text.assemble(("sweep ", "bold"), f"resuming {root}: {done} of {len(sweep['trials'])} trained"))
    return root, run_trials(root, sweep, console)


def trial_run(root: Path, trial: dict) -> RunDir:
    return RunDir(root / "trials" / trial["name"])


def is_trained(run: RunDir) -> bool:
    return run.config.exists() and STAGES["train"][1](run, load_config(run.config))


def trial_result(run: RunDir) -> dict:
    """What the table shows, from the trial's train_summary.json."""
    summary = TrainSummary.read(run.train_summary).to_json()
    return {key: summary.get(key) for key in RESULT_KEYS}


def pick_winner(trials: list[dict]) -> str | None:
    """The trained trial with the lowest best validation loss; ties: fewer steps."""
    done = [t for t in trials if t["status"] == TRAINED and math.isfinite(t.get(METRIC) or math.nan)]
    return min(done, key=lambda t: (t[METRIC], t["steps"]))["name"] if done else None


def run_trials(root: Path, sweep: dict, console: Console) -> dict:
    """Train every trial not trained yet, in order; sweep.json is rewritten after each one."""
    trials, n = sweep["trials"], len(sweep["trials"])
    sweep["state"] = "running"
    current: dict | None = None
    try:
        for k, trial in enumerate(trials, 1):
            current = trial
            run = trial_run(root, trial)
            config = load_config(run.config)
            version = DataManifest.read(run.manifest).version if run.manifest.exists() else None
            if version != sweep["dataset_version"]:
                raise TunewiseError(
                    f"{trial['name']} has dataset {version}, not the sweep's {sweep['dataset_version']}: "
                    "its trials would not be compared on the same validation split",
                    file=run.manifest, fix="start a new sweep: tunewise sweep -c tunewise.yaml ...",
                )
            label = " ".join(trial["overrides"])
            todo = [name for name in ("decide", "train") if not STAGES[name][1](run, config)]
            if not todo:
                trial.update(trial_result(run), status=TRAINED, error=None)
                console.print(Text.assemble((f"trial {k}/{n}", "bold"), f": {label} ", ("(trained already)", "dim")))
                continue
            console.print(Text.assemble((f"trial {k}/{n}", "bold"), f": {label}"))
            for key in RESULT_KEYS:  # a result from before, whose files are gone, is no longer this trial's
                trial.pop(key, None)
            trial.update(status="running", error=None)
            atomic_write_json(root / SWEEP_FILE, sweep)
            try:
                run_stages(run, config, console, stages=todo)  # trial status as `tunewise run` sets it
            except TunewiseError as err:  # e.g. NaN loss at this learning rate: record it, go on
                trial.update(status="failed", error=str(err))
                console.print(Text(f"trial {k}/{n} failed: {err}", style="red"))
            else:
                trial.update(trial_result(run), status=TRAINED)
            sweep["winner"] = pick_winner(trials)
            save_sweep(root, sweep)
        current = None
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        if current is not None and current["status"] == "running":
            current.update(status="interrupted" if interrupted else "failed",
                           error=None if interrupted else str(err) or type(err).__name__)
        sweep["state"] = "interrupted" if interrupted else "failed"
        sweep["winner"] = pick_winner(trials)
        save_sweep(root, sweep)
        raise
    sweep["state"] = "complete"
    sweep["winner"] = pick_winner(trials)
    save_sweep(root, sweep)
    return sweep


# --- output: the table (terminal and HTML) and sweep.html

def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def trial_label(trial: dict) -> str:
    """'trial-01 lr=0.001 r=4': the trial and its swept values, short."""
    return " ".join([trial["name"], *(f"{k.rsplit('.', 1)[-1]}={_number(v)}" for k, v in trial["values"].items())])


def sweep_table(sweep: dict) -> tuple[list[str], list[tuple[list[str], bool]]]:
    """Columns and rows (cells, is the winner) of the comparison table."""
    columns = ["trial", *sweep["grid"], "best val loss", "at step", "steps", "time", "tokens/s", "status"]
    rows = []
    for trial in sweep["trials"]:
        winner = trial["name"] == sweep.get("winner")
        if trial["status"] == TRAINED:
            numbers = [f"{trial['best_val_loss']:.4f}", str(trial["best_step"]), str(trial["steps"]),
                       _duration(trial["seconds"]), f"{trial['tokens_per_second']:.0f}"]
            status = "best" if winner else ("done, stopped early" if trial.get("stopped_early") else "done")
        else:
            numbers = [""] * 5
            error = (trial.get("error") or "").split("\n", 1)[0]
            status = trial["status"] + (f": {error[:160]}{'...' if len(error) > 160 else ''}" if error else "")
        values = [_number(trial["values"][key]) for key in sweep["grid"]]
        rows.append(([trial["name"], *values, *numbers, status], winner))
    return columns, rows


def val_curves(root: Path, sweep: dict) -> tuple[dict[str, list[tuple[float, float]]], str]:
    """Validation loss per trial from its train_log.jsonl, against epoch (or step)."""
    logs = {}
    for trial in sweep["trials"]:
        log = trial_run(root, trial).train_log
        logs[trial_label(trial)] = [r for r in read_jsonl(log) if "val_loss" in r] if log.exists() else []
    x = "epoch" if all("epoch" in r for rows in logs.values() for r in rows) else "step"
    return {label: [(r[x], r["val_loss"]) for r in rows] for label, rows in logs.items()}, x


def write_sweep_report(root: Path, sweep: dict) -> Path:
    """sweep.html: the table, validation-loss curves and best loss per trial, self-contained."""
    columns, rows = sweep_table(sweep)
    winner = next((t for t in sweep["trials"] if t["name"] == sweep.get("winner")), None)
    best_label = trial_label(winner) if winner else None
    curves, x = val_curves(root, sweep)
    best = {trial_label(t): t.get(METRIC) if t["status"] == TRAINED else None for t in sweep["trials"]}
    env = Environment(loader=PackageLoader("tunewise.report", "templates"), autoescape=select_autoescape())
    html = env.get_template("sweep.html").render(
        sweep=sweep, columns=columns, rows=rows, winner=winner,
        winner_dir=str(root / "trials" / winner["name"]) if winner else None,
        failed=[t for t in sweep["trials"] if t.get("error")],
        curves_png=sweep_curves_plot(curves, xlabel=x, best=best_label),
        best_png=sweep_best_plot(best, best=best_label),
    )
    atomic_write_text(root / REPORT_FILE, html)
    return root / REPORT_FILE


def save_sweep(root: Path, sweep: dict) -> None:
    atomic_write_json(root / SWEEP_FILE, sweep)
    write_sweep_report(root, sweep)
