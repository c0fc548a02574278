"""Training-speed benchmark: tunewise's LoRA training path against TRL's SFTTrainer, and the ceiling.

Run: .venv/bin/python bench/train_speed.py [--examples N] [--steps S] [--batch-size B] [--repeats R]
                                           [--tools tunewise,tunewise-plain,tunewise-seed1,trl-default,trl-tuned,
                                                    trl-tuned-padded,trl-default-fp32]
                                           [--threads T] [--val-examples V] [--run RUN_DIR]
(the `bench` extra installs TRL: pip install -e '.[bench]').

Every tool trains the same thing: the embedded SmolLM2-135M-Instruct, the first N examples of the
demo run's train split (the newest folder under runs/ with data/train.jsonl, or --run), each chat
with the task's system prompt prepended as tunewise does (`with_system`), LoRA r=16, alpha=32,
dropout 0.05 on q/k/v/o, learning rate 2e-4, seed 0, S optimizer steps of B examples (one pass
over the N = S*B examples, so every tool sees every example once). Each run is its own
subprocess (peak RSS is that run's own `ru_maxrss`: model, data, training); repeats alternate
the order of the tools (A B C, C B A, ...) so drift on a shared CPU hits all of them.

The tools:
1. `tunewise`: the real `tunewise.train.loop.train_model(run, settings, console, track)` on a temporary run
   folder (`RunDir`) whose data/train.jsonl is the N examples and data/val.jsonl the V validation
   examples, with the demo config and train.epochs=1, train.batch_size=B (so 1 epoch = S steps),
   lora.r=16, lora.alpha=32, train.evals_per_epoch=1, train.patience=null, train.save_every=S.
   Everything else is tunewise's default path (bf16 weights and autocast where the CPU has native
   bf16, LoRA in fp32, length-grouped batches, loss and LM head on assistant tokens only).
   The last three settings put its validation and checkpoint writes after the last step, outside
   the timed window (they happen before the first and after the last optimizer step).
1b. `tunewise-plain`: the same with train.fast_path=false, the unoptimized reference path: the model
   and PEFT exactly as they come (SDPA attention, nn.Dropout, PEFT's fp32 casts, transformers'
   RMSNorm). "Same learning" compares tunewise's validation loss with this one.
1c. `tunewise-seed1`: tunewise with train.seed=1 (another LoRA init, dropout stream and batch
   order): the yardstick for what seed noise alone moves the validation loss by.
2. `trl-default`: `SFTTrainer(model=<model folder>, train_dataset=<"messages" dataset>,
   args=SFTConfig(...), peft_config=LoraConfig(...))` as TRL's quickstart does, with SFTConfig
   defaults apart from output_dir, max_steps=S, per_device_train_batch_size=B, learning_rate,
   seed, logging (logging_steps=1, report_to="none", disable_tqdm) and save_strategy="no" (no
   checkpoint inside the timed steps), plus use_cpu=True on a machine without a GPU: TRL defaults
   to bf16=True, and transformers refuses that without a GPU ("Your setup doesn't support
   bf16/gpu. You need to assign use_cpu ..."), so TRL's literal defaults do not start on a CPU;
   use_cpu=True is the change that error asks for and keeps every other default. TRL's own
   defaults then are: fp32 weights (model_init_kwargs dtype float32), bf16 CPU autocast,
   gradient_checkpointing=True, loss on every token, padding to the longest example of a random
   batch, adamw_torch_fused, linear schedule, and its fused LM head, which off Triton devices
   scores every position (with entropy and top-1 for its metrics).
3. `trl-tuned`: TRL's best settings for this job: a prompt-completion dataset (prompt = system +
   user turns, completion = the assistant turn), so completion_only_loss is on
   (assistant_only_loss=True is refused by TRL for SmolLM2's chat template, which has no
   `{% generation %}` markers and is not in TRL's list of templates it can patch; the child says
   so in its notes), padding_free=True with max_length=None (TRL requires that without packing;
   transformers' SDPA path builds a block-diagonal mask from position_ids, so packed examples
   do not attend to each other), bf16=True, gradient_checkpointing=False and the base model
   loaded in bf16 (model_init_kwargs={"dtype": "bfloat16"}; PEFT keeps LoRA in fp32).
   Packing (packing=True) is not used: it changes how many examples a step holds, so the same
   steps would no longer be the same examples.
4. `trl-tuned-padded`: as trl-tuned but padded batches grouped by length
   (train_sampling_strategy="group_by_length") instead of padding-free: on CPU, padding-free
   attention runs over the whole flattened batch under a mask, which may cost more than the
   padding it saves. The "TRL tuned" target uses whichever of the two tuned runs is faster.
5. `trl-default-fp32`: trl-default with bf16=False instead of use_cpu=True,
   the other way to make TRL's defaults start on a CPU: fp32 throughout.

Figures per tool (median over repeats where there are several):
- tokens/s: all tokens of the N examples (prompt and completion, tunewise's chat-template
  encoding, no padding; the same count for every tool) / training seconds. Training seconds run
  from the first forward with gradients enabled to the end of the S-th optimizer step (global
  torch hooks, the same for every tool): model loading, tokenization, validation and saving are
  outside. Each tool's own token count is checked against this one.
- s/epoch: the full train split's tokens / tokens/s.
- peak RSS: `ru_maxrss` of the run's subprocess.
- final train loss: the last step's loss as the tool logs it, over its own loss tokens (TRL
  default's is over every token, so it is not comparable with the others).
- val loss: one shared function (`validation_loss` below) after training, for every tool's
  adapter: the base model in fp32 plus the adapter, token-weighted cross-entropy on the assistant
  tokens (tunewise's labels) of the first V examples of the val split. The base model's own
  value is printed as the starting point. Per-example paired differences against tunewise give
  a 95% interval for "same learning".

The ceiling. The machine's rate is a bf16 `torch.matmul` loop on 2048x2048 matrices with the
same thread count, measured before and after the runs (the higher is used). The work one
training token really needs, in FLOPs, counted from the model config and the benchmark's data
(`flops_per_token`):
- frozen base linears of every block (q, k, v, o, gate, up, down; P = their weights per block):
  forward 2P, backward input-gradient 2P (no weight gradients: they are frozen); block 0's
  q/k/v need no input gradient (the embeddings are frozen), so 2*(its q+k+v weights) less;
- LoRA on each of q/k/v/o (d_in x d_out, rank r): forward 2r(d_in + d_out), backward
  2r*d_out for B's gradient, 2r*d_out for the gradient of x*A, 2r*d_in for A's gradient,
  2r*d_in for the input gradient (not in block 0's q/k/v), so up to 6r(d_in + d_out);
- attention scores: a token at position t of an example attends to t positions (causal);
  per layer QK^T and PV cost 2*t*(heads*head_dim) each forward, and their backward twice that:
  12*t*heads*head_dim a layer, averaged over the benchmark's real example lengths;
- LM head only where the loss is taken: 2*H*V forward plus 2*H*V input gradient (the head is
  tied to the frozen embedding: no weight gradient) per supervised token, times the share of
  tokens that are supervised.
Norms, activations, RoPE, softmax and the optimizer (1.8M parameters) are not counted: they are
not matrix products, so the ceiling is optimistic. ceiling tokens/s = rate / work per token.
The rate is also measured for 1.5 s just before and after every run: "of local ceiling" divides a
run's tokens/s by that local rate's ceiling, to tell a slower tool from a machine that slowed down
(on a shared VM the rate drifted by 8% within one benchmark). The 60% target uses the strict one.

Targets (issue 5): tunewise >= 5x TRL defaults and >= 2x TRL tuned in tokens/s; tunewise >= 60%
of the ceiling; the same learning as the unoptimized path (tunewise - tunewise-plain validation
loss within its paired 95% interval of 0, or no larger than the seed-1 run's difference). The
script prints whether each holds in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("tunewise", "tunewise-plain", "tunewise-seed1", "trl-default", "trl-tuned", "trl-tuned-padded",
         "trl-default-fp32")
DEFAULT_TOOLS = TOOLS
OURS = ("tunewise", "tunewise-plain", "tunewise-seed1")
TUNED = ("trl-tuned", "trl-tuned-padded")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LR, SEED = 2e-4, 0
SETUP = {
    "tunewise": "train_model: bf16 weights+autocast, LoRA fp32, length-grouped, assistant-only loss and LM head, "
                "CPU fast path",
    "tunewise-plain": "as tunewise with train.fast_path=false: the unoptimized reference path (model and PEFT as "
                      "they come)",
    "tunewise-seed1": "as tunewise with train.seed=1 (LoRA init, dropout, batch order): what seed noise looks like",
    "trl-default": "SFTConfig defaults: fp32 weights, bf16 autocast, grad checkpointing, all-token loss, padded",
    "trl-tuned": "completion-only loss, padding_free, bf16 weights+autocast, no grad checkpointing",
    "trl-tuned-padded": "completion-only loss, group_by_length padding, bf16 weights+autocast, no grad ckpt",
    "trl-default-fp32": "as trl-default but bf16=False (fp32 throughout) instead of use_cpu=True",
}


# --------------------------------------------------------------------------- data


def newest_run(runs_root: Path) -> Path:
    runs = sorted(p for p in runs_root.iterdir() if (p / "data" / "train.jsonl").exists() and (p / "config.yaml").exists())
    if not runs:
        sys.exit(f"no prepared run under {runs_root}: run `make demo` (or `tunewise run`) first, or pass --run DIR")
    return runs[-1]


def encode(chat, examples, system_prompt: str):
    """Each example as tunewise trains it: the model's ChatFormat, labels on the answer only."""
    from tunewise.data import with_system

    return [chat.encode(with_system(e.messages, system_prompt)) for e in examples]


def supervised_positions(item) -> int:
    """Positions whose next token carries a label (where the LM head and loss are needed)."""
    from tunewise.models.chat import IGNORE

    return sum(1 for label in item.labels[1:] if label != IGNORE)


# --------------------------------------------------------------------------- ceiling


def matmul_rate(n: int = 2048, seconds: float = 3.0) -> float:
    """bf16 FLOP/s of a square matrix product loop on this machine, with torch's current threads."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    c = torch.empty(n, n, dtype=torch.bfloat16)
    for _ in range(2):
        torch.matmul(a, b, out=c)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, b, out=c)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - started)


def flops_per_token(config, rank: int, targets: list[str], lengths: list[int], supervised: int) -> dict[str, float]:
    """FLOPs one training token needs (see the module docstring), by part, averaged over the data."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    first_block = ("q_proj", "k_proj", "v_proj")  # their inputs come from frozen embeddings: no input gradient
    per_block = sum(i * o for i, o in shapes.values())
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) / 2 for n in lengths) / tokens  # causal query-key pairs per token
    lora_fwd = sum(2 * rank * (shapes[m][0] + shapes[m][1]) for m in targets) * layers
    lora_bwd = (sum(4 * rank * (shapes[m][0] + shapes[m][1]) for m in targets) * layers
                - sum(2 * rank * shapes[m][0] for m in targets if m in first_block))
    return {
        "base forward": 2 * per_block * layers,
        "base backward (input grad)": 2 * per_block * layers - sum(2 * i * o for m, (i, o) in shapes.items()
                                                                  if m in first_block),
        "LoRA fwd+bwd": lora_fwd + lora_bwd,
        "attention scores": 12 * pairs * heads * hd * layers,
        "LM head (supervised only)": 4 * h * config.vocab_size * supervised / tokens,
    }


