"""Causal-LM loss with the LM head applied only at supervised positions.

The LM head (hidden x vocab) is the largest matrix of a small model; computing it only where a
label exists gives the same loss as `model(labels=...)` at a fraction of the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunewise.train.tokenize import IGNORE


def supervised_loss(
    causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labeled positions, and how many there were.

    `causal_lm` is a transformers *ForCausalLM (LoRA layers, if any, are inside it).
    """
    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    supervised = targets != IGNORE  # (B, T-1)
    picked = hidden[:, :-1][supervised]  # (N, H)
    logits = causal_lm.get_output_embeddings()(picked).float()  # (N, V)
    n = int(supervised.sum())
    return F.cross_entropy(logits, targets[supervised], reduction="mean"), n
