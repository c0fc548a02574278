"""A merged Hugging Face llama folder as one GGUF file for llama.cpp, written with gguf-py.

It does what llama.cpp's `convert_hf_to_gguf.py` does for `LlamaForCausalLM`: the `llama.*`
metadata, the tokenizer as `gpt2` (byte-level BPE) metadata, llama.cpp's tensor names, the Q/K
row permutation (`LlamaModel.permute`), norms and other 1-D tensors kept in f32, and no `output`
tensor when the embeddings are tied. For the 4- and 5-bit types, which llama.cpp makes with
`llama-quantize`, the output matrix keeps 8 bits as `llama-quantize` keeps it at more bits.

Every type offered is one gguf-py quantizes in numpy and transformers reads back (its GGUF loader
dequantizes llama files with gguf-py), so an export can be checked by loading it in transformers.
Tensors are read, quantized and written one at a time, into a temporary file renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    RopeScalingType,
    SpecialVocab,
    TokenType,
    get_tensor_name_map,
    quant_shape_to_byte_shape,
    quants,
)
from rich.console import Console

from tunewise.errors import TunewiseError
from tunewise.progress import progress_bar
from tunewise.runs import read_json

Q = GGMLQuantizationType
QUANTS: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# llama-quantize gives the output matrix q6_K under these (q8_0 where rows are not whole 256-blocks,
# as in the SmolLM2 file tunewise ships); gguf-py cannot write q6_K, so it gets q8_0.
LOW_BIT = {Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0}

# tokenizer.json pre-tokenizer steps -> llama.cpp's `tokenizer.ggml.pre` that splits text the same way
PRE_TOKENIZERS: dict[tuple[tuple[str, object], ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
}
CONVERT_FIX = "export the merged folder only (--merge) and convert it with llama.cpp's convert_hf_to_gguf.py"


def gguf_quant(name: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    """The tensor type and file type of a quant name such as "q8_0"; a TunewiseError otherwise."""
    found = QUANTS.get(name.lower())
    if found is None:
        raise TunewiseError(f"unknown GGUF quant type '{name}'", field="--quant", fix=f"one of: {', '.join(QUANTS)}")
    return found


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: per head, rotate-half row order -> interleaved pairs."""
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def tensor_type(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, *, tied: bool) -> GGMLQuantizationType:
    """The type one tensor is stored in under the file's `qtype`, by llama.cpp's rules."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_output and qtype in LOW_BIT:
        qtype = Q.Q8_0
    block, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return Q.F16  # convert_hf_to_gguf's fallback for rows that do not fill whole blocks
    return qtype


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: llama.cpp's name, where it comes from, its shape and stored type."""

    name: str
    source: str
    file: Path
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    heads: int | None  # rows are permuted for this many heads (attn_q / attn_k), else None

    def info(self) -> tuple[tuple[int, ...], type, int]:
        """(shape as stored, numpy dtype, bytes) for GGUFWriter.add_tensor_info."""
        if self.qtype in (Q.F32, Q.F16):
            dtype = np.float32 if self.qtype == Q.F32 else np.float16
            return self.shape, dtype, math.prod(self.shape) * np.dtype(dtype).itemsize
        stored = tuple(quant_shape_to_byte_shape(self.shape, self.qtype))
        return stored, np.uint8, math.prod(stored)


def llama_config(folder: Path):
    """The folder's transformers config, checked to be a llama this writer can describe."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llama":
        raise TunewiseError(
            f"GGUF export supports llama-architecture models, not '{config.model_type}'",
            file=folder / "config.json", fix=CONVERT_FIX,
        )
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise TunewiseError(f"rope scaling '{rope_type}' is not supported by this GGUF writer",
                            file=folder / "config.json", fix=CONVERT_FIX)
    return config


def check_gguf_support(model_dir: Path, tokenizer_dir: Path) -> None:
    """Fail early (before a merge) on a model or tokenizer this writer cannot describe to llama.cpp."""
    llama_config(model_dir)
    spec_file = tokenizer_dir / "tokenizer.json"
    if not spec_file.exists():
        raise TunewiseError("GGUF export needs a fast tokenizer (tokenizer.json)", file=tokenizer_dir, fix=CONVERT_FIX)
    pre_tokenizer(json.loads(spec_file.read_text("utf-8")), spec_file)


def rope_parameters(config) -> dict:
    """{"rope_type", "rope_theta", ...}: transformers 5's rope_parameters, or the older attributes."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(read_json(index)["weight_map"].values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise TunewiseError("no safetensors weights in this folder", file=folder,
                        fix="save the model with save_pretrained (safetensors)")


