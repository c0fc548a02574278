"""`tunewise export RUN`: the fine-tune as files that other tools run, each with its model card.

    export/
      merged/               the adapter merged into the base: a standard transformers folder
                            (safetensors, config, tokenizer, chat template, generation_config.json
                            whose eos ids stop at the end of a chat turn) + README.md, the model card
      <task>-<quant>.gguf   the merged model for llama.cpp: converted by llama.cpp's converter,
                            quantized by libllama (llamacpp.py)
      Modelfile             for Ollama: FROM the GGUF, the chat template, the stops, the system prompt
      <task>-lora-<type>.gguf, <base>-<type>.gguf, adapter.Modelfile
                            with --gguf-adapter: the LoRA as a llama.cpp adapter over the base's GGUF
      parity.json           llama.cpp running each GGUF vs transformers running the merged model

The merge is PEFT's `merge_and_unload` on the base loaded in float32, so W + BA is computed and
rounded once; the merged weights are then saved in the base's own dtype, which keeps the merged
model a drop-in replacement for the base (same size, same precision the base was published in).
GGUF is made from the merged folder; without --merge that folder is built in a scratch folder and
removed. The GGUF is first converted in the merged model's own precision (lossless), checked in
llama.cpp against the merged model (same tokens, top-1 agreement, identical greedy outputs: a
failure stops the export), then quantized; the quantized file's agreement is measured and written
down. Every artifact is written in a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text

from tunewise.artifacts import (
    ArmMetrics,
    DataManifest,
    Provenance,
    Seeds,
    TrainPlan,
    TrainSummary,
    Verdict,
    Weights,
    WeightsKind,
    WeightsRecord,
    weights_in,
)
from tunewise.deploy import llamacpp, ollama
from tunewise.errors import TunewiseError
from tunewise.models import ChatFormat, load_chat, load_model, resolve_base
from tunewise.progress import progress_bar
from tunewise.runs import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    open_run_dir,
    read_json,
    replace_dir,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def trained_adapter(run: RunDir) -> Weights:
    """The run's trained weights: a LoRA/DoRA adapter folder, or the whole model (method: full);
    a TunewiseError if the run was not trained or its adapter cannot be merged (prompt tuning)."""
    weights = weights_in(run.adapter)
    if weights.kind is WeightsKind.WHOLE_MODEL and weights.safetensors:
        return weights  # a full fine-tune: already a model folder
    if weights.kind is WeightsKind.PROMPT_LEARNING:
        raise TunewiseError(
            f"a {weights.peft_type} adapter (method: prompt_tuning) adds trained vectors to every prompt; it has no "
            f"weights to merge into the model, so there is no merged model or GGUF to export",
            file=weights.config_file,
            fix="serve it as an adapter with PEFT (PeftModel.from_pretrained(base, adapter)), or train with "
                "method: lora to get a mergeable adapter",
        )
    if not (weights.is_adapter and weights.safetensors):
        missing = "adapter_config.json" if not weights.is_adapter else "adapter_model.safetensors"
        raise TunewiseError("the run has no trained adapter", file=run.adapter / missing,
                            fix=f"train it first: tunewise run --resume {run.root}")
    return weights


def base_dtype(base_path: Path) -> torch.dtype:
    """The dtype the base checkpoint is stored in (config.json), float32 when it does not say."""
    config = read_json(base_path / "config.json")
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)


def stop_ids(chat: ChatFormat) -> list[int]:
    """eos first (llama.cpp's eos), the end-of-turn token next (its eot), then the generation
    config's other eos ids; not the token that opens a user turn (no tool reads it as an end)."""
    eos = chat.tokenizer.eos_token_id
    ids = (eos, chat.stop_ids[0], *chat.stop_ids[1:])
    return list(dict.fromkeys(i for i in ids if i is not None and i != chat.opener_id))


def save_merged(model, chat: ChatFormat, target: Path, dtype: torch.dtype) -> None:
    """A standard transformers folder: weights in `dtype`, tokenizer, the chat template the run
    trained with (its settings as the template's defaults), every stop token."""
    tokenizer = chat.tokenizer
    stops = stop_ids(chat)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.to(dtype).save_pretrained(target)
    tokenizer.chat_template = chat.template_for_export()
    tokenizer.save_pretrained(target)
    # transformers writes the weights through a 0600 temp file; an artifact is an ordinary file
    mode = (target / "config.json").stat().st_mode & 0o777
    for path in target.iterdir():
        os.chmod(path, mode)


def tokenizer_dir(adapter: Path, base_path: Path) -> Path:
    """The tokenizer and chat template the adapter was trained with: saved next to it by training."""
    return adapter if (adapter / "tokenizer_config.json").exists() else base_path


def build_merged(base_path: Path, weights: Weights, target: Path, console: Console, *, model_name: str) -> torch.dtype:
    """Base (float32) + LoRA adapter -> PEFT merge_and_unload -> `target` in the base's dtype.

    Returns the dtype the weights were saved in."""
    from peft import PeftModel

    adapter = weights.folder
    dtype = base_dtype(base_path)
    chat = load_chat(base_path, model=model_name, tokenizer_folder=tokenizer_dir(adapter, base_path))
    with progress_bar(console) as progress:
        task = progress.add_task("merge", total=3, status=f"loading {base_path.name} in float32")
        if weights.kind is WeightsKind.WHOLE_MODEL:  # method: full: the run's own model folder
            model = load_model(adapter, dtype=torch.float32)
        else:
            base = load_model(base_path, dtype=torch.float32)
            progress.update(task, advance=1, status=f"merging {adapter}")
            model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        progress.update(task, advance=1, status=f"saving in {str(dtype).removeprefix('torch.')}")
        save_merged(model, chat, target, dtype)
        progress.update(task, advance=1, status="done")
    return dtype


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def export_run(
    run_dir: str | Path, out: str | Path | None = None, *, merge: bool = True, gguf: bool = False,
    quant: str = "q8_0", gguf_adapter: bool = False, check_parity: bool = True, console: Console,
) -> dict[str, Path]:
    """Export a trained run: the merged model folder, a GGUF file with its Ollama Modelfile, a GGUF
    LoRA adapter, each checked in llama.cpp, with a model card.

    Returns the written paths: "merged" (folder), "gguf", "modelfile", "adapter_gguf", "base_gguf",
    "adapter_modelfile", "parity" (files), "card" (README.md)."""
    if not (merge or gguf or gguf_adapter):
        raise TunewiseError("nothing to export", fix="ask for --merge, --gguf, --gguf-adapter or a mix")
    run = open_run_dir(run_dir)
    quant = llamacpp.check_quant(quant) if gguf or gguf_adapter else quant
    weights = trained_adapter(run)
    adapter = weights.folder
    if gguf_adapter and weights.kind is not WeightsKind.LORA:
        raise TunewiseError("a full fine-tune has no adapter to export as a GGUF LoRA", file=adapter,
                            fix="export the whole model with --gguf")
    if gguf or gguf_adapter:  # missing tools fail before minutes of merging
        llamacpp.converter_dir()
        llamacpp.library()
    record = trained_record(run)
    plan = record.plan
    base_path = resolve_base(plan.base)
    verdict = Verdict.read(run.verdict) if run.verdict.exists() else None
    _warn_unless_shipped(verdict, run, console)
    out = Path(out) if out is not None else run.export
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
        scratch = Path(scratch)
        merged = scratch / "merged"
        dtype = build_merged(base_path, weights, merged, console, model_name=plan.base)
        ready: dict[str, Path] = {}  # final name -> file in scratch
        if gguf or gguf_adapter:
            ready, parity = _gguf_files(run, plan, merged, base_path, adapter, scratch, quant, dtype,
                                        whole=gguf, lora=gguf_adapter, check_parity=check_parity, console=console)
            ready["parity.json"] = ("parity", scratch / "parity.json")
            atomic_write_json(scratch / "parity.json", parity)
        files = (["merged/"] if merge else []) + list(ready)
        card = model_card(run, record, verdict, dtype=dtype, files=files,
                          parity=parity if (gguf or gguf_adapter) else None)
        for name, (kind, path) in ready.items():
            os.replace(path, out / name)
            written[kind] = out / name
        if merge:
            atomic_write_text(merged / "README.md", card)
            _merged_record(run, record, dtype, files).write(merged / "tunewise.json")
            replace_dir(merged, out / "merged")
            written["merged"] = out / "merged"
            written["card"] = out / "merged" / "README.md"
        else:
            written["card"] = out / "README.md"
            atomic_write_text(written["card"], card)
    for kind, path in written.items():
        console.print(Text.assemble(("export ", "bold"), f"{kind}: {path}"))
    return written


def parity_prompts(run: RunDir, system_prompt: str, chat: ChatFormat, n: int = 4) -> list[str]:
    """The first test items as the fine-tune is prompted in evaluation and serving."""
    from tunewise.data import load_split, with_system

    if not run.split("test").exists():
        raise TunewiseError("the run has no test split to check the GGUF on", file=run.split("test"),
                            fix=f"prepare the data again: tunewise run --resume {run.root}")
    items = load_split(run.split("test"))[:n]
    return [chat.prompt(with_system(item.prompt_messages, system_prompt)) for item in items]  # the zero-shot prompt


def _gguf_files(run: RunDir, plan: TrainPlan, merged: Path, base_path: Path, adapter: Path, scratch: Path,
                quant: str, dtype: torch.dtype, *, whole: bool, lora: bool, check_parity: bool, console: Console,
                ) -> tuple[dict[str, tuple[str, Path]], dict]:
    """Convert, check in llama.cpp, quantize; returns {final name: (kind, scratch file)} and the
    parity record."""
    chat = load_chat(merged, model=plan.base)
    prompts = parity_prompts(run, plan.system_prompt, chat)
    lossless = llamacpp.LOSSLESS[str(dtype).removeprefix("torch.")]
    record: dict = {"prompts": len(prompts), "lossless_type": lossless, "checks": []}
    if check_parity:
        reference = _reference(merged, dtype)
    else:
        record = {"checked": False, "reason": "export --no-parity", "lossless_type": lossless, "checks": []}
        console.print(Text.assemble(("warning ", "yellow"), "--no-parity: the GGUF files were not run in llama.cpp "
                                    "against the merged model"))
    ready: dict[str, tuple[str, Path]] = {}
    task = slug(plan.task)

    def check(path: Path, *, exact: bool, lora_file: Path | None = None) -> None:
        if not check_parity:
            return
        console.print(f"checking {path.name} in llama.cpp against the merged model ({len(prompts)} test prompts)")
        result = llamacpp.parity(path, reference, chat, prompts, lora=lora_file)
        record["checks"].append({**result.record(), "lossless": exact, "lora": lora_file.name if lora_file else None})
        if result.token_difference is not None:
            console.print(Text.assemble(("warning ", "yellow"), (
                f"llama.cpp tokenizes {result.prompts - result.tokens_equal} of {result.prompts} test prompts "
                f"differently from transformers (first at token {result.token_difference['position']}: llama.cpp "
                f"{result.token_difference['llama.cpp']} vs {result.token_difference['transformers']}); prompts sent "
                "as text to llama.cpp or Ollama are not the ones the model was trained and evaluated on")))
        if exact and not result.passed():
            raise TunewiseError(
                f"llama.cpp does not reproduce the merged model with {path.name}: {result.tokens_equal}/"
                f"{result.prompts} prompts tokenized alike, top-1 agreement {result.top1_agreement:.3f}, "
                f"{result.greedy_equal}/{result.prompts} greedy outputs equal (e.g. llama.cpp "
                f"{result.example.get('llama.cpp')!r} vs {result.example.get('transformers')!r})",
                fix="export --merge still works; report the model family to tunewise")

    if whole:
        source = llamacpp.convert(merged, scratch / f"{task}-{lossless}.gguf", lossless, console=console)
        check(source, exact=True)
        name = f"{task}-{quant}.gguf"
        if quant == lossless:
            final = source
        elif quant in llamacpp.CONVERT_TYPES:
            final = llamacpp.convert(merged, scratch / name, quant, console=console)
        else:
            final = llamacpp.quantize(source, scratch / name, quant)
        if final is not source:
            check(final, exact=False)
            source.unlink()
        ready[name] = ("gguf", final)
        _write_modelfile(ready, "modelfile", scratch / "Modelfile", chat, name,
                         add_bos=llamacpp.gguf_adds_bos(final), system=plan.system_prompt, console=console)
    if lora:
        base_name = f"base-{slug(Path(plan.base).name)}-{lossless}.gguf"
        base_gguf = llamacpp.convert(base_path, scratch / base_name, lossless, console=console)
        lora_name = f"{task}-lora-{lossless}.gguf"
        lora_gguf = llamacpp.convert_lora(adapter, base_path, scratch / lora_name, lossless, console=console)
        check(base_gguf, exact=True, lora_file=lora_gguf)
        ready[base_name], ready[lora_name] = ("base_gguf", base_gguf), ("adapter_gguf", lora_gguf)
        _write_modelfile(ready, "adapter_modelfile", scratch / "adapter.Modelfile", chat, base_name,
                         adapter=lora_name, add_bos=llamacpp.gguf_adds_bos(base_gguf),
                         system=plan.system_prompt, console=console)
    return ready, record


def _reference(merged: Path, dtype: torch.dtype):
    """The merged model as parity's reference: float32 up to 3B parameters (exact logits), else in its
    own dtype (a 70B model in fp32 would not fit next to llama.cpp); on the GPU where there is one."""
    from tunewise.models.device import placement

    config = read_json(merged / "config.json")
    config = config.get("text_config") or config
    params = 12 * config.get("num_hidden_layers", 0) * config.get("hidden_size", 0) ** 2
    place = placement()
    return load_model(merged, dtype=torch.float32 if params < 3e9 else dtype,
                      place=place if place.device.type == "cuda" else None, spread=True).eval()


def _write_modelfile(ready: dict[str, tuple[str, Path]], kind: str, path: Path, chat: ChatFormat, gguf_name: str, *,
                     add_bos: bool, system: str | None, console: Console, adapter: str | None = None) -> None:
    """The Ollama Modelfile, or a warning saying why there is none (the GGUF is still right)."""
    try:
        text = ollama.modelfile(chat, gguf_name, add_bos=add_bos, system=system, adapter=adapter)
    except TunewiseError as err:
        console.print(Text.assemble(("warning ", "yellow"), f"no {path.name}: {err.message}"))
        return
    atomic_write_text(path, text)
    ready[path.name] = (kind, path)


def _warn_unless_shipped(verdict: Verdict | None, run: RunDir, console: Console) -> None:
    if verdict is None:
        console.print(Text.assemble(("warning ", "yellow"), f"no verdict yet ({run.verdict} is missing): "
                                    "the export is not evidence that the fine-tune beats the baselines"))
    elif not verdict.shipped:
        console.print(Text.assemble(("warning ", "yellow"), f"the verdict is {verdict.decision.value}: "
                                    f"{verdict.reason}"))


def trained_record(run: RunDir) -> WeightsRecord:
    """The adapter's tunewise.json, with the training plan export reads (base, task, system prompt,
    method, learning rate, adapter shape, seeds) instead of the config's defaults."""
    where = run.adapter_provenance
    record = WeightsRecord.read(where) if where.exists() else None
    if record is None or record.plan is None:
        raise TunewiseError(
            "the trained weights do not record their training plan (trained by a tunewise before the plan was "
            "saved with the weights), so export cannot say how they were trained", file=where,
            fix=f"train the run again with this tunewise: tunewise stage train {run.root}; or export with the "
                "tunewise that trained it")
    return record


def _merged_record(run: RunDir, record: WeightsRecord, dtype: torch.dtype, files: list[str]) -> WeightsRecord:
    """The merged model's tunewise.json: the adapter's record (step, chat format, plan) plus the export's."""
    merged = WeightsRecord.from_json(record.to_json())
    merged.export = {"provenance": Provenance.of(run, Seeds(**record.plan.seeds)).to_json(),
                     "merged_dtype": str(dtype).removeprefix("torch."), "files": files}
    return merged


# --- the model card ---------------------------------------------------------------------------

def _ci(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    if stat.get("low") is None or stat["low"] == stat["high"]:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"


def metric_table(run: RunDir, arms: list[str]) -> str:
    """Markdown table: one row per metric, one column per arm, mean [95% CI] on the test split."""
    metrics = {arm: ArmMetrics.read(run.metrics(arm)).metrics for arm in arms if run.metrics(arm).exists()}
    if not metrics:
        return "No metrics were found in the run folder.\n"
    arms = list(metrics)
    names = list(dict.fromkeys(name for arm in arms for name in metrics[arm]))
    lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    lines += [f"| {name} | " + " | ".join(_ci(metrics[arm].get(name)) for arm in arms) + " |" for name in names]
    return "\n".join(lines) + "\n"


METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA (4-bit NF4 base)", "dpo": "LoRA trained with DPO",
                "orpo": "LoRA trained with ORPO"}


def _method(plan: TrainPlan, summary: TrainSummary | None) -> str:
    """The method as training ran it, from the plan saved with the weights: the method, the adapter's
    shape and the learning rate training resolved, not the config's unset defaults."""
    shape = plan.adapter
    if plan.method == "full":
        text = "full fine-tuning (every weight)"
    else:
        targets = shape.get("target_modules") or []
        targets = targets if isinstance(targets, str) else ", ".join(sorted(targets))
        text = (f"{METHOD_NAMES.get(plan.method, plan.method)} (r={shape.get('r')}, alpha={shape.get('alpha')}, "
                f"dropout={shape.get('dropout')}, target modules: {targets})")
    text += (f", learning rate {plan.lr:g}{' (the default for ' + plan.method + ')' if plan.lr_default else ''}, "
             f"{plan.schedule} schedule, global batch {plan.global_batch}, {plan.epochs} epoch(s)")
    if summary is not None:
        text += (f", {summary.steps} steps on {summary.train_examples} examples; best validation loss "
                 f"{summary.best_val_loss:.4f} at step {summary.best_step} (kept)")
    return text


def _seeds(provenance: Provenance | None) -> str:
    seeds = provenance.seeds if provenance else {}
    return ", ".join(f"{k} {v}" for k, v in seeds.items()) or "n/a"


def _verdict_section(verdict: Verdict | None) -> list[str]:
    if verdict is None:
        return ["## Verdict", "", "**No verdict**: this run was not evaluated against its baselines. "
                "Run `tunewise eval RUN` before relying on it.", ""]
    primary = verdict.primary_metric
    best = verdict.best_baseline
    diff, test = verdict.difference, verdict.test
    lines = ["## Verdict", "", f"**{verdict.decision.value}.** {verdict.reason}", "",
             f"- primary metric: `{primary}` on {verdict.n_items} held-out test items",
             f"- best baseline: `{best}`; fine-tune minus best baseline: {diff['mean']:+.3f} "
             f"(95% CI {diff['low']:+.3f} to {diff['high']:+.3f}), {test['name']} p={test['p_value']:.3g}; "
             f"required margin {verdict.margin}, alpha {verdict.alpha}",
             "", "| arm | mean " + primary + " | fine-tune minus arm (95% CI) |", "|---|---|---|"]
    for arm, mean in verdict.means.items():
        comparison = verdict.comparisons.get(arm)
        delta = "—" if comparison is None else (
            f"{comparison['difference']['mean']:+.3f} ({comparison['difference']['low']:+.3f} to "
            f"{comparison['difference']['high']:+.3f})")
        lines.append(f"| {arm} | {mean:.3f} | {delta} |")
    return lines + [""]


def _limits(verdict: Verdict | None, base: str, manifest: DataManifest | None) -> list[str]:
    counts = manifest.counts if manifest else {}
    lines = ["## Limits", "",
             f"- Evaluated only on the held-out test split of the same data ({counts.get('test', '?')} items); "
             "performance on other inputs is unmeasured.",
             f"- Inherits the base model's ({base}) knowledge, biases and context limits.",
             "- GGUF files in 4-8 bits are quantized: their outputs can differ slightly from the merged model."]
    flags = verdict.red_flags if verdict is not None else []
    if verdict is not None and not verdict.shipped:
        lines.append(f"- The verdict is {verdict.decision.value}: prefer `{verdict.best_baseline}` for this task.")
    if flags:
        lines += [f"- Red flag{' (blocking)' if f.get('blocking') else ''}: {f['message']}" for f in flags]
    elif verdict is not None:
        lines.append("- Red flags checked (overfitting, length drift, refusals, forgetting): none found.")
    return lines + [""]


def _parity_lines(parity: dict | None) -> list[str]:
    if parity is None:
        return []
    if parity.get("checked") is False:
        return ["- GGUF: not run in llama.cpp against the merged model (exported with --no-parity)"]
    lines = [f"- GGUF run in llama.cpp against the merged model on {parity['prompts']} test prompts (parity.json):"]
    for c in parity["checks"]:
        lines.append(f"  - `{c['file']}`{' + `' + c['lora'] + '`' if c.get('lora') else ''}: top-1 agreement "
                     f"{c['top1_agreement']:.3f}, greedy answers equal {c['greedy_equal']}/{c['prompts']}, same "
                     f"token ids {c['tokens_equal']}/{c['prompts']}")
    return lines


def model_card(run: RunDir, record: WeightsRecord, verdict: Verdict | None, *, dtype: torch.dtype,
               files: list[str], parity: dict | None = None) -> str:
    """README.md for the export: base, method, data version, verdict, metrics, intended use, limits;
    `record` is the trained weights' tunewise.json (trained_record: it has the plan)."""
    manifest = DataManifest.read(run.manifest) if run.manifest.exists() else None
    plan, provenance = record.plan, record.provenance
    dataset = (manifest.version if manifest else None) or (provenance.dataset_version if provenance else None) \
        or "unknown"
    counts = manifest.counts if manifest else {}
    arms = list(verdict.means) if verdict is not None else ["finetuned"]
    lines = [
        "---", f"base_model: {plan.base}", "library_name: transformers",
        "pipeline_tag: text-generation", f"tags: [tunewise, {plan.method.replace('_', '-')}, merged]", "---", "",
        f"# {plan.task}: {plan.base} fine-tuned with tunewise", "",
        "## Model", "",
        f"- Base model: `{plan.base}`",
        f"- Method: {_method(plan, record.train)}; merged into the base weights in float32 "
        f"(PEFT `merge_and_unload`), saved in {str(dtype).removeprefix('torch.')}",
        f"- Dataset version: `{dataset}` (train/val/test: {counts.get('train', '?')}/{counts.get('val', '?')}/"
        f"{counts.get('test', '?')} examples, {manifest.split_strategy if manifest else '?'} split)",
        f"- Run: `{run.root.name}`; config sha256 `{provenance.config_sha256 if provenance else 'n/a'}`; "
        f"seeds {_seeds(provenance)}",
        f"- Files: {', '.join(f'`{f}`' for f in files)}", *_parity_lines(parity), "",
        *_verdict_section(verdict),
        "## Metrics", "", "Mean on the held-out test split, with 95% bootstrap interval.", "",
        metric_table(run, arms),
        "## Intended use", "",
        f"The task `{plan.task}`, on inputs like the training data. Prompt it the way it was trained: "
        "through the chat template shipped with the tokenizer"
        + (f", with this system prompt:\n\n> {plan.system_prompt}" if plan.system_prompt else "")
        + "\n\nGeneration stops at the end-of-turn token (generation_config.json / the GGUF's eos and eot ids; "
        "the Modelfile's `PARAMETER stop` lines for Ollama).", "",
        *_limits(verdict, plan.base, manifest),
        "## Provenance", "",
        "Libraries at training time: "
        + (", ".join(f"{k} {v}" for k, v in (provenance.libraries if provenance else {}).items()) or "n/a") + ".",
        "",
    ]
    return "\n".join(lines)
