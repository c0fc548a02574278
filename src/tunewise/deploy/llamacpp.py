"""GGUF files made and checked with llama.cpp's own tools.

- **Convert**: `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` and their `gguf-py`, copied by
  `make llamacpp` from the llama-cpp-python source distribution (which vendors llama.cpp) into
  `<venv>/share/llama.cpp`, or a llama.cpp checkout named by `TUNEWISE_LLAMA_CPP`. They run as a
  subprocess of this Python, so every family llama.cpp converts is one tunewise exports.
- **Quantize**: libllama's `llama_model_quantize` (what `llama-quantize` calls), through the
  `llama_cpp` package built from the same tree: K-quants and the legacy 4/5-bit types.
- **Parity**: libllama runs the GGUF on the run's own test prompts, and its tokens, logits and
  greedy continuations are compared with the transformers model the GGUF was made from.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from tunewise.errors import TunewiseError
from tunewise.progress import progress_bar

# written by the converter itself; "auto" is not offered: tunewise picks the base's own dtype
CONVERT_TYPES = ("f32", "f16", "bf16", "q8_0")
# made by llama_model_quantize from a 16/32-bit GGUF (names as llama-quantize takes them, lowercase)
QUANTIZE_TYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANTS = (*CONVERT_TYPES, *QUANTIZE_TYPES)
LOSSLESS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # merged dtype -> GGUF type that keeps it
INSTALL_FIX = ("run `make llamacpp` in the tunewise checkout (it copies the converter from the llama-cpp-python "
               "source distribution and builds the library), or set TUNEWISE_LLAMA_CPP to a llama.cpp checkout "
               "and pip install llama-cpp-python")


def check_quant(quant: str) -> str:
    quant = quant.lower()
    if quant not in QUANTS:
        raise TunewiseError(f"unknown GGUF type '{quant}'", field="--quant", fix=f"one of: {', '.join(QUANTS)}")
    return quant


def converter_dir() -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py, its conversion/ package and gguf-py."""
    given = os.environ.get("TUNEWISE_LLAMA_CPP")
    folder = Path(given) if given else Path(sys.prefix) / "share" / "llama.cpp"
    if not (folder / "convert_hf_to_gguf.py").is_file() or not (folder / "gguf-py").is_dir():
        raise TunewiseError("llama.cpp's converter (convert_hf_to_gguf.py with gguf-py) is not installed",
                            file=folder / "convert_hf_to_gguf.py", fix=INSTALL_FIX)
    return folder


def library():
    """The `llama_cpp` bindings of libllama (quantize, inference)."""
    try:
        import llama_cpp
    except ImportError:  # tunewise runs without llama.cpp until a GGUF is asked for
        raise TunewiseError("llama.cpp's library (the llama_cpp package) is not installed",
                            fix=INSTALL_FIX) from None
    return llama_cpp


def available() -> bool:
    """Both the converter and the library are here (the tests that need them run only then)."""
    try:
        converter_dir()
        library()
    except TunewiseError:
        return False
    return True


def _run(script: str, args: list[str], *, what: str, console: Console) -> None:
    """One converter script as a subprocess, its log lines as the progress status; on failure a
    TunewiseError quoting the converter's last lines (an unsupported architecture, say)."""
    command = [sys.executable, str(converter_dir() / script), *args]
    tail: deque[str] = deque(maxlen=12)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with progress_bar(console) as progress:
        task = progress.add_task(what, total=None, status="starting llama.cpp's converter")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   errors="replace")
        for line in process.stdout:
            line = line.rstrip().rsplit("\r", 1)[-1]
            if line:
                tail.append(line)
                progress.update(task, status=line[-90:])
        code = process.wait()
    if code != 0:
        raise TunewiseError(f"llama.cpp's {script} failed ({what}, exit {code}):\n  " + "\n  ".join(tail),
                            fix="the lines above are the converter's and say why (an architecture or tokenizer this "
                                "llama.cpp does not know cannot be exported to GGUF; export --merge still works)")


