"""The CPU training levers that pay: what `cpu_fast_path` switches on (bench/README.md has each
one's measured gain, and bench/train_levers.py re-measures them).

None of them changes what is computed, only how: the dropout still drops each LoRA input at
rate p (q/k/v now share one mask), the normalization and the attention give the same forward
values bit for bit, and the LoRA forward computes PEFT's sum in another order. Tests compare each
against the plain path (tests/unit/test_train_components.py).
"""

from __future__ import annotations

import types

import numpy as np
import torch

from tunewise.train.methods import Trainable

EAGER_UP_TO = 512  # tokens: eager attention keeps every (T x T) score matrix for the backward pass
GROUPED_EAGER = "tunewise_grouped_eager"  # the name the attention below is registered under in transformers


class CheapDropout(torch.nn.Module):
    """Dropout whose mask is cheap to draw and cheap to apply, drawn once per input.

    torch's CPU `bernoulli_` draws one number per element on one thread, and `where`-style masking
    takes two passes each way; on the LoRA inputs of every q/k/v/o module that was 14% of a training
    step (bench/README.md). Here one 64-bit word of numpy's PCG64 (seeded by one draw from torch's
    generator, so seeds and checkpointed RNG states still reproduce a run) gives four 16-bit
    uniforms; read as signed, each is kept when >= round(p * 2^16) - 2^15, that is with probability
    1 - round(p * 2^16) / 2^16: independent Bernoulli masks with p within 2^-17 of the asked rate. The mask is built as 0/1 values in the input's dtype, so
    applying it is one plain multiply forward and one backward, and the kept values are scaled by
    exactly 1 / keep probability.

    One instance serves every LoRA module of a decoder layer. Called again with the very tensor it
    saw last (q, k and v all read the same normalized hidden state), it returns the same dropped
    tensor: each module still sees its input dropped at rate p, but q/k/v share one mask instead of
    drawing three."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536)
        self.scale = 65536 / (65536 - self.threshold)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, input * mask)
        self._scaled: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, input * mask * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * mask / keep probability (PEFT's own LoRA forward calls this)."""
        if not self.training or self.threshold == 0:
            return x
        if self._scaled is not None and self._scaled[0] is x:
            return self._scaled[1]
        dropped = self.masked(x) * self.scale
        self._scaled = (x, dropped)
        return dropped

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x * mask, not rescaled: the fused LoRA forward folds 1 / keep probability into B instead."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        if x.device.type != "cpu":
            dropped = x * torch.empty_like(x).bernoulli_(1 - self.threshold / 65536)
        else:
            dropped = x * self.mask(x.shape, x.dtype)
        self._last = (x, dropped)
        return dropped

    def mask(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """0/1 keep mask of `shape` in `dtype`, kept with probability 1 - threshold / 2^16."""
        n = shape.numel()
        seed = int(torch.empty((), dtype=torch.int64).random_())  # torch's generator drives the stream
        words = np.random.PCG64(seed).random_raw((n + 3) // 4)  # (n/4,) uint64: four 16-bit uniforms each
        keep = words.view(np.int16)[:n] >= self.threshold - 32768  # signed view: uniform on [-2^15, 2^15)
        if dtype == torch.bfloat16:  # numpy has no bfloat16: write the bit pattern of 1.0 (0x3F80)
            bits = keep.view(np.uint8).astype(np.int16)
            bits *= 0x3F80
            return torch.from_numpy(bits).view(torch.bfloat16).view(shape)
        return torch.from_numpy(keep).view(shape).to(dtype)

    def train(self, mode: bool = True):
        self._last = self._scaled = None  # nothing is reused across a switch to evaluation and back
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"p={self.p}"


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # read one input in Llama-style blocks


class SharedInputLoRA:
    """The LoRA A matrices of sibling modules that read the same input (q/k/v, gate/up): one product.

    The first module called with an input computes x @ [A_q; A_k; A_v]^T for all of them; the
    others, called with the very same tensor, take their columns of it. An input that is not the
    last one seen, or A weights changed since, starts a new product, so a module called alone still
    gets the right answer."""

    def __init__(self, modules: list[torch.nn.Module], adapter: str):
        self.adapter = adapter
        self.weights = [m.lora_A[adapter].weight for m in modules]
        starts = np.cumsum([0] + [w.shape[0] for w in self.weights])
        self.columns = {id(m): (int(starts[i]), int(starts[i + 1])) for i, m in enumerate(modules)}
        self._last: tuple | None = None  # (input, weight versions, x @ A_all^T)

    def hidden(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        versions = tuple(w._version for w in self.weights)
        if self._last is None or self._last[0] is not x or self._last[1] != versions:
            self._last = (x, versions, torch.nn.functional.linear(x, torch.cat(self.weights)))
        start, end = self.columns[id(module)]
        return self._last[2][..., start:end]


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward for one plain adapter, in fewer passes over the activations.

    PEFT computes base(x) + B(A(dropout(x))) * scaling: a dropout rescale, a scaling product and a
    sum, each a pass forward and backward. Here the rescale and the scaling are folded into B's
    (r-wide) weight, the sum into the product (addmm), and siblings share A's product. Anything
    else (adapters off, merged, several adapters, DoRA, a LoRA bias, extra arguments) takes PEFT's
    own forward."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dropout, scale = self.lora_dropout[name], self.scaling[name]
    if isinstance(dropout, CheapDropout):
        if dropout.training and dropout.threshold:
            x, scale = dropout.masked(x), scale * dropout.scale
    elif not isinstance(dropout, torch.nn.Identity):
        x = dropout(x)
    group: SharedInputLoRA | None = self._tunewise_shared
    hidden = group.hidden(self, x) if group is not None and group.adapter == name else self.lora_A[name](x)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                      (self.lora_B[name].weight * scale).t())
    return out.view(result.shape)


class FusedRMSNorm(torch.autograd.Function):
    """transformers' Llama-style RMSNorm, `w * (x / rms(x)).to(x.dtype)` with the mean square in fp32,
    with a hand-written backward.

    The forward runs the same operations in the same order, so its values are bit-identical. The
    backward saves only the input and one fp32 reciprocal per row, where autograd's chain of casts,
    powers and products saved an fp32 copy of every activation and took about twice the passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        reciprocal = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, reciprocal)
        return weight * (xf * reciprocal).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, reciprocal = ctx.saved_tensors
        normed = x.to(torch.float32) * reciprocal  # (..., H) fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = (grad * weight).to(x.dtype).to(torch.float32)
        grad_x = reciprocal * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def _fused_rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return FusedRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """A norm computing exactly what LlamaRMSNorm computes (Qwen2, Mistral and others copy it verbatim)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forward, reference = getattr(type(module), "forward", None), LlamaRMSNorm.forward
    code = getattr(forward, "__code__", None)
    return (code is not None and hasattr(module, "variance_epsilon") and isinstance(module.weight, torch.nn.Parameter)
            and (code.co_code, code.co_consts, code.co_names)
            == (reference.__code__.co_code, reference.__code__.co_consts, reference.__code__.co_names))


def grouped_eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' eager attention without copying keys and values once per query head.

    Grouped-query attention shares each key/value head among `groups` query heads; the eager path
    repeats k and v `groups` times (a copy forward, a sum backward). Here the query heads of a
    group are stacked along the sequence instead, (B, kv, groups*T, d), so one product per kv head
    serves them all. Scores are scaled through the queries (a power of two for usual head sizes,
    where that is exact), and the softmax runs in fp32 as in the eager path."""
    b, heads, t, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    groups = heads // kv
    q = (query * scaling).reshape(b, kv, groups * t, d)
    scores = torch.matmul(q, key.transpose(2, 3)).view(b, kv, groups, t, s)  # (B, kv, groups, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :s]  # (B, 1, 1, T, S) additive mask
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs.view(b, kv, groups * t, s), value)  # (B, kv, groups*T, d)
    return out.view(b, heads, t, d).transpose(1, 2).contiguous(), probs.view(b, heads, t, s)


def _register_grouped_eager() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)  # the same additive float mask as eager


def cpu_fast_path(tr: Trainable, dtype: torch.dtype, max_seq_len: int) -> list[str]:
    """Switch on the CPU levers for this model; returns what was switched on, for the start line.

    - LoRA dropout masks from CheapDropout instead of one bernoulli draw per element, one mask per
      distinct input of a decoder layer (q/k/v share theirs);
    - LoRA inputs stay in the 16-bit compute dtype (PEFT casts them to the fp32 adapter weights'
      dtype, and autocast casts them straight back for the matrix product);
    - plain LoRA Linear layers through _fused_lora_forward, siblings sharing one A product;
    - Llama-style RMSNorms through FusedRMSNorm;
    - eager attention (grouped_eager_attention) instead of SDPA's CPU flash kernel, which is slower
      at these lengths; only up to EAGER_UP_TO tokens."""
    if torch.cuda.is_available():
        return []
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    used = []
    replaced = norms = fused = 0
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
            if type(module) is LoraLinear:  # exactly PEFT's plain Linear (not its bitsandbytes subclasses)
                module._tunewise_shared = None
                module.forward = types.MethodType(_fused_lora_forward, module)
                fused += 1
        for parent in layer.modules():
            for names in SIBLINGS:
                group = [getattr(parent, n) for n in names if isinstance(getattr(parent, n, None), LoraLinear)]
                adapters = {tuple(m.lora_A) for m in group}
                if len(group) > 1 and len(adapters) == 1 and len(next(iter(adapters))) == 1:
                    shared_input = SharedInputLoRA(group, next(iter(adapters))[0])
                    for m in group:
                        m._tunewise_shared = shared_input
    for module in tr.causal_lm.modules():
        if _is_llama_rms_norm(module):
            module.forward = types.MethodType(_fused_rms_forward, module)
            norms += 1
    if replaced:
        used.append("cheap shared dropout masks")
    if dtype != torch.float32 and tr.is_adapter:
        used.append("16-bit LoRA inputs")
    if fused:
        used.append("fused LoRA forward")
    if norms:
        used.append("fused RMSNorm")
    if max_seq_len <= EAGER_UP_TO:
        _register_grouped_eager()
        tr.causal_lm.set_attn_implementation(GROUPED_EAGER)
        used.append("grouped eager attention")
    return used