def plan_tensors(folder: Path, config, qtype: GGMLQuantizationType) -> list[PlannedTensor]:
    """Every tensor to write, in file order, with llama.cpp's names and stored types."""
    from safetensors import safe_open

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(config.tie_word_embeddings)
    plan = []
    for file in weight_files(folder):
        with safe_open(file, framework="pt") as fh:
            for source in fh.keys():
                if source.endswith(".rotary_emb.inv_freq") or (tied and source == "lm_head.weight"):
                    continue
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise TunewiseError(f"tensor '{source}' has no llama.cpp name", file=file, fix=CONVERT_FIX)
                shape = tuple(fh.get_slice(source).get_shape())
                heads = (config.num_attention_heads if ".q_proj." in source
                         else config.num_key_value_heads if ".k_proj." in source else None)
                plan.append(PlannedTensor(name, source, file, shape, tensor_type(name, shape, qtype, tied=tied), heads))
    return plan


def read_tensor(tensor: PlannedTensor) -> np.ndarray:
    """The tensor as float32 numpy, Q/K rows permuted the way llama.cpp expects them."""
    from safetensors import safe_open

    with safe_open(tensor.file, framework="pt") as fh:
        data = fh.get_tensor(tensor.source).to(torch.float32).numpy()
    return permute_qk(data, tensor.heads) if tensor.heads else data


def pre_tokenizer(spec: dict, file: Path) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text before merging."""
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise TunewiseError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only",
                            file=file, fix=CONVERT_FIX)
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    flags = {"ByteLevel": ("use_regex", True), "Digits": ("individual_digits", False)}  # (field, default)
    shape = tuple((s.get("type"), s.get(*flags.get(s.get("type"), ("", None)))) for s in steps)
    if shape not in PRE_TOKENIZERS:
        raise TunewiseError(f"this tokenizer's pre-tokenizer {list(shape)} has no llama.cpp equivalent known here",
                            file=file, fix=CONVERT_FIX)
    return PRE_TOKENIZERS[shape]


def token_list(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types (convert_hf_to_gguf's `get_vocab_base`)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise TunewiseError(f"the tokenizer has token id {max(by_id)} but the model only {n_vocab} embeddings",
                            field="vocab_size", fix="resize the model's embeddings to the tokenizer before export")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if i not in added:
            types.append(TokenType.NORMAL)
        elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(TokenType.CONTROL)
        else:
            types.append(TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def stop_token_ids(folder: Path) -> list[int]:
    """The eos ids of the folder's generation_config.json (eos and end-of-turn)."""
    path = folder / "generation_config.json"
    eos = read_json(path).get("eos_token_id") if path.exists() else None
    return [eos] if isinstance(eos, int) else list(eos or [])


def add_vocab(writer: GGUFWriter, folder: Path, n_vocab: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens, types = token_list(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(json.loads((folder / "tokenizer.json").read_text("utf-8")),
                                           folder / "tokenizer.json"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/unk/pad ids and the chat template, read by gguf-py the way llama.cpp reads them
    special = SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    end_of_turn = [i for i in stop_token_ids(folder) if i != tokenizer.eos_token_id]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])


def add_llama_metadata(writer: GGUFWriter, config, ftype: LlamaFileType, n_vocab: int) -> None:
    rope = rope_parameters(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(ftype)


def write_gguf(
    folder: Path, target: Path, quant: str, *, name: str, console: Console, base_model: str | None = None,
) -> Path:
    """Write the llama model in `folder` as `target` (a .gguf file) with tensors in `quant`."""
    qtype, ftype = gguf_quant(quant)
    config = llama_config(folder)
    plan = plan_tensors(folder, config, qtype)
    tmp = target.with_name(f".{target.name}.tmp")
    writer = GGUFWriter(tmp, MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA])
    try:
        writer.add_type("model")
        writer.add_name(name)
        if base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base_model)
        add_llama_metadata(writer, config, ftype, config.vocab_size)
        add_vocab(writer, folder, config.vocab_size)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for tensor in plan:
            shape, dtype, nbytes = tensor.info()
            writer.add_tensor_info(tensor.name, shape, np.dtype(dtype), nbytes, raw_dtype=tensor.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(console) as progress:
            task = progress.add_task(f"gguf {quant}", total=len(plan), status="")
            for tensor in plan:
                progress.update(task, status=tensor.name)
                writer.write_tensor_data(quants.quantize(read_tensor(tensor), tensor.qtype))
                progress.advance(task)
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return target
