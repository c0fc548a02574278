"""The decide stage: is fine-tuning the right tool, and which method fits the hardware?"""

from tunewise.decide.estimate import estimate_train_memory_gb
from tunewise.decide.framework import (
    QUESTIONS,
    Answers,
    Decision,
    Question,
    ask,
    load_answers,
    recommend,
)

__all__ = [
    "QUESTIONS",
    "Answers",
    "Decision",
    "Question",
    "ask",
    "estimate_train_memory_gb",
    "load_answers",
    "recommend",
]
