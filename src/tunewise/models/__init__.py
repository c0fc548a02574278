"""Resolve a base model to a local Hugging Face folder (embedded registry, local folder, hub id),
its placement on the devices (device.py), batched generation shared by evaluate and serve
(generate.py),
and its family's chat format (template, masks, system prompt, stops, reasoning)."""

from tunewise.models.chat import Answer, ChatFormat, Encoded, base_chat, load_chat
from tunewise.models.resolve import (
    EMBEDDED,
    EmbeddedModel,
    cache_dir,
    compute_dtype,
    import_embedded,
    load_model,
    load_tokenizer,
    resolve_base,
    tunewise_home,
)

__all__ = [
    "Answer",
    "ChatFormat",
    "Encoded",
    "base_chat",
    "load_chat",
    "EMBEDDED",
    "EmbeddedModel",
    "cache_dir",
    "compute_dtype",
    "import_embedded",
    "load_model",
    "load_tokenizer",
    "resolve_base",
    "tunewise_home",
]
