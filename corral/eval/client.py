"""The judge's side of an OpenAI-compatible chat endpoint: one request per judgment, optionally asking
for the log-probabilities of each reply token (`logprobs=true, top_logprobs=K`) and for a JSON
schema the reply must follow (`response_format={"type": "json_schema", ...}`).

The reply is read in OpenAI's documented shape: `choices[0].message.content`,
`choices[0].finish_reason` and `choices[0].logprobs.content[i].{token, bytes, logprob,
top_logprobs[j].{token, bytes, logprob}}`. Any server that answers in that shape (OpenAI, vLLM,
`corral serve`) works; one that ignores `logprobs` gives `logprobs=None` and the caller falls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from corral.chat.conversation import Conversation, Message
from corral.generate.sampling import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """One reply token: its text, its UTF-8 bytes (None where the server sent none), its log-probability
    and the most likely alternatives at its position as (text, logprob), the server's order."""

    token: str
    logprob: float
    bytes: bytes | None = None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class JudgeReply:
    text: str  # the message content as sent, not stripped: token offsets index into it
    finish_reason: str = "stop"
    logprobs: list[TokenLogprob] | None = None  # None: the endpoint returned no logprobs


class Judge(Protocol):
    def ask(self, messages: list[dict], params: SamplingParams, top_logprobs: int = 0,
            response_format: dict | None = None) -> JudgeReply: ...  # fmt: skip


def _token_bytes(value) -> bytes | None:
    return bytes(value) if isinstance(value, list) and all(isinstance(b, int) for b in value) else None


def read_logprobs(choice) -> list[TokenLogprob] | None:
    """`choice.logprobs.content` (OpenAI's shape) as TokenLogprobs; None when the server sent none."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    tokens = []
    for entry in content:
        top = tuple((t.token, float(t.logprob)) for t in (entry.top_logprobs or []))
        tokens.append(TokenLogprob(entry.token, float(entry.logprob), _token_bytes(entry.bytes), top))
    return tokens


@dataclass
class OpenAIJudge:
    """A judge behind any OpenAI-compatible endpoint, through the official `openai` client (its retries
    with backoff on 429 / 5xx / connection errors are the client's own: `OpenAI(max_retries=...)`)."""

    client: object
    model: str

    def ask(self, messages: list[dict], params: SamplingParams, top_logprobs: int = 0,
            response_format: dict | None = None) -> JudgeReply:  # fmt: skip
        options = {}
        if top_logprobs:
            options.update(logprobs=True, top_logprobs=top_logprobs)
        if response_format is not None:
            options["response_format"] = response_format
        response = self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_new_tokens, seed=params.seed, **options,
        )  # fmt: skip
        choice = response.choices[0]
        return JudgeReply(choice.message.content or "", choice.finish_reason or "stop",
                          read_logprobs(choice) if top_logprobs else None)  # fmt: skip


@dataclass
class BackendJudge:
    """A chat backend with `complete(conversation, params)` (corral.serve.backends: a local model) as a
    judge. It returns text only: no logprobs, and it cannot be sent a response_format."""

    backend: object

    def ask(self, messages: list[dict], params: SamplingParams, top_logprobs: int = 0,
            response_format: dict | None = None) -> JudgeReply:  # fmt: skip
        if response_format is not None:
            raise ValueError(f"{type(self.backend).__name__} cannot constrain its replies (constrained=true needs "
                             "an OpenAI-compatible endpoint with response_format)")  # fmt: skip
        reply = self.backend.complete(Conversation([Message(m["role"], m["content"]) for m in messages]), params)
        return JudgeReply(reply.text, reply.finish_reason or "stop", None)


def as_judge(judge) -> Judge:
    """`judge` itself when it has `ask`; a chat backend with `complete` wrapped in BackendJudge."""
    if hasattr(judge, "ask"):
        return judge
    if hasattr(judge, "complete"):
        return BackendJudge(judge)
    raise TypeError(f"{type(judge).__name__} is not a judge (needs ask(messages, params, ...) or complete(...))")