def convert(model_folder: Path, target: Path, outtype: str, *, console: Console) -> Path:
    """A transformers folder -> one GGUF of `outtype` (f32, f16, bf16, q8_0), via a temp file."""
    partial = target.with_name(target.name + ".partial")
    try:
        _run("convert_hf_to_gguf.py", [str(model_folder), "--outfile", str(partial), "--outtype", outtype],
             what=f"GGUF {outtype}", console=console)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def convert_lora(adapter: Path, base_folder: Path, target: Path, outtype: str, *, console: Console) -> Path:
    """A PEFT LoRA folder -> a GGUF LoRA adapter (llama.cpp `--lora`, Ollama `ADAPTER`)."""
    partial = target.with_name(target.name + ".partial")
    try:
        _run("convert_lora_to_gguf.py", ["--base", str(base_folder), "--outfile", str(partial), "--outtype", outtype,
                                         str(adapter)], what=f"GGUF LoRA adapter {outtype}", console=console)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _c_log():
    """libllama writes its log (a line per tensor when quantizing) to the process's stderr: it goes
    to a temp file instead, whose text is yielded's `.text` after the block (for error messages)."""
    class Log:
        text = ""

    log = Log()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            log.text = sink.read().decode("utf-8", "replace")


def quantize(source: Path, target: Path, quant: str) -> Path:
    """`source` (a 16/32-bit GGUF) quantized by libllama to `quant` (q4_k_m, q6_k, ...)."""
    llama_cpp = library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZE_TYPES[quant])
    params.nthread = os.cpu_count() or 1
    partial = target.with_name(target.name + ".partial")
    try:
        with _c_log() as log:
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if code != 0:
            tail = "\n  ".join(log.text.strip().splitlines()[-5:])
            raise TunewiseError(f"llama.cpp could not quantize {source.name} to {quant} (llama_model_quantize "
                                f"returned {code}):\n  {tail}", file=source, fix="try another --quant, e.g. q8_0")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


NEAR_TIE = 0.1  # top-two logit gap below which llama.cpp's f16 KV cache may pick the other token

# --- parity -------------------------------------------------------------------------------------

@dataclass
class Parity:
    """llama.cpp running a GGUF against transformers running the model it was made from."""

    file: str
    prompts: int
    tokens_equal: int  # prompts that llama.cpp tokenizes to the same ids as transformers
    positions: int  # prompt positions whose logits were compared
    top1_agreement: float  # share of positions where both pick the same next token
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    greedy_equal: int  # prompts whose greedy continuations are identical (up to the stop)
    greedy_near_ties: int  # the others, where they part at a near-tie of transformers' top two tokens
    greedy_tokens: int
    example: dict  # one prompt's continuation from each, decoded
    token_difference: dict | None = None  # the first prompt llama.cpp tokenizes differently

    def passed(self) -> bool:
        """The same model: identical greedy outputs and top-1 agreement at 98 % of positions (for a
        lossless file; quantized files are measured, not judged). Scored on the same token ids, so
        a tokenizer difference is reported separately (`tokens_equal`)."""
        return self.greedy_equal + self.greedy_near_ties == self.prompts and self.top1_agreement >= 0.98

    def record(self) -> dict:
        return asdict(self)


def open_gguf(path: Path, *, n_ctx: int, lora: Path | None = None):
    """libllama with `path` loaded for scoring (logits at every position), quiet."""
    llama_cpp = library()
    with _c_log() as log:
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                                   n_threads=os.cpu_count() or 1, lora_path=str(lora) if lora else None)
        except (ValueError, RuntimeError) as err:
            failure = err
    tail = "\n  ".join(log.text.strip().splitlines()[-5:])
    raise TunewiseError(f"llama.cpp cannot load {path.name}: {failure}\n  {tail}", file=path,
                        fix="the file was written by this llama.cpp's converter; report it with the lines above")


def _greedy_llama(llm, ids: list[int], steps: int, stops: set[int]) -> tuple[np.ndarray, list[int]]:
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    out: list[int] = []
    last = logits[-1]
    for _ in range(steps):
        token = int(np.argmax(last))
        out.append(token)
        if token in stops:
            break
        llm.eval([token])
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return logits, out


