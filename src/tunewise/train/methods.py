"""What is trained, per `method:`: the model, its trainable weights, and how they are saved.

| method         | base weights                   | trained (fp32)                 | artifact (loads in)          |
|----------------|--------------------------------|--------------------------------|------------------------------|
| lora, dpo, orpo| compute dtype, frozen          | LoRA A/B                       | PEFT adapter (PeftModel)     |
| dora           | compute dtype, frozen          | LoRA A/B + magnitude vectors   | PEFT adapter (PeftModel)     |
| qlora          | 4-bit NF4, double-quantized    | LoRA A/B                       | PEFT adapter (PeftModel)     |
| prompt_tuning  | compute dtype, frozen          | virtual-token embeddings       | PEFT adapter (PeftModel)     |
| full           | fp32, all trained              | every weight                   | model folder (AutoModel...)  |
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tunewise.errors import TunewiseError
from tunewise.models import load_model

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class Trainable:
    model: torch.nn.Module  # what save_pretrained is called on: a PeftModel, or the causal LM itself (full)
    causal_lm: torch.nn.Module  # the *ForCausalLM the loss runs through
    params: list[torch.nn.Parameter]  # the trained weights, fp32
    prefix: Callable[[int], torch.Tensor] | None  # prompt tuning: batch size -> (B, P, H) soft prompt
    describe: str
    shape: dict  # the adapter as built (plan.adapter_shape with LoRA targets resolved); {} for full

    @property
    def is_adapter(self) -> bool:
        return self.model is not self.causal_lm

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def linear_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def target_modules(model, preset: str | list[str]) -> str | list[str]:
    if preset == "all-linear":
        return "all-linear"
    wanted = list(ATTENTION) if preset == "attention" else list(preset)
    present = linear_names(model) - {"lm_head"}
    missing = [m for m in wanted if m not in present]
    if missing:
        raise TunewiseError(
            f"target modules {missing} do not exist in this model",
            field="lora.target_modules",
            fix=f"choose from: {', '.join(sorted(present))} (or the presets 'attention', 'all-linear')",
        )
    return wanted


def _quantized_base(base_path: Path, dtype: torch.dtype):
    """The base in 4-bit NF4 with double quantization (QLoRA), or a clear reason it cannot be."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception as err:  # ImportError, or a broken native library
        raise TunewiseError(
            f"method qlora needs bitsandbytes, which cannot be imported here ({err})",
            field="method",
            fix="pip install 'bitsandbytes>=0.50' (it runs on CPU and CUDA), or use method: lora "
                "(same adapter, 16-bit base)",
        )
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    fix = "use method: lora (the same adapter on a 16-bit base)"
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, dtype=dtype,
                                                     use_safetensors=True)
    except (RuntimeError, ValueError, NotImplementedError) as err:  # no bitsandbytes backend for this device
        raise TunewiseError(f"bitsandbytes cannot quantize this model to 4 bits on this machine: {err}",
                            field="method", fix=f"{fix}, or a machine where bitsandbytes has a backend")
    # bitsandbytes quantizes each weight row in blocks of 64; its kernels fail on rows that are not
    # whole blocks (a 32-wide layer dies mid-forward with "shape '[32, 0]' is invalid")
    narrow = sorted({f"{name.rsplit('.', 1)[-1]} ({module.in_features})" for name, module in model.named_modules()
                     if type(module).__name__ == "Linear4bit" and module.in_features % 64})
    if narrow:
        raise TunewiseError(f"bitsandbytes' 4-bit layers need inputs in whole blocks of 64 values; this model's "
                            f"{', '.join(narrow)} are not", field="method", fix=fix)
    return model


def build(method: str, shape: dict, base_path: Path, dtype: torch.dtype, place=None) -> Trainable:
    """The model for `method`, with the adapter `shape` (plan.adapter_shape) and only the weights
    that method trains requiring grad; loaded straight onto `place`'s device (a
    models.device.Placement) where it is not the CPU."""
    from peft import get_peft_model

    if method == "full":
        model = load_model(base_path, dtype=torch.float32, place=place)  # fp32 master weights; autocast computes in `dtype`
        model.config.use_cache = False
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        return Trainable(model, model, params, None, "full fine-tuning (every weight, fp32 master copy)", {})

    base = _quantized_base(base_path, dtype) if method == "qlora" else load_model(base_path, dtype=dtype, place=place)
    base.config.use_cache = False
    if method == "prompt_tuning":
        from peft import PromptTuningConfig

        text = shape["init_text"]
        peft_config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=shape["virtual_tokens"],
            prompt_tuning_init="TEXT" if text else "RANDOM", prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(base_path) if text else None,
        )
        describe = f"prompt tuning ({shape['virtual_tokens']} virtual tokens, init {'from text' if text else 'random'})"
    else:
        from peft import LoraConfig

        shape = {**shape, "target_modules": target_modules(base, shape["target_modules"])}
        peft_config = LoraConfig(
            r=shape["r"], lora_alpha=shape["alpha"], lora_dropout=shape["dropout"], bias=shape["bias"],
            target_modules=shape["target_modules"], use_dora=shape["use_dora"], task_type="CAUSAL_LM",
        )
        kind = {"dora": "DoRA", "qlora": "QLoRA (4-bit NF4 base, double quantization)"}.get(method, "LoRA")
        objective = {"dpo": " trained with DPO", "orpo": " trained with ORPO"}.get(method, "")
        describe = f"{kind} r={shape['r']} alpha={shape['alpha']}{objective}"
    model = get_peft_model(base, peft_config)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    prefix = (lambda batch: model.get_prompt(batch)) if method == "prompt_tuning" else None
    return Trainable(model, model.get_base_model(), params, prefix, describe, shape)


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far (CPU), or peak CUDA memory allocated."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