# --------------------------------------------------------------------------- shared validation loss


@torch.no_grad()
def validation_loss(base_path: Path, adapter: Path | None, items, pad_id: int, batch_size: int = 16) -> tuple[float, list[float]]:
    """Assistant-token cross-entropy of base (+ adapter) in fp32: token-weighted total and per example."""
    from peft import PeftModel

    from tunewise.models import load_model
    from tunewise.models.chat import IGNORE
    from tunewise.train.batches import collate

    model = load_model(base_path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).get_base_model()  # LoRA layers stay inside
    model.eval()
    per_example, total, count = [0.0] * len(items), 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([items[i] for i in rows], pad_id)
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
        targets = batch["labels"][:, 1:]  # (B, T-1)
        mask = targets != IGNORE
        logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()  # (N, V)
        losses = torch.nn.functional.cross_entropy(logits, targets[mask], reduction="none")  # (N,)
        row_of = mask.nonzero()[:, 0]  # (N,) batch row of each supervised position
        sums = torch.zeros(len(rows)).index_add_(0, row_of, losses)
        counts = mask.sum(1)
        for j, i in enumerate(rows):
            per_example[i] = float(sums[j] / counts[j])
        total, count = total + float(losses.sum()), count + int(mask.sum())
    return total / count, per_example


