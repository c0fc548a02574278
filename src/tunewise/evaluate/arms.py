"""The arms compared on the test split: how each one turns a test item into a prompt."""

from __future__ import annotations

import random

from tunewise.data.records import Example, Message, with_system

BASELINE_ARMS = ("zero_shot", "few_shot", "retrieved_few_shot")
FINETUNED = "finetuned"


def pick_shots(train: list[Example], k: int, seed: int) -> list[Example]:
    """k fixed examples from the train split (the same for every test item)."""
    return random.Random(seed).sample(train, min(k, len(train)))


def zero_shot_prompt(example: Example, system_prompt: str) -> list[Message]:
    return with_system(example.prompt_messages, system_prompt)


def shots_prompt(example: Example, system_prompt: str, shots: list[Example]) -> list[Message]:
    """System prompt, then each shot as a user/assistant exchange, then the test item."""
    demo: list[Message] = []
    for shot in shots:
        demo += [m for m in shot.messages if m["role"] != "system"]
    prompt = with_system(example.prompt_messages, system_prompt)
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    return head + demo + prompt[len(head) :]


def build_prompts(
    arm: str, test: list[Example], system_prompt: str, shots: list[list[Example]]
) -> list[list[Message]]:
    """Prompts of one arm; `shots[i]` are the examples shown before test item i (few-shot arms)."""
    if arm in ("few_shot", "retrieved_few_shot"):
        return [shots_prompt(e, system_prompt, s) for e, s in zip(test, shots)]
    return [zero_shot_prompt(e, system_prompt) for e in test]  # zero_shot and finetuned
