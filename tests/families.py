"""Tokenizers that carry each family's real chat template and special tokens, for the unit tier.

Templates are the models' own `chat_template` strings, kept as text in tests/fixtures/templates
(tests/fixtures/templates/SOURCES.md says where each was copied from; Gemma 3's and Llama 3's
are the defaults tunewise ships in src/tunewise/models/templates). The vocabulary around the
special tokens is stand-in: byte-level BPE families (Llama 3, Qwen, Phi-4, SmolLM2) reuse the
embedded SmolLM2 byte-level tokenizer; SentencePiece families (Mistral, Gemma, Phi-3) get a small
Metaspace BPE trained here, so the "▁word" boundaries masks must survive are real.
"""

from __future__ import annotations

import copy
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
SHIPPED = Path(__file__).parent.parent / "src" / "tunewise" / "models" / "templates"  # defaults that are real templates


@dataclass(frozen=True)
class Family:
    name: str
    template: str | None  # file in tests/fixtures/templates; None: the tokenizer's own / a base model
    vocab: str  # "byte" (SmolLM2's byte-level BPE) or "sentencepiece" (a Metaspace BPE trained here)
    special: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None = None
    add_bos: bool = False  # the tokenizer itself puts bos in front (SentencePiece Llama/Mistral style)
    generation_eos: tuple[str, ...] = ()  # generation_config.json eos ids beyond the tokenizer's eos
    end_of_turn: str = ""
    fold_system: bool = False
    dummy_prefix: bool = True  # SentencePiece: "▁" before the first word (Llama/Mistral/Phi-3; not Gemma)
    plain: tuple[str, ...] = field(default=())  # added tokens that are not special (Qwen3's <think>)


LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|eom_id|>", "<|python_tag|>")
CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
PHI = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

FAMILIES = {
    f.name: f for f in [
        Family("llama-3", "llama3.jinja", "byte", LLAMA3, "<|begin_of_text|>", "<|end_of_text|>",
               generation_eos=("<|eot_id|>",), end_of_turn="<|eot_id|>"),
        Family("llama-3.1", "llama-3.1.jinja", "byte", LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
               generation_eos=("<|end_of_text|>", "<|eom_id|>"), end_of_turn="<|eot_id|>"),
        Family("llama-3.2", "llama-3.2.jinja", "byte", LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
               generation_eos=("<|end_of_text|>", "<|eom_id|>"), end_of_turn="<|eot_id|>"),
        Family("llama-3.3", "llama-3.1.jinja", "byte", LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
               generation_eos=("<|end_of_text|>", "<|eom_id|>"), end_of_turn="<|eot_id|>"),
        Family("qwen-2.5", "qwen-2.5.jinja", "byte", CHATML, None, "<|im_end|>", pad="<|endoftext|>",
               generation_eos=("<|endoftext|>",), end_of_turn="<|im_end|>"),
        Family("qwen-3", "qwen-3.jinja", "byte", CHATML, None, "<|im_end|>", pad="<|endoftext|>",
               generation_eos=("<|endoftext|>",), end_of_turn="<|im_end|>", plain=("<think>", "</think>")),
        Family("mistral-v0.3", "mistral-v0.3.jinja", "sentencepiece", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
               "<s>", "</s>", add_bos=True, end_of_turn="</s>", fold_system=True),
        Family("gemma-2", "gemma-2.jinja", "sentencepiece", GEMMA, "<bos>", "<eos>", pad="<pad>", add_bos=True,
               generation_eos=("<end_of_turn>",), end_of_turn="<end_of_turn>", fold_system=True, dummy_prefix=False),
        # Gemma 3's template folds a system turn into the first user turn itself: tunewise need not
        Family("gemma-3", "gemma.jinja", "sentencepiece", GEMMA, "<bos>", "<eos>", pad="<pad>", add_bos=True,
               generation_eos=("<end_of_turn>",), end_of_turn="<end_of_turn>", dummy_prefix=False),
        Family("phi-3.5", "phi-3.5.jinja", "sentencepiece", ("<unk>", "<s>", "</s>", *PHI), "<s>", "<|endoftext|>",
               generation_eos=("<|end|>", "<|assistant|>"), end_of_turn="<|end|>"),
        Family("phi-4-mini", "phi-4-mini.jinja", "byte", PHI, "<|endoftext|>", "<|endoftext|>",
               generation_eos=("<|end|>",), end_of_turn="<|end|>"),
        Family("smollm2", None, "byte", (), "<|im_start|>", "<|im_end|>", end_of_turn="<|im_end|>"),
    ]
}

_CORPUS = [
    "the quick brown fox jumps over the lazy dog", "a system prompt tells the model what to do",
    "classify the package into one section of the archive", "answer with one word and nothing else",
    "Probe first question Probe second question Probe first answer Probe second answer Probe system rules",
    "what is two plus two? four. hello world, how are you today? fine, thanks!",
    "JSON {\"label\": \"net\"} [1, 2, 3] user assistant model reasoning think step by step",
    string.ascii_letters + string.digits + string.punctuation,
]


