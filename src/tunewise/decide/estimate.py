"""Training-memory estimates per fine-tuning method: rules of thumb, not measurements."""

from __future__ import annotations

import math
from typing import Literal

Method = Literal["lora", "qlora", "full"]

BYTES_PER_PARAM: dict[str, float] = {
    "full": 16.0,  # bf16 weights (2) + grads (2) + fp32 master weights (4) + Adam m, v (8)
    "lora": 2.0,  # frozen bf16 weights
    "qlora": 0.55,  # frozen 4-bit NF4 weights with double-quantized scales
}
ADAPTER_FRACTION = 0.01  # LoRA adapters hold about 1% as many parameters as the model
ADAPTER_BYTES = 16.0  # each trainable parameter costs what it costs in full fine-tuning
LAYERS = 32  # layer count assumed for every size; hidden size carries the scaling
CHECKPOINT_BYTES = 2 * LAYERS  # bf16 input of every layer, kept by gradient checkpointing
LAYER_BYTES = 34  # activations of the one layer being recomputed (Korthikanti et al. 2022)
VOCAB = 50_000  # typical vocabulary size
LOGIT_BYTES = 8  # fp32 logits and their gradient
OVERHEAD = 1.2  # CUDA context, allocator fragmentation, temporary buffers


def estimate_train_memory_gb(
    params_b: float, method: Method, seq_len: int = 1024, batch_size: int = 4
) -> float:
    """Rough peak training memory in GB (1e9 bytes) for a model of `params_b` billion params.

    A rough estimate for choosing a method, not a measurement; expect real runs to differ
    by tens of percent. The rules of thumb:

    - weights and optimizer: `BYTES_PER_PARAM[method]` per parameter; LoRA and QLoRA add
      adapters of 1% of the parameters at 16 bytes each (weight, grad, Adam states).
    - activations, with gradient checkpointing, per token: 2 bytes per hidden unit for each
      of 32 layers, plus 34 bytes per hidden unit for the layer being recomputed. The
      hidden size is approximated as 4096 * sqrt(params_b / 7) (4096 for a 7B model).
    - logits: 8 bytes per token for each of 50,000 vocabulary entries.
    - everything times 1.2 for the CUDA context and fragmentation.
    """
    if params_b <= 0 or seq_len <= 0 or batch_size <= 0:
        raise ValueError("params_b, seq_len and batch_size must be positive")
    params = params_b * 1e9
    weights = params * BYTES_PER_PARAM[method]
    if method != "full":
        weights += params * ADAPTER_FRACTION * ADAPTER_BYTES
    tokens = batch_size * seq_len
    hidden = 4096 * math.sqrt(params_b / 7)
    activations = tokens * hidden * (CHECKPOINT_BYTES + LAYER_BYTES)
    logits = tokens * VOCAB * LOGIT_BYTES
    return round((weights + activations + logits) * OVERHEAD / 1e9, 1)
