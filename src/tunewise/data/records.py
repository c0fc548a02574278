"""The canonical data record: a chat (a list of {role, content}) and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One normalized example; `source` is 'file:line' of the input row."""

    messages: list[Message]
    source: str
    rejected: str | None = field(default=None)

    @property
    def prompt_messages(self) -> list[Message]:
        """Everything before the final assistant turn."""
        return self.messages[:-1]

    @property
    def target(self) -> str:
        """The final assistant turn: what the model must produce."""
        return self.messages[-1]["content"]

    def to_json(self) -> dict:
        row: dict = {"messages": self.messages, "source": self.source}
        if self.rejected is not None:
            row["rejected"] = self.rejected
        return row

    @classmethod
    def from_json(cls, row: dict) -> "Example":
        return cls(messages=row["messages"], source=row["source"], rejected=row.get("rejected"))


def with_system(messages: list[Message], system_prompt: str) -> list[Message]:
    """Prepend the task's system prompt unless the chat has its own or the prompt is empty."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]
