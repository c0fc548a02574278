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

from tunewise.config import Config
from tunewise.errors import TunewiseError
from tunewise.models import load_model

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_LR = {"lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "full": 2e-5, "prompt_tuning": 3e-2, "dpo": 5e-5,
              "orpo": 1e-4}


@dataclass
class Trainable:
    model: torch.nn.Module  # what save_pretrained is called on: a PeftModel, or the causal LM itself (full)
    causal_lm: torch.nn.Module  # the *ForCausalLM the loss runs through
    params: list[torch.nn.Parameter]  # the trained weights, fp32
    prefix: Callable[[int], torch.Tensor] | None  # prompt tuning: batch size -> (B, P, H) soft prompt
    describe: str

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


def learning_rate(config: Config) -> float:
    return config.train.lr or DEFAULT_LR[config.method]


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


def build(config: Config, base_path: Path, dtype: torch.dtype) -> Trainable:
    """The model for `config.method`, with only the weights that method trains requiring grad."""
    from peft import get_peft_model

    method, lora = config.method, config.lora
    if method == "full":
        model = load_model(base_path, dtype=torch.float32)  # fp32 master weights; autocast computes in `dtype`
        model.config.use_cache = False
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        return Trainable(model, model, params, None, "full fine-tuning (every weight, fp32 master copy)")

    base = _quantized_base(base_path, dtype) if method == "qlora" else load_model(base_path, dtype=dtype)
    base.config.use_cache = False
    if method == "prompt_tuning":
        from peft import PromptTuningConfig

        pt = config.prompt_tuning
        text = pt.init_text if pt.init_text is not None else config.task.system_prompt or None
        peft_config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=pt.virtual_tokens,
            prompt_tuning_init="TEXT" if text else "RANDOM", prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(base_path) if text else None,
        )
        describe = f"prompt tuning ({pt.virtual_tokens} virtual tokens, init {'from text' if text else 'random'})"
    else:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha or 2 * lora.r, lora_dropout=lora.dropout, bias=lora.bias,
            target_modules=target_modules(base, lora.target_modules), use_dora=method == "dora",
            task_type="CAUSAL_LM",
        )
        kind = {"dora": "DoRA", "qlora": "QLoRA (4-bit NF4 base, double quantization)"}.get(method, "LoRA")
        objective = {"dpo": " trained with DPO", "orpo": " trained with ORPO"}.get(method, "")
        describe = f"{kind} r={lora.r} alpha={lora.alpha or 2 * lora.r}{objective}"
    model = get_peft_model(base, peft_config)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    prefix = (lambda batch: model.get_prompt(batch)) if method == "prompt_tuning" else None
    return Trainable(model, model.get_base_model(), params, prefix, describe)


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far (CPU), or peak CUDA memory allocated."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CheapDropout(torch.nn.Module):
    """Dropout whose mask costs a quarter of a random draw per element, drawn once per input.

    torch's CPU `bernoulli_` draws one number per element on one thread; on the LoRA inputs of
    every q/k/v/o module that was 14% of a training step (bench/README.md). Here one 64-bit draw
    gives four 15-bit uniforms, each kept when >= round(p * 2^15): independent Bernoulli masks with
    p within 2^-16 of the asked rate, scaled exactly by 1 / keep probability, drawn from torch's
    own generator (so seeds and checkpointed RNG states still reproduce a run).

    One instance serves every LoRA module of a decoder layer. Called again with the very tensor
    it saw last (q, k and v all read the same normalized hidden state), it returns the same
    dropped tensor: each module still sees its input dropped at rate p, but q/k/v share one mask
    instead of drawing three."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 32768)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        keep = (words.view(torch.int16)[:n].view(x.shape) & 0x7FFF) >= self.threshold
        dropped = torch.where(keep, x * (32768 / (32768 - self.threshold)), 0)
        self._last = (x, dropped)
        return dropped

    def train(self, mode: bool = True):
        self._last = None  # nothing is reused across a switch to evaluation and back
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def cpu_fast_path(tr: Trainable, dtype: torch.dtype, max_seq_len: int) -> list[str]:
    """The CPU training levers that pay (bench/README.md has each one's measured gain).

    - LoRA dropout masks from CheapDropout instead of one bernoulli draw per element, one mask
      per distinct input of a decoder layer (q/k/v share theirs);
    - LoRA inputs stay in the 16-bit compute dtype (PEFT casts them to the fp32 adapter weights'
      dtype, and autocast casts them straight back for the matrix product);
    - eager attention instead of SDPA's CPU flash kernel, which is slower at these lengths; only
      up to 512 tokens, since eager keeps every (T x T) attention matrix for the backward pass.
    Returns what was switched on, for the start-of-training line."""
    if torch.cuda.is_available():
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    used = []
    replaced = 0
    for layer in tr.causal_lm.get_decoder().layers:
        shared: dict[tuple[str, float], CheapDropout] = {}  # one per adapter and rate in this layer
        for module in layer.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "lora_dropout"):
                for name, dropout in module.lora_dropout.items():
                    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                        module.lora_dropout[name] = shared.setdefault((name, dropout.p), CheapDropout(dropout.p))
                        replaced += 1
                if dtype != torch.float32:
                    module.cast_input_dtype_enabled = False
    if replaced:
        used.append("cheap shared dropout masks")
    if dtype != torch.float32 and tr.is_adapter:
        used.append("16-bit LoRA inputs")
    if max_seq_len <= 512:
        tr.causal_lm.set_attn_implementation("eager")
        used.append("eager attention")
    return used
