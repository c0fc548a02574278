"""llama.cpp against transformers for one base model's GGUF files: how much each type changes.

Run: .venv/bin/python bench/gguf_parity.py [--model smollm2-135m-instruct] [--quants f16 q8_0 q6_k q4_k_m]

Converts the model once in its own precision with llama.cpp's converter (f32 or bf16), makes each
type (the converter for f16/bf16/q8_0, libllama's quantizer for K-quants), and runs
`tunewise.deploy.llamacpp.parity` on the chat prompts below: top-1 agreement over the prompt
positions, the largest logit difference, and greedy continuations (16 tokens) equal to
transformers' (fp32). Needs `make llamacpp`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

PROMPTS = ["What is the capital of France?", "List three prime numbers.",
           "Package: vim\nDescription: Vi IMproved - enhanced vi editor"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q6_k", "q4_k_m"])
    args = parser.parse_args()

    from tunewise.deploy import llamacpp
    from tunewise.deploy.export import base_dtype
    from tunewise.models import load_chat, load_model, resolve_base

    console = Console()
    folder = resolve_base(args.model)
    chat = load_chat(folder, model=args.model)
    model = load_model(folder, dtype=torch.float32).eval()
    prompts = [chat.prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    lossless = llamacpp.LOSSLESS[str(base_dtype(folder)).removeprefix("torch.")]
    table = Table(title=f"{args.model}: llama.cpp vs transformers (fp32) on {len(prompts)} chat prompts")
    for column in ("file", "same ids", "top-1 agreement", "max |logit diff|", "greedy equal", "llama.cpp answer"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp:
        source = llamacpp.convert(folder, Path(tmp) / f"m-{lossless}.gguf", lossless, console=console)
        for quant in [lossless, *(q for q in args.quants if q != lossless)]:
            path = Path(tmp) / f"m-{quant}.gguf"
            if quant == lossless:
                path = source
            elif quant in llamacpp.CONVERT_TYPES:
                llamacpp.convert(folder, path, quant, console=console)
            else:
                llamacpp.quantize(source, path, llamacpp.check_quant(quant))
            r = llamacpp.parity(path, model, chat, prompts)
            table.add_row(quant, f"{r.tokens_equal}/{r.prompts}", f"{r.top1_agreement:.3f}",
                          f"{r.max_abs_logit_diff:.2f}", f"{r.greedy_equal}/{r.prompts}",
                          repr(r.example["llama.cpp"][:24]))
    console.print(table)


if __name__ == "__main__":
    main()
