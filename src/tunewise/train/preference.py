"""Preference training on prompt/chosen/rejected pairs: DPO and ORPO losses.

The losses are written here (a few lines each) rather than run through TRL's trainers, so that
preference methods get the same loop as every other method: checkpoints and bit-identical resume,
NaN stops, early stopping, data-parallel steps. Their values are tested against TRL's own loss
functions on the same numbers (tests/unit/test_methods.py).

- DPO (Rafailov et al. 2023, TRL `loss_type="sigmoid"`): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
  with summed sequence log-probs. The reference model is the base with the adapter switched off,
  its log-probs computed once before training (TRL's `precompute_ref_log_probs`). Optional
  `sft_weight` adds the chosen answers' per-token NLL (TRL's `rpo_alpha`).
- ORPO (Hong et al. 2024, TRL `ORPOTrainer`): per-token NLL of the chosen answer
  + beta * -log sigmoid(log odds(chosen) - log odds(rejected)), with mean per-token log-probs.
  No reference model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunewise.data import Example, with_system
from tunewise.models.chat import ChatFormat, Encoded


@dataclass(frozen=True)
class Pair:
    chosen: Encoded
    rejected: Encoded

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def encode_pair(chat: ChatFormat, example: Example, system_prompt: str) -> Pair:
    """Both answers under the chat template; labels only on the final assistant turn."""
    chosen = with_system(example.messages, system_prompt)
    rejected = [*chosen[:-1], {"role": "assistant", "content": example.rejected or ""}]
    return Pair(*(chat.encode(m, final_only=True) for m in (chosen, rejected)))


def dpo_losses(pi_c, pi_r, ref_c, ref_r, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the DPO loss, and the implicit reward margin (positive: chosen preferred)."""
    logits = (pi_c - ref_c) - (pi_r - ref_r)
    return -F.logsigmoid(beta * logits), beta * logits


def orpo_losses(avg_c, avg_r, nll_c, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the ORPO loss from mean per-token log-probs, and the log odds ratio."""
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    return nll_c - beta * F.logsigmoid(log_odds), log_odds