@torch.no_grad()
def _greedy_hf(model, ids: list[int], steps: int, stops: set[int]) -> tuple[np.ndarray, list[int], list[float]]:
    """Logits at the prompt's positions, the greedy continuation, and its top-two gap at each step."""
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    result = model(input_ids=inputs, use_cache=True)
    logits = result.logits[0].float().cpu().numpy()
    past, last, out, gaps = result.past_key_values, result.logits[0, -1], [], []
    for _ in range(steps):
        token = int(torch.argmax(last))
        top2 = torch.topk(last.float(), 2).values
        gaps.append(float(top2[0] - top2[1]))
        out.append(token)
        if token in stops:
            break
        step = model(input_ids=torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
        past, last = step.past_key_values, step.logits[0, -1]
    return logits, out, gaps


def parity(gguf: Path, model, chat, prompts: list[str], *, steps: int = 16, lora: Path | None = None) -> Parity:
    """Run `prompts` (chat-formatted text) through the GGUF in libllama and through `model`
    (transformers, float32): tokenization, logits at every prompt position, greedy continuation."""
    hf_ids = [chat.ids(prompt) for prompt in prompts]
    n_ctx = max(len(ids) for ids in hf_ids) + steps + 8
    llm = open_gguf(gguf, n_ctx=n_ctx, lora=lora)
    adds_bos = gguf_adds_bos(gguf)
    try:
        stops = set(chat.stop_ids)
        tokens_equal = greedy_equal = near_ties = positions = agree = greedy_tokens = 0
        max_diff, total_diff, example, token_difference = 0.0, 0.0, {}, None
        for prompt, ids in zip(prompts, hf_ids):
            # as llama-server and Ollama do: the template's text, bos added by the GGUF's own setting
            text = _without_bos(prompt, chat) if adds_bos else prompt
            llama_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            tokens_equal += llama_ids == ids
            if llama_ids != ids and token_difference is None:
                at = next((i for i, (a, b) in enumerate(zip(llama_ids, ids)) if a != b), min(len(ids), len(llama_ids)))
                names = chat.tokenizer.convert_ids_to_tokens
                token_difference = {"position": at, "llama.cpp": names(llama_ids[at:at + 4]),
                                    "transformers": names(ids[at:at + 4])}
            ours, ours_out = _greedy_llama(llm, ids, steps, stops)
            ref, ref_out, gaps = _greedy_hf(model, ids, steps, stops)
            diff = np.abs(ours - ref)
            max_diff, total_diff = max(max_diff, float(diff.max())), total_diff + float(diff.sum()) / ref.shape[1]
            positions += len(ids)
            agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
            greedy_equal += ours_out == ref_out
            if ours_out != ref_out:
                parted = next((i for i, (a, b) in enumerate(zip(ours_out, ref_out)) if a != b), None)
                near_ties += parted is not None and gaps[parted] < NEAR_TIE
            greedy_tokens += len(ref_out)
            if not example:
                example = {"prompt_tail": prompt[-120:], "llama.cpp": chat.text(ours_out),
                           "transformers": chat.text(ref_out)}
    finally:
        llm.close()
    return Parity(file=gguf.name, prompts=len(prompts), tokens_equal=tokens_equal, positions=positions,
                  top1_agreement=agree / positions, max_abs_logit_diff=max_diff,
                  mean_abs_logit_diff=total_diff / positions, greedy_equal=greedy_equal, greedy_near_ties=near_ties,
                  greedy_tokens=greedy_tokens, example=example, token_difference=token_difference)


def gguf_adds_bos(path: Path) -> bool:
    """The GGUF's `tokenizer.ggml.add_bos_token`: llama.cpp puts bos before a prompt itself."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.parts[field.data[0]][0])


def _without_bos(prompt: str, chat) -> str:
    """llama.cpp adds bos itself (the GGUF's add_bos_token): the template's written bos comes off."""
    bos = chat.tokenizer.bos_token
    return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt
