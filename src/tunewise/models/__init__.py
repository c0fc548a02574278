"""Resolve a base model to a local Hugging Face folder: embedded registry, local folder, hub id."""

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
