"""Causal-LM losses with the LM head applied only where they are needed.

The LM head (hidden x vocab) is the largest matrix of a small model; computing it only where a
label exists gives the same loss as `model(labels=...)` at a fraction of the work.

`prefix` is a (B, P, H) block of trained embeddings put before the inputs (prompt tuning); the
positions it adds are never labeled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunewise.models.chat import IGNORE


def _hidden(causal_lm, input_ids, attention_mask, prefix: torch.Tensor | None) -> torch.Tensor:
    decoder = causal_lm.get_decoder()
    if prefix is None:
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    embeds = causal_lm.get_input_embeddings()(input_ids)
    embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
    return decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, prefix.shape[1] :]


def token_logprobs(
    causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each labeled next token, flat (N,), and the (B, T-1) mask of where they are."""
    hidden = _hidden(causal_lm, input_ids, attention_mask, prefix)  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    supervised = targets != IGNORE  # (B, T-1)
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][supervised]).float()  # (N, V)
    return -F.cross_entropy(logits, targets[supervised], reduction="none"), supervised


def supervised_loss(
    causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labeled positions, and how many there were.

    `causal_lm` is a transformers *ForCausalLM (LoRA layers, if any, are inside it). The caller
    divides by the token count of everything that makes one optimizer step (all micro-batches,
    all processes), so the gradient does not depend on how the step was split.
    """
    logprobs, supervised = token_logprobs(causal_lm, input_ids, attention_mask, labels, prefix)
    return -logprobs.sum(), int(supervised.sum())


def sequence_logprobs(
    causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labeled tokens (B,), and their count (B,)."""
    logprobs, supervised = token_logprobs(causal_lm, input_ids, attention_mask, labels, prefix)
    # the row index lives where the mask does: a CPU arange indexed by a CUDA mask fails on a GPU
    rows = torch.arange(supervised.shape[0], device=supervised.device).unsqueeze(1).expand_as(supervised)[supervised]
    sums = torch.zeros(supervised.shape[0], dtype=logprobs.dtype, device=logprobs.device)
    return sums.index_add(0, rows.to(logprobs.device), logprobs), supervised.sum(dim=1)
