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
from rich.text import Text

from tunewise.errors import TunewiseError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Decide whether to fine-tune, prepare the data, beat the baselines, ship.")
model_app = typer.Typer(no_args_is_help=True, help="Base models.")
app.add_typer(model_app, name="model")
data_app = typer.Typer(no_args_is_help=True, help="Check and prepare data files.")
app.add_typer(data_app, name="data")
registry_app = typer.Typer(no_args_is_help=True, help="Adapter versions, promotion, canary routes, rollback.")
app.add_typer(registry_app, name="registry")
console = Console(highlight=False, soft_wrap=True)

DEMO = "debian-sections"
RunsOpt = Annotated[Path, typer.Option("--runs", help="Folder that holds the run folders.")]
RegistryOpt = Annotated[Optional[Path], typer.Option("--registry", help="Registry folder [default: $TUNEWISE_HOME/registry].")]


def _example_dir() -> Path:
    return Path(str(resources.files("tunewise") / "examples" / DEMO))


def _print_verdict(run, verdict) -> None:
    from tunewise.report.terminal import print_verdict

    print_verdict(console, verdict, run)


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
    _print_verdict(run_dir, verdict)


@app.command()
def train(
    resume: Annotated[Path, typer.Option("--resume", help="The run folder to continue training.")],
) -> None:
    """Train a run (from its newest checkpoint after a crash, Ctrl-C or kill -9). Under
    `torchrun --nproc_per_node N -m tunewise train --resume RUN` it trains data-parallel."""
    from tunewise.pipeline import train_run
    from tunewise.report.terminal import print_trained

    summary = train_run(resume, console)
    if summary is not None:
        print_trained(console, summary, resume)


@app.command()
def sweep(
    config: Annotated[Optional[Path], typer.Option("-c", "--config", help="tunewise.yaml")] = None,
    grid: Annotated[list[str], typer.Option(
        "--grid", help="Values to try, repeatable: --grid train.lr=1e-4,2e-4,4e-4. Without --grid: "
        "train.lr=1e-4,2e-4,4e-4 x lora.r=8,16 x train.epochs=1,2.")] = [],
    set_: Annotated[list[str], typer.Option("--set", help="Override a key in every trial: --set train.batch_size=8")] = [],
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this sweep folder.")] = None,
    runs: RunsOpt = Path("runs"),
) -> None:
    """Train every combination of a grid of settings, one after another; pick the best by validation loss."""
    from tunewise.report.terminal import print_sweep
    from tunewise.sweep import resume_sweep, run_sweep, sweep_table

    if resume is not None:
        if config is not None or grid or set_:
            raise TunewiseError("--resume continues a sweep with the trials it was planned with",
                                fix="drop -c, --grid and --set, or start a new sweep without --resume")
        root, result = resume_sweep(resume, console)
    elif config is not None:
        root, result = run_sweep(config, grid, set_, runs, console)
    else:
        raise TunewiseError("nothing to sweep", fix="pass -c tunewise.yaml (or --resume SWEEP_DIR)")
    print_sweep(console, sweep_table(result), result, root)
    if result["winner"] is None:
        raise typer.Exit(1)


@app.command()
def demo(
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set data.max_examples=500")] = [],
    runs: RunsOpt = Path("runs"),
) -> None:
    """Run the whole pipeline on the bundled Debian sections task with the embedded model."""
    from tunewise.pipeline import run_pipeline

    run_dir, verdict = run_pipeline(_example_dir() / "tunewise.yaml", set_, runs, console)
    _print_verdict(run_dir, verdict)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder made by `tunewise run`.")],
    set_: Annotated[list[str], typer.Option("--set", help="Change an eval key: --set eval.max_test=50")] = [],
) -> None:
    """Evaluate a trained run again: every arm, metric, judge, red flag, verdict and report."""
    from tunewise.pipeline import evaluate_run

    run, verdict = evaluate_run(run_dir, set_, console)
    _print_verdict(run, verdict)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="decide | baseline | train | evaluate | judge | verdict | report")],
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
    from tunewise.report.terminal import print_decision
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
    print_decision(console, decision)
    if output is not None:
        atomic_write_json(output, decision.to_dict())


