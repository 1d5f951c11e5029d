"""Conversation and Message: the one in-memory form of chat data, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # "file:line" where it was read, for error messages
    id: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    @property
    def turns(self) -> list[Message]:
        """Messages after the system prompt."""
        return self.messages[1:] if self.system is not None else list(self.messages)

    def to_sharegpt(self) -> dict:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        record: dict = {"conversations": [{"from": names[m.role], "value": m.content} for m in self.messages]}
        if self.id:
            record = {"id": self.id, **record}
        return record

    def to_openai(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @classmethod
    def from_pairs(cls, *pairs: tuple[str, str], system: str | None = None) -> "Conversation":
        """Build from (role, content) tuples; handy in code and tests."""
        messages = [Message("system", system)] if system is not None else []
        messages += [Message(role, content) for role, content in pairs]  # type: ignore[arg-type]
        return cls(messages)
