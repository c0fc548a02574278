"""The canonical data record: a chat (a list of {role, content}) and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One normalized example.

    `source` is 'file:line' of the input row; `rejected` is the dispreferred final assistant
    turn of a preference pair; `meta` keeps raw fields the split needs (group or time keys).
    """

    messages: list[Message]
    source: str
    rejected: str | None = field(default=None)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[Message]:
        """Everything before the final assistant turn."""
        return self.messages[:-1]

    @property
    def target(self) -> str:
        """The final assistant turn: what the model must produce."""
        return self.messages[-1]["content"]

    @property
    def input_text(self) -> str:
        """Every turn before the final assistant turn, one string ("" for raw text)."""
        return "\n".join(m["content"] for m in self.prompt_messages)

    @property
    def prompt_text(self) -> str:
        """The user-side text (what a test item asks), for decontamination."""
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def text(self) -> str:
        """Every turn, one string (for duplicate detection)."""
        return "\n".join(m["content"] for m in self.messages)

    def to_json(self) -> dict:
        row: dict = {"messages": self.messages, "source": self.source}
        if self.rejected is not None:
            row["rejected"] = self.rejected
        if self.meta:
            row["meta"] = self.meta
        return row

    @classmethod
    def from_json(cls, row: dict) -> "Example":
        return cls(messages=row["messages"], source=row["source"], rejected=row.get("rejected"),
                   meta=row.get("meta", {}))


def with_system(messages: list[Message], system_prompt: str) -> list[Message]:
    """Prepend the task's system prompt unless the chat has its own or the prompt is empty."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]