# --------------------------------------------------------------------------- children: one tool, one process


class StepClock:
    """Training seconds, the same for every tool: from the first forward with gradients enabled to
    the end of the last optimizer step (global torch hooks, so no tool's code is touched)."""

    def __init__(self):
        self.start: float | None = None
        self.step_ends: list[float] = []
        self._pre = torch.nn.modules.module.register_module_forward_pre_hook(self._forward)
        self._post = register_optimizer_step_post_hook(self._step)

    def _forward(self, module, args):
        if self.start is None and torch.is_grad_enabled():
            self.start = time.perf_counter()
            self._pre.remove()

    def _step(self, optimizer, args, kwargs):
        self.step_ends.append(time.perf_counter())

    def seconds(self) -> float:
        return self.step_ends[-1] - self.start


def child_tunewise(spec: dict, work: Path, tool: str) -> dict:
    from tunewise.config import dump_config, load_config
    from tunewise.runs import RunDir, atomic_write_text
    from tunewise.settings import track_settings, train_settings
    from tunewise.train.checkpoint import list_checkpoints
    from tunewise.train.loop import train_model

    config = load_config(spec["config"])
    config.train.epochs, config.train.batch_size = 1, spec["batch_size"]
    config.train.evals_per_epoch, config.train.patience, config.train.save_every = 1, None, spec["steps"]
    config.train.lr, config.train.seed = LR, 1 if tool == "tunewise-seed1" else SEED
    config.train.fast_path = tool != "tunewise-plain"
    config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.target_modules = (
        LORA["r"], LORA["alpha"], LORA["dropout"], list(LORA["targets"]))
    run = RunDir(work / "run")
    run.data.mkdir(parents=True)
    shutil.copy(spec["train"], run.split("train"))
    shutil.copy(spec["val"], run.split("val"))
    atomic_write_text(run.config, dump_config(config))
    clock = StepClock()
    summary = train_model(run, train_settings(config), Console(file=sys.stderr, width=120), track_settings(config))
    final = list_checkpoints(run.checkpoints)
    if summary.steps != spec["steps"] or not final:
        raise SystemExit(f"tunewise ran {summary.steps} steps (wanted {spec['steps']}); checkpoints: {final}")
    return {"clock": clock, "tool_tokens": summary.tokens, "final_loss": summary.final_train_loss,
            "adapter": str(final[-1]), "steps": summary.steps,
            "notes": [f"train_model derived: {summary.dtype}, batch {summary.batch_size}, {summary.epochs} epoch, "
                      f"max_seq_len {summary.max_seq_len}, {summary.trainable_params:,} trainable; "
                      f"CPU path: {', '.join(summary.fast_path) or 'off'}"]}


