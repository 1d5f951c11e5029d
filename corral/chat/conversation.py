"""Conversation and Message: the one in-memory form of chat data, whatever file it came from.

Tool use lives here too: an assistant message may carry `tool_calls` (with or without text), a `tool` message
carries one call's result, and a Conversation carries the tool definitions it was written against
(OpenAI's `{"type": "function", "function": {"name", "description", "parameters"}}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass
class ToolCall:
    """One function call an assistant message makes: `arguments` is the parsed JSON object, not its text."""

    id: str
    name: str
    arguments: dict

    def to_openai(self) -> dict:
        """OpenAI's shape: the arguments as a JSON string, as the API sends them."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def to_hf(self) -> dict:
        """The shape transformers' chat templates take: the arguments as a dict."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    """One turn. `Message(role, content)` is the plain case; an assistant message may have empty content and
    `tool_calls`; a `tool` message has the call's `tool_call_id` (and optionally the function's `name`) and the
    result text in `content`."""

    role: Role
    content: str
    # hash=False: a list cannot be hashed, and plain messages hash as they always did.
    tool_calls: list[ToolCall] = field(default_factory=list, hash=False)
    tool_call_id: str = ""
    name: str = ""

    def to_openai(self) -> dict:
        """This message as an OpenAI chat message (calls with their arguments as JSON strings)."""
        record: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            record["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.tool_call_id:
            record["tool_call_id"] = self.tool_call_id
        if self.name:
            record["name"] = self.name
        return record

    def to_hf(self) -> dict:
        """This message as transformers' apply_chat_template takes it (calls' arguments as dicts)."""
        record = self.to_openai()
        if self.tool_calls:
            record["tool_calls"] = [call.to_hf() for call in self.tool_calls]
        return record


def next_roles(previous: Message | None) -> tuple[str, ...]:
    """The roles that may follow `previous` (None or a system message: the first turn). Plain chat alternates
    user/assistant; an assistant message with calls is followed by their results (`tool`), and results by
    more results or the assistant's next turn."""
    if previous is None or previous.role == "system":
        return ("user",)
    if previous.role == "user":
        return ("assistant",)
    if previous.role == "assistant":
        return ("tool",) if previous.tool_calls else ("user",)
    return ("tool", "assistant")


@dataclass
class Conversation:
    """A conversation: messages (an optional system message first), where it was read, and the tool
    definitions its messages may call (empty for plain chat)."""

    messages: list[Message]
    source: str = ""  # "file:line" where it was read, for error messages
    id: str = ""
    meta: dict = field(default_factory=dict)
    tools: list[dict] = field(default_factory=list)  # OpenAI tool definitions

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    @property
    def turns(self) -> list[Message]:
        """Messages after the system prompt."""
        return self.messages[1:] if self.system is not None else list(self.messages)

    @property
    def uses_tools(self) -> bool:
        """Whether rendering this conversation needs a template that carries tools."""
        return bool(self.tools) or any(m.tool_calls or m.role == "tool" for m in self.messages)

    def to_sharegpt(self) -> dict:
        """ShareGPT, with tool use in LLaMA-Factory's variant: a call is a `function_call` turn (a JSON
        object, or a list of them for parallel calls), its result an `observation`, definitions in `tools`."""
        names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
        turns: list[dict] = []
        for m in self.messages:
            if m.tool_calls:
                if m.content:  # the text before the calls: a gpt turn of its own
                    turns.append({"from": "gpt", "value": m.content})
                calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
                value = calls[0] if len(calls) == 1 else calls
                turns.append({"from": "function_call", "value": json.dumps(value, ensure_ascii=False)})
            elif m.role == "tool":  # the id too, so results read back answer the calls they answered
                turns.append({"from": "observation", "value": m.content}
                             | ({"tool_call_id": m.tool_call_id} if m.tool_call_id else {}))
            else:
                turns.append({"from": names[m.role], "value": m.content})
        record: dict = {"conversations": turns}
        if self.tools:
            record["tools"] = self.tools
        if self.id:
            record = {"id": self.id, **record}
        return record

    def to_openai(self) -> list[dict]:
        """The messages as OpenAI chat messages (the tool definitions are `tools`, kept apart as the API does)."""
        return [m.to_openai() for m in self.messages]

    def to_hf(self) -> list[dict]:
        """The messages as transformers' apply_chat_template takes them (pass `tools=conv.tools` with them)."""
        return [m.to_hf() for m in self.messages]

    @classmethod
    def from_pairs(cls, *pairs: tuple[str, str], system: str | None = None) -> "Conversation":
        """Build from (role, content) tuples; handy in code and tests."""
        messages = [Message("system", system)] if system is not None else []
        messages += [Message(role, content) for role, content in pairs]  # type: ignore[arg-type]
        return cls(messages)
