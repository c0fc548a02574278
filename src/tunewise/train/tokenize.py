"""Chat -> token ids with labels on the assistant's tokens only, under the model's chat template."""

from __future__ import annotations

from dataclasses import dataclass

from tunewise.data.records import Message, render_ids
from tunewise.errors import TunewiseError

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE everywhere but the assistant's tokens

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_chat(tokenizer, messages: list[Message]) -> Encoded:
    """Every assistant turn is supervised: its tokens (and the end-of-turn token) carry labels.

    The assistant span of turn i is what the template adds between messages[:i] with the
    generation prompt and messages[:i+1]; templates where that is not a prefix are refused.
    """
    input_ids = render_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_ids(tokenizer, messages[:i], generation_prompt=True))
        upto = render_ids(tokenizer, messages[: i + 1], generation_prompt=False)
        if input_ids[: len(upto)] != upto or start >= len(upto):
            raise TunewiseError(
                "the chat template does not render turns as prefixes, so assistant tokens cannot be found",
                field="model.base",
                fix="use a model with a standard chat template (ChatML, Llama, ...)",
            )
        labels[start : len(upto)] = input_ids[start : len(upto)]
    return Encoded(input_ids=input_ids, labels=labels)