def child_trl(spec: dict, work: Path, tool: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    from tunewise.data import load_split, with_system
    from tunewise.models import load_tokenizer

    chats = [with_system(e.messages, spec["system_prompt"]) for e in load_split(Path(spec["train"]))]
    notes = []
    # TRL defaults to bf16=True, which transformers refuses on a machine without a GPU ("Your setup doesn't
    # support bf16/gpu. You need to assign use_cpu ..."): use_cpu=True, as that message says, keeps the default
    cpu = {"use_cpu": True} if not torch.cuda.is_available() else {}
    settings: dict = dict(cpu)
    if tool == "trl-default":
        rows = [{"messages": chat} for chat in chats]
    elif tool == "trl-default-fp32":
        rows = [{"messages": chat} for chat in chats]
        settings = {"bf16": False}
    else:
        try:  # would TRL do assistant_only_loss on this template? (it needs {% generation %} markers)
            get_training_chat_template(load_tokenizer(Path(spec["base"])))
            notes.append("assistant_only_loss would work on this template; completion-only loss used anyway")
        except ValueError as err:
            notes.append(f"assistant_only_loss=True refused by TRL: {str(err).split('. ')[0]}; "
                         "using a prompt-completion dataset (completion_only_loss)")
        bad = [i for i, chat in enumerate(chats) if chat[-1]["role"] != "assistant"
               or any(m["role"] == "assistant" for m in chat[:-1])]
        if bad:
            raise SystemExit(f"train examples {bad[:5]} are not single-answer chats: prompt-completion needs one")
        rows = [{"prompt": chat[:-1], "completion": chat[-1:]} for chat in chats]
        settings |= {"bf16": True, "gradient_checkpointing": False, "model_init_kwargs": {"dtype": "bfloat16"}}
        if tool == "trl-tuned":
            settings |= {"padding_free": True, "max_length": None}
        else:
            settings |= {"train_sampling_strategy": "group_by_length"}
    args = SFTConfig(output_dir=str(work / "out"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
                     learning_rate=LR, seed=SEED, logging_steps=1, report_to="none", disable_tqdm=True,
                     save_strategy="no", **settings)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=list(LORA["targets"]), task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=spec["base"], args=args, train_dataset=Dataset.from_list(rows), peft_config=peft_config)
    notes.append(f"SFTConfig: bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}, "
                 f"optim={args.optim}, model dtype={next(trainer.model.get_base_model().parameters()).dtype}, "
                 f"padding_free={trainer.padding_free}, completion_only_loss={trainer.completion_only_loss}, "
                 f"scheduler={args.lr_scheduler_type}, use_cpu={args.use_cpu}")
    clock = StepClock()
    trainer.train()
    inner = trainer.model.get_base_model()
    notes.append(f"during training: activation checkpointing on the model = "
                 f"{getattr(inner, 'is_activation_checkpointing', getattr(inner, 'is_gradient_checkpointing', '?'))}, "
                 f"attention = {inner.config._attn_implementation}")
    logged = [row for row in trainer.state.log_history if "loss" in row]
    trainer.model.save_pretrained(work / "adapter")
    return {"clock": clock, "tool_tokens": int(trainer._total_train_tokens), "final_loss": logged[-1]["loss"],
            "adapter": str(work / "adapter"), "steps": trainer.state.global_step, "notes": notes}


def child_main(tool: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    work = out_path.parent / f"{tool}-work"
    started = time.perf_counter()
    result = child_tunewise(spec, work, tool) if tool in OURS else child_trl(spec, work, tool)
    clock: StepClock = result.pop("clock")
    if len(clock.step_ends) != spec["steps"]:
        raise SystemExit(f"{tool}: {len(clock.step_ends)} optimizer steps seen, wanted {spec['steps']}")
    result |= {"train_seconds": clock.seconds(), "step_seconds": [b - a for a, b in zip([clock.start, *clock.step_ends],
                                                                                          clock.step_ends)],
               "wall_seconds": time.perf_counter() - started,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "threads": torch.get_num_threads()}
    out_path.write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent


def run_child(tool: str, spec_path: Path, work: Path, threads: int | None) -> dict:
    out = work / f"{tool}.json"
    log = work / f"{tool}.log"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    with log.open("w") as fh:
        code = subprocess.call([sys.executable, __file__, "--child", tool, "--spec", str(spec_path), "--out", str(out)],
                               stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code != 0 or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{tool} failed (exit {code}); last lines of {log}:\n{tail}")
    return json.loads(out.read_text())


def resolve_sizes(args, parser, default_batch: int) -> tuple[int, int, int]:
    """examples = steps x batch size: any two given fix the third; defaults: 16 steps, tunewise's batch."""
    n, s, b = args.examples, args.steps, args.batch_size
    if n and s and b and n != s * b:
        parser.error(f"--examples {n} must equal --steps {s} x --batch-size {b}")
    if n and not (s and b):
        if s:
            b = n // s
        else:
            b = b or default_batch
            s = n // b
        if s * b != n or not s:
            parser.error(f"--examples {n} is not a whole number of steps of a batch; pass --steps and --batch-size")
    s, b = s or 16, b or default_batch
    return s * b, s, b


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a-b and the half-width of its 95% interval over examples."""
    diffs = [x - y for x, y in zip(a, b)]
    return statistics.mean(diffs), 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, help="training examples (first N of the train split); = steps x batch")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 16)")
    parser.add_argument("--batch-size", type=int, help="examples per step (default: what tunewise derives for the split)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool, alternating the order")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS), help=f"comma-separated, from {','.join(TOOLS)}")
    parser.add_argument("--threads", type=int, help="torch threads in every run (default: torch's own)")
    parser.add_argument("--val-examples", type=int, default=64, help="first V examples of the val split")
    parser.add_argument("--run", type=Path, help="prepared run folder (default: the newest under runs/)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with logs and adapters")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, args.spec, args.out)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        parser.error(f"unknown tools {unknown}; choose from {', '.join(TOOLS)}")
    if any(t not in OURS for t in tools):
        try:
            import trl  # noqa: F401
        except ImportError:
            parser.error("TRL is not installed: pip install -e '.[bench]' (or pass --tools tunewise)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoConfig

    from tunewise.config import load_config
    from tunewise.data import load_split
    from tunewise.models import base_chat, resolve_base
    from tunewise.runs import atomic_write_jsonl
    from tunewise.train.plan import derive_batch_size

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames, printed by PEFT loads
    console = Console(width=200)
    run_dir = args.run or newest_run(ROOT / "runs")
    config = load_config(run_dir / "config.yaml")
    base = resolve_base(config.model.base)
    chat = base_chat(config.model)  # the run's template and settings, as training resolves them
    tokenizer = chat.tokenizer
    train_all, val_all = load_split(run_dir / "data" / "train.jsonl"), load_split(run_dir / "data" / "val.jsonl")
    train_items_all = encode(chat, train_all, config.task.system_prompt)
    n, steps, batch = resolve_sizes(args, parser, derive_batch_size([len(i) for i in train_items_all]))
    if n > len(train_all):
        parser.error(f"--examples {n} is more than the train split's {len(train_all)}")
    train, val = train_all[:n], val_all[: args.val_examples]
    train_items, val_items = train_items_all[:n], encode(chat, val, config.task.system_prompt)
    tokens = sum(len(i) for i in train_items)
    epoch_tokens = sum(len(i) for i in train_items_all)
    supervised = sum(supervised_positions(i) for i in train_items)

    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = (f"{python} bench/train_speed.py --examples {n} --steps {steps} --batch-size {batch} "
               f"--repeats {args.repeats} --tools {','.join(tools)} --val-examples {len(val)}"
               f"{f' --threads {args.threads}' if args.threads else ''}"
               f"{f' --run {shlex.quote(str(args.run))}' if args.run else ''}")
    console.print(f"re-run: {command}", markup=False, soft_wrap=True)
    console.print(f"{config.model.base} ({base}); data: {run_dir.name}, first {n} of {len(train_all)} train examples "
                  f"({tokens:,} tokens, {supervised / tokens:.1%} supervised), {len(val)} val examples; "
                  f"{steps} steps x {batch} examples; LoRA r={LORA['r']} alpha={LORA['alpha']} on q/k/v/o, lr {LR}; "
                  f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, torch {torch.__version__}", markup=False)

    work = Path(tempfile.mkdtemp(prefix="tunewise-bench-"))
    try:
        atomic_write_jsonl(work / "train.jsonl", [e.to_json() for e in train])
        atomic_write_jsonl(work / "val.jsonl", [e.to_json() for e in val])
        spec = {"base": str(base), "config": str(run_dir / "config.yaml"), "system_prompt": config.task.system_prompt,
                "train": str(work / "train.jsonl"), "val": str(work / "val.jsonl"), "steps": steps,
                "batch_size": batch, "threads": args.threads}
        (work / "spec.json").write_text(json.dumps(spec))

        rates = [matmul_rate()]
        console.print(f"bf16 matmul 2048^3: {rates[0] / 1e9:.0f} GFLOP/s")
        results: dict[str, list[dict]] = {t: [] for t in tools}
        failed: dict[str, str] = {}
        for r in range(args.repeats):
            for tool in tools if r % 2 == 0 else tools[::-1]:
                if tool in failed:
                    continue
                folder = work / f"r{r + 1}"
                folder.mkdir(exist_ok=True)
                load = os.getloadavg()[0]
                before = matmul_rate(seconds=1.5)
                try:
                    res = run_child(tool, work / "spec.json", folder, args.threads)
                except RuntimeError as err:  # a tool that cannot run here is a finding: show it, go on
                    failed[tool] = str(err)
                    console.print(f"  repeat {r + 1}: {tool} FAILED: {err}", markup=False)
                    continue
                res["local_rate"] = (before + matmul_rate(seconds=1.5)) / 2  # the machine's rate around this run
                results[tool].append(res)
                console.print(f"  repeat {r + 1}: {tool:17} {res['train_seconds']:7.1f} s training "
                              f"({tokens / res['train_seconds']:6.1f} tokens/s), {res['wall_seconds']:6.1f} s in all, "
                              f"peak {res['peak_rss_mib']:5.0f} MiB, load average before {load:.1f}, "
                              f"matmul around it {res['local_rate'] / 1e9:.0f} GFLOP/s")
                if r == 0:
                    for note in res["notes"]:
                        console.print(f"      {note}", markup=False)
                if res["tool_tokens"] != tokens:
                    console.print(f"      note: {tool} counted {res['tool_tokens']:,} tokens itself "
                                  f"(the table uses {tokens:,} for every tool)")
        rates.append(matmul_rate())
        rate = max(rates)
        console.print(f"bf16 matmul 2048^3 after the runs: {rates[1] / 1e9:.0f} GFLOP/s")

        console.print(f"validation loss (shared function, fp32, {len(val)} val examples) ...")
        pad_id = tokenizer.pad_token_id
        base_val, _ = validation_loss(base, None, val_items, pad_id)
        tools = [t for t in tools if t not in failed]
        val_losses = {t: validation_loss(base, Path(results[t][0]["adapter"]), val_items, pad_id) for t in tools}
    finally:
        if args.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    work_parts = flops_per_token(AutoConfig.from_pretrained(base), LORA["r"], LORA["targets"],
                                 [len(i) for i in train_items], supervised)
    per_token = sum(work_parts.values())
    ceiling = rate / per_token
    tps = {t: statistics.median(tokens / x["train_seconds"] for x in results[t]) for t in tools}

    table = Table(title=f"LoRA training speed: {n} examples, {steps} steps x {batch}, {tokens:,} tokens "
                        f"({args.repeats} repeat{'s' if args.repeats > 1 else ''}, median)")
    for col in ("tool", "train s", "tokens/s", "each run", "s/epoch", "peak RSS MiB", "final train loss",
                "val loss", "val - tunewise, 95%", "of ceiling", "of local ceiling", "tunewise is"):
        table.add_column(col, justify="left" if col == "tool" else "right", no_wrap=True)
    for tool in tools:
        rows = results[tool]
        seconds = statistics.median(x["train_seconds"] for x in rows)
        vloss, per_ex = val_losses[tool]
        if tool != "tunewise" and "tunewise" in tools:
            d, hw = paired_interval(per_ex, val_losses["tunewise"][1])
            vs = f"{d:+.4f}±{hw:.4f}"
        else:
            vs = ""
        table.add_row(tool, f"{seconds:.1f}", f"{tps[tool]:.1f}",
                      " ".join(f"{tokens / x['train_seconds']:.0f}" for x in rows),
                      f"{epoch_tokens / tps[tool]:.0f}",
                      f"{statistics.median(x['peak_rss_mib'] for x in rows):.0f}",
                      f"{statistics.median(x['final_loss'] for x in rows):.4f}" + ("*" if tool.startswith("trl-default") else ""),
                      f"{vloss:.4f}", vs, f"{tps[tool] / ceiling:.0%}",
                      f"{statistics.median(tokens / x['train_seconds'] / (x['local_rate'] / per_token) for x in rows):.0%}",
                      f"{tps['tunewise'] / tps[tool]:.2f}x" if "tunewise" in tools else "")
    table.add_row("ceiling", "", f"{ceiling:.0f}", "", f"{epoch_tokens / ceiling:.0f}", "", "", "", "", "100%", "", "")
    table.add_row("base model", "", "", "", "", "", "", f"{base_val:.4f}", "", "", "", "")
    console.print(table)
    for tool in tools:
        console.print(f"  {tool}: {SETUP[tool]}", markup=False)
    for tool, why in failed.items():
        console.print(f"  {tool}: failed, not in the table: {why.splitlines()[-1]}", markup=False)
    if any(t.startswith("trl-default") for t in tools):
        console.print("  * TRL default's training loss is over every token (prompt included), the others' over the answer")
    console.print("work per training token: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in work_parts.items())
                  + f" = {per_token / 1e6:.1f} MFLOP; ceiling = {rate / 1e9:.0f} GFLOP/s / that; s/epoch = the full train split ({len(train_all)} examples, "
                  f"{epoch_tokens:,} tokens) at that rate; local ceiling: the matmul rate measured just before and after "
                  "each run (a machine that slows down mid-benchmark moves both); the target uses the run's best rate",
                  markup=False)

    if "tunewise" in tools:
        checks = [("tunewise >= 60% of the ceiling", tps["tunewise"] / ceiling, 0.6, "{:.0%}")]
        for default in ("trl-default", "trl-default-fp32"):
            if default in tools:
                checks.append((f"tunewise >= 5x TRL defaults ({default})", tps["tunewise"] / tps[default], 5, "{:.2f}x"))
        tuned = [t for t in TUNED if t in tools]
        if tuned:
            best = max(tuned, key=lambda t: tps[t])
            checks.append((f"tunewise >= 2x TRL tuned ({best}, the faster tuned run)", tps["tunewise"] / tps[best], 2,
                           "{:.2f}x"))
        for name, value, target, fmt in checks:
            verdict = "[green]holds[/]" if value >= target else "[red]does not hold[/]"
            console.print(f"target {name}: {fmt.format(value)} -> {verdict}")
        if "tunewise-plain" in tools:  # same learning as the unoptimized reference path, within noise
            d, hw = paired_interval(val_losses["tunewise"][1], val_losses["tunewise-plain"][1])
            noise = (f"; seed noise (tunewise seed 1 - seed 0): {val_losses['tunewise-seed1'][0] - val_losses['tunewise'][0]:+.4f}"
                     if "tunewise-seed1" in tools else "")
            same = abs(d) <= hw or ("tunewise-seed1" in tools
                                    and abs(d) <= abs(val_losses["tunewise-seed1"][0] - val_losses["tunewise"][0]))
            verdict = "[green]holds[/]" if same else "[red]does not hold[/]"
            console.print(f"target same learning (val loss, tunewise - tunewise-plain): {d:+.4f} ± {hw:.4f} (95%, "
                          f"paired over {len(val)} examples){noise} -> {verdict}")


if __name__ == "__main__":
    main()