FilesArg = Annotated[Optional[list[Path]], typer.Argument(help="Data files (JSONL, JSON, CSV, Parquet, datasets folder).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("-c", "--config", help="Take data/task settings from tunewise.yaml.")]
MapOpt = Annotated[Optional[str], typer.Option("--map", help="Rename fields: question=user,answer=assistant")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Stop at the first bad row (the file is not read on).")]
ModelOpt = Annotated[str, typer.Option("--model", help="Base model whose chat template counts tokens.")]
MaxLenOpt = Annotated[Optional[int], typer.Option("--max-seq-len", help="Drop (and count) longer examples.")]
SemanticOpt = Annotated[bool, typer.Option("--semantic/--no-semantic", help="Embedding near-duplicates (slower).")]
SplitOpt = Annotated[str, typer.Option("--split", help="auto | random | stratified | group | time")]
KeyOpt = Annotated[Optional[str], typer.Option(help="Field for split: group / time.")]
EvalOpt = Annotated[list[Path], typer.Option("--eval-file", help="An eval set training must not overlap.")]


def _data_settings(*, map_, strict, max_seq_len, semantic, split, group_key, time_key, eval_file):
    """The data options as DataSettings (a config file given with -c replaces them)."""
    from tunewise.data import DataSettings, parse_mapping

    if split == "group" and not group_key or split == "time" and not time_key:
        raise TunewiseError(f"--split {split} needs --{split}-key FIELD", field="--split")
    return DataSettings(split=split, group_key=group_key, time_key=time_key, strict=strict,
                        mapping=parse_mapping(map_), max_seq_len=max_seq_len,
                        semantic_threshold=0.95 if semantic else None, eval_files=tuple(str(p) for p in eval_file))


@data_app.command("check")
def data_check(
    files: FilesArg = None, config: ConfigOpt = None, map_: MapOpt = None, strict: StrictOpt = False,
    model: ModelOpt = "smollm2-135m-instruct", max_seq_len: MaxLenOpt = None, semantic: SemanticOpt = True,
    split: SplitOpt = "auto", group_key: KeyOpt = None, time_key: KeyOpt = None, eval_file: EvalOpt = [],
) -> None:
    """Validate, clean and split in memory; print a summary; write nothing. Exit 1 if rows were rejected."""
    from tunewise.data import preview_rows
    from tunewise.pipeline import data_in_memory
    from tunewise.report.terminal import print_data_check

    options = _data_settings(map_=map_, strict=strict, max_seq_len=max_seq_len, semantic=semantic, split=split,
                             group_key=group_key, time_key=time_key, eval_file=eval_file)
    prepared, settings, chat = data_in_memory(files or [], config, options, model, console)
    print_data_check(console, prepared, preview_rows(chat, prepared.splits["train"], settings.system_prompt, n=2))
    if prepared.problems:
        raise typer.Exit(1)


@data_app.command("prepare")
def data_prepare(
    files: FilesArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for splits, manifest and report.")] = Path("data"),
    config: ConfigOpt = None, map_: MapOpt = None, strict: StrictOpt = False,
    model: ModelOpt = "smollm2-135m-instruct", max_seq_len: MaxLenOpt = None, semantic: SemanticOpt = True,
    split: SplitOpt = "auto", group_key: KeyOpt = None, time_key: KeyOpt = None, eval_file: EvalOpt = [],
) -> None:
    """Write train/val/test splits, rejected.jsonl, manifest.json and report.html into -o DIR."""
    from tunewise.pipeline import data_in_memory, write_data_folder
    from tunewise.report.terminal import print_data_summary

    options = _data_settings(map_=map_, strict=strict, max_seq_len=max_seq_len, semantic=semantic, split=split,
                             group_key=group_key, time_key=time_key, eval_file=eval_file)
    prepared, settings, chat = data_in_memory(files or [], config, options, model, console)
    manifest = write_data_folder(prepared, output, settings, chat)
    print_data_summary(console, manifest, prepared.problems)
    console.print(f"wrote {output}/{{train,val,test}}.jsonl, rejected.jsonl, manifest.json, report.html")


@app.command("import-axolotl")
def import_axolotl(
    axolotl_config: Annotated[Path, typer.Argument(help="An Axolotl config (.yml).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write tunewise.yaml.")] = Path("tunewise.yaml"),
    data: Annotated[list[Path], typer.Option("--data", help="A local copy of a hub dataset, in order; repeatable.")] = [],
    task: Annotated[Optional[str], typer.Option("--task", help="task.name [default: the file's name].")] = None,
) -> None:
    """Write the tunewise.yaml equivalent of an Axolotl config; list every key not carried over and why."""
    from tunewise.interop.axolotl import import_axolotl as translate
    from tunewise.runs import atomic_write_text

    if output.exists():
        raise TunewiseError("would overwrite it", file=output, fix="choose another -o path")
    imported = translate(axolotl_config, data, task)
    atomic_write_text(output, imported.yaml(axolotl_config))
    for key, why in imported.skipped.items():
        console.print(Text(f"not carried over: {key}: {why}", style="yellow"))
    console.print(f"wrote {output}; next: tunewise data check -c {output}, then tunewise run -c {output}")


@app.command("export-axolotl")
def export_axolotl(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder [default: RUN/axolotl].")] = None,
) -> None:
    """Write the run's recipe as an Axolotl config with its train and validation splits."""
    from tunewise.interop.axolotl import export_axolotl as write

    written = write(run_dir, out or Path(run_dir) / "axolotl")
    console.print(f"wrote {written} with train.jsonl and val.jsonl; run it with: axolotl train {written}")


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


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
    merge: Annotated[bool, typer.Option("--merge", help="Write the adapter merged into the base (safetensors).")] = False,
    gguf: Annotated[bool, typer.Option("--gguf", help="Write a GGUF file and an Ollama Modelfile (llama.cpp).")] = False,
    quant: Annotated[str, typer.Option(
        "--quant", help="GGUF type: f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q5_0, q4_0, ...")] = "q8_0",
    gguf_adapter: Annotated[bool, typer.Option(
        "--gguf-adapter", help="Write the LoRA as a GGUF adapter with the base's GGUF (llama.cpp --lora, Ollama "
                               "ADAPTER).")] = False,
    parity: Annotated[bool, typer.Option(
        "--parity/--no-parity", help="Run each GGUF in llama.cpp against the merged model on the run's test "
                                     "prompts (it holds both in memory).")] = True,
    out: Annotated[Optional[Path], typer.Option("--out", help="Export folder [default: RUN/export].")] = None,
) -> None:
    """Export a run's fine-tune: merged transformers folder with a model card, GGUF files checked in llama.cpp."""
    from tunewise.deploy.export import export_run

    if not (merge or gguf or gguf_adapter):
        raise TunewiseError("nothing to export", fix="add --merge, --gguf, --gguf-adapter or a mix")
    export_run(run_dir, out, merge=merge, gguf=gguf, quant=quant, gguf_adapter=gguf_adapter, check_parity=parity,
               console=console)  # prints what it wrote


def _adapter_options(values: list[str]) -> dict[str, Path]:
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise TunewiseError(f"--adapter '{value}' is not NAME=FOLDER", field="--adapter",
                                fix="e.g. --adapter sections=runs/<run>/adapter")
        if name in adapters:
            raise TunewiseError(f"--adapter name '{name}' is given twice", field="--adapter")
        adapters[name] = Path(path)
    return adapters


def _registry(folder: Optional[Path], *, must_exist: bool = False):
    from tunewise.deploy.registry import Registry

    if folder is None:
        registry = Registry.default()
    elif must_exist and not folder.is_dir():
        raise TunewiseError("no registry folder here", file=folder, fix="tunewise registry add NAME RUN creates one")
    else:
        registry = Registry(folder)
    return registry


@app.command()
def serve(
    adapter: Annotated[list[str], typer.Option("--adapter", help="NAME=FOLDER of a PEFT adapter; repeatable.")] = [],
    base: Annotated[str, typer.Option("--base", help="Base model: embedded name, folder or hub id.")] = "smollm2-135m-instruct",
    registry: RegistryOpt = None,
    no_registry: Annotated[bool, typer.Option("--no-registry", help="Serve only --adapter, no registry routes.")] = False,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Environment variable holding the API key; every endpoint but /health then needs it.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=256, help="Requests per generation batch.")] = 8,
    engine: Annotated[str, typer.Option("--engine", help="builtin (this machine) or vllm (GPU, scale-out).")] = "builtin",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repository's own code (off: safer).")] = False,
) -> None:
    """Serve the base model and adapters over an OpenAI-compatible API, with the registry's canary routes."""
    from tunewise.deploy.serving import ServeSettings
    from tunewise.deploy.serving import serve as serve_with

    settings = ServeSettings(base=base, adapters=_adapter_options(adapter),
                             registry=None if no_registry else _registry(registry), host=host, port=port,
                             api_key_env=api_key_env, max_batch=max_batch, trust_remote_code=trust_remote_code)
    serve_with(engine, settings, console)