def _sentencepiece(family: Family):
    """A small Metaspace BPE (the "▁word" pieces of Llama/Mistral/Gemma tokenizers) with the family's tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in family.special else None))
    if family.dummy_prefix:  # Llama/Mistral SentencePiece: Metaspace, "▁" before the first word
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:  # Gemma's tokenizer.json: spaces become "▁", split after each, nothing prepended
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_previous")
        tok.decoder = decoders.Replace("▁", " ")
    alphabet = list(string.printable.strip()) + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(family.special), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if family.add_bos:
        bos = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{family.bos} $A", pair=f"{family.bos} $A $B",
                                                           special_tokens=[(family.bos, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, unk_token="<unk>" if "<unk>" in family.special else None)


def _byte_level(family: Family, smollm2):
    from tokenizers import AddedToken

    tok = copy.deepcopy(smollm2)
    if not family.special:
        return tok
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in family.special], special_tokens=True)
    roles = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad or family.eos}
    tok.add_special_tokens({k: v for k, v in roles.items() if v is not None})
    if family.bos is None:
        tok.bos_token = None
    return tok


def family_tokenizer(name: str, smollm2, *, template: bool = True):
    """The family's tokenizer with its real chat template (`template=False`: as a base model has it)."""
    from tokenizers import AddedToken

    family = FAMILIES[name]
    tok = _sentencepiece(family) if family.vocab == "sentencepiece" else _byte_level(family, smollm2)
    if family.plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain])
    if family.template:
        path = TEMPLATES / family.template
        tok.chat_template = (path if path.exists() else SHIPPED / family.template).read_text(encoding="utf-8")
    if not template:
        tok.chat_template = None
    return tok


def generation_eos(name: str, tok) -> list[int]:
    family = FAMILIES[name]
    return [tok.convert_tokens_to_ids(t) for t in (family.eos, *family.generation_eos)]


def tiny_model_folder(name: str, tok, out: Path, *, template: bool = True) -> Path:
    """A 2-layer random llama with the family's tokenizer, chat template and generation config."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    eos = generation_eos(name, tok)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if not template:
        config_path = out / "tokenizer_config.json"
        data = json.loads(config_path.read_text(encoding="utf-8"))
        data.pop("chat_template", None)
        config_path.write_text(json.dumps(data), encoding="utf-8")
        (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


# --- the families' own architectures, for GGUF export through llama.cpp's converter --------------

def _rope_llama3() -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# family -> (transformers config class, model class, config settings beyond the shared tiny sizes)
ARCHITECTURES = {
    "llama-3.1": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": _rope_llama3()}),
    "qwen-2.5": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen-3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral-v0.3": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16}),
    "gemma-2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                                      "sliding_window": 64}),
    "gemma-3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                                          "sliding_window": 64}),
    "phi-3.5": ("Phi3Config", "Phi3ForCausalLM", {}),
    "phi-4-mini": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.75}),
    "smollm2": ("LlamaConfig", "LlamaForCausalLM", {}),
}
SPM_CLASS = {"mistral-v0.3": "LlamaTokenizer", "gemma-2": "GemmaTokenizer", "gemma-3": "GemmaTokenizer",
             "phi-3.5": "LlamaTokenizer"}


def spm_tokenizer(name: str, out: Path):
    """A real SentencePiece model (tokenizer.model, as Gemma/Mistral/Phi-3 ship) trained here with the
    family's tokens, loaded by transformers (which converts it to a fast tokenizer), real template."""
    import sentencepiece
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    family = FAMILIES[name]
    control = [t for t in (family.pad, family.eos, family.bos, "<unk>") if t]
    control = list(dict.fromkeys(control))
    symbols = [t for t in family.special if t not in control]
    out.mkdir(parents=True, exist_ok=True)
    ids = {"pad": -1, "eos": -1, "bos": -1, "unk": -1}
    pieces = {}
    for i, piece in enumerate(control):
        role = next(r for r, t in (("pad", family.pad), ("eos", family.eos), ("bos", family.bos), ("unk", "<unk>"))
                    if t == piece)
        ids[role], pieces[f"{role}_piece"] = i, piece
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20), model_prefix=str(out / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, control_symbols=symbols, hard_vocab_limit=False,
        pad_id=ids["pad"], eos_id=ids["eos"], bos_id=ids["bos"], unk_id=ids["unk"], **pieces,
        add_dummy_prefix=family.dummy_prefix, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": SPM_CLASS[name], "bos_token": family.bos, "eos_token": family.eos,
              "pad_token": family.pad, "unk_token": "<unk>", "add_bos_token": family.add_bos}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in symbols], special_tokens=True)
    path = TEMPLATES / family.template
    tok.chat_template = (path if path.exists() else SHIPPED / family.template).read_text(encoding="utf-8")
    return tok


def architecture_folder(name: str, tok, out: Path) -> Path:
    """A 2-layer random model of the family's own architecture with `tok` and its generation config."""
    import transformers

    config_class, model_class, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.2, **extra)
    model = getattr(transformers, model_class)(config).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=generation_eos(name, tok), pad_token_id=tok.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)  # next to the tokenizer.model spm_tokenizer trained into `out`
    if name == "phi-4-mini":  # as the hub's Phi-4-mini says; llama.cpp's converter reads it
        config_path = out / "tokenizer_config.json"
        data = json.loads(config_path.read_text(encoding="utf-8"))
        config_path.write_text(json.dumps({**data, "tokenizer_class": "GPT2Tokenizer"}), encoding="utf-8")
    return out
