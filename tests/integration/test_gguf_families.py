"""GGUF export for every family's own architecture, through llama.cpp's converter, run in llama.cpp.

Each family gets a 2-layer random model of its real architecture (Llama 3.1 with llama3 rope
scaling, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3.5, Phi-4-mini with partial rotary, SmolLM2) and a
tokenizer with its real chat template: byte-level families reuse the SmolLM2 vocabulary;
SentencePiece families get a real tokenizer.model trained here (the converter reads it, as it does
for the hub's Gemma, Mistral and Phi-3 folders). libllama must give the transformers model's logits
and greedy outputs, and the Ollama template derived from the chat format must reproduce it.

Qwen 2.5 is not here: transformers 5 rebuilds any `qwen2` folder's tokenizer with Qwen2's own
pre-tokenizer, and the converter identifies a BPE pre-tokenizer by hashing the ids of a probe text,
which only the real Qwen2 vocabulary matches. Qwen3's converter class is Qwen2's (same vocabulary
code), and the real Gemma 3 270M export (test_gemma.py) checks real tokenizer ids.
"""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from tests.families import ARCHITECTURES, SPM_CLASS, architecture_folder, family_tokenizer, spm_tokenizer
from tests.helpers import needs_llamacpp
from tunewise.deploy import llamacpp, ollama
from tunewise.models import load_chat, load_model

pytestmark = [pytest.mark.integration,
              needs_llamacpp]
QUIET = Console(quiet=True)
GGUF_ARCH = {"llama-3.1": "llama", "qwen-3": "qwen3", "mistral-v0.3": "llama", "gemma-2": "gemma2",
             "gemma-3": "gemma3", "phi-3.5": "phi3", "phi-4-mini": "phi3", "smollm2": "llama"}
# llama.cpp puts a space before the text after every special token when the SentencePiece model has a
# dummy prefix (Llama-style SPM); transformers' converted tokenizer does not: the export reports it
SPACE_AFTER_SPECIAL = {"mistral-v0.3", "phi-3.5"}
CHATS = [[{"role": "system", "content": "Answer with one word."},
          {"role": "user", "content": "What does the quick brown fox do?"}],
         [{"role": "user", "content": "classify the package: vim"}, {"role": "assistant", "content": "editors"},
          {"role": "user", "content": "and gcc?"}]]


@pytest.mark.parametrize("name", [name for name in ARCHITECTURES if name != "qwen-2.5"])
def test_family_converts_and_runs_in_llama_cpp_like_transformers(name, tmp_path, tokenizer):
    from gguf import GGUFReader

    folder = tmp_path / name
    tok = spm_tokenizer(name, folder) if name in SPM_CLASS else family_tokenizer(name, tokenizer)
    architecture_folder(name, tok, folder)
    chat = load_chat(folder, model=name)
    gguf = llamacpp.convert(folder, tmp_path / f"{name}.gguf", "f32", console=QUIET)
    assert GGUFReader(gguf).fields["general.architecture"].contents() == GGUF_ARCH[name]

    model = load_model(folder, dtype=torch.float32).eval()
    result = llamacpp.parity(gguf, model, chat, [chat.prompt(c) for c in CHATS], steps=12)
    assert result.passed(), result
    assert result.top1_agreement == 1.0 and result.max_abs_logit_diff < 0.05, result
    if name in SPACE_AFTER_SPECIAL:
        assert result.token_difference is not None  # reported, so the export warns
    else:
        assert result.tokens_equal == len(CHATS), result.token_difference

    pieces = ollama.check(chat, add_bos=llamacpp.gguf_adds_bos(gguf), system="Answer with one word.")
    assert ollama.render_like_ollama(pieces, CHATS[0]).endswith(pieces.tail)