@registry_app.command("list")
def registry_list(
    name: Annotated[Optional[str], typer.Argument(help="Only this adapter name.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Every version with its verdict, dataset version and route state."""
    from tunewise.report.terminal import print_registry

    reg = _registry(registry)
    print_registry(console, reg.versions(name), reg.routes())


@registry_app.command("add")
def registry_add(
    name: Annotated[str, typer.Argument(help="Adapter name clients will ask for.")],
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
    registry: RegistryOpt = None,
) -> None:
    """Copy a run's adapter into the registry as the name's next version."""
    v = _registry(registry).add(name, run_dir)
    console.print(f"added {v.name} v{v.version} (verdict: {v.decision or 'none'}); promote it with "
                  f"`tunewise registry promote {v.name}`")


@registry_app.command("promote")
def registry_promote(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    version: Annotated[Optional[int], typer.Argument(help="Version number [default: the newest].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even without a SHIP verdict.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Send all of the name's traffic to a version."""
    v = _registry(registry).promote(name, version, force=force)
    console.print(f"{v.name}: v{v.version} is current")


@registry_app.command("canary")
def registry_canary(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    version: Annotated[Optional[int], typer.Argument(help="Version number [default: the newest].")] = None,
    share: Annotated[float, typer.Option("--share", help="Share of traffic for the canary, e.g. 0.1.")] = 0.1,
    force: Annotated[bool, typer.Option("--force", help="Canary even without a SHIP verdict.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Send a share of the name's traffic to a new version, the rest to the current one."""
    route = _registry(registry).canary(name, version, share, force=force)
    console.print(f"{name}: {route.share:.0%} to v{route.canary.version}, the rest to v{route.current.version}")


@registry_app.command("rollback")
def registry_rollback(
    name: Annotated[str, typer.Argument(help="Adapter name.")],
    registry: RegistryOpt = None,
) -> None:
    """Drop the canary, or go back to the previously promoted version; servers follow without a restart."""
    route = _registry(registry).rollback(name)
    current = f"v{route.current.version}" if route.current else "nothing"
    console.print(f"{name}: all traffic to {current}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill` gets the same clean stop as Ctrl-C: status says interrupted


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5: noise
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
