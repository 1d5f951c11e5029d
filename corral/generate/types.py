"""The seam between generation backends and their callers: the `Engine` protocol and what flows over it.

A caller (server, terminal chat, answer generation, PPO rollouts) submits token ids with
`SamplingParams` and gets back a `Stream` of `TokenEvent`s, or blocks on `generate()` for
`Completion`s. Both backends (`TransformersEngine` in `generate/engine.py`, `VLLMEngine` in
`generate/vllm.py`) implement this protocol, so callers are written once against it.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.generate.sampling import SamplingParams

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability and the most likely alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob)


@dataclass(frozen=True)
class TokenEvent:
    index: int  # which of the request's n replies
    text: str  # text added since this reply's previous event (may be empty)
    token_id: int | None = None  # the sampled token (None on a final flush)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"; set on the last event
    error: str | None = None
    logprob: TokenLogprob | None = None  # when the request asked for logprobs; never for a stop token


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # reply tokens, the stop token included when one ended it
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked: the reply's tokens but a stop token


class Stream:
    """The events of one submitted request. Iterate it (blocking) or `async for` it (when submitted with a loop).
    The engine pushes events from its own thread; `_push` and `_finish_one` are for engines only."""

    def __init__(self, n: int, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None = None):
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.cancelled = False
        self._open = n
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()

    def cancel(self) -> None:
        """Stop generating (the client left, or pressed stop); the engine retires the rows at its next step."""
        self.cancelled = True

    def _push(self, event: TokenEvent | None) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled = True

    def _finish_one(self) -> None:
        self._open -= 1
        if self._open == 0:
            self._push(None)

    def __iter__(self) -> Iterator[TokenEvent]:
        while (event := self._queue.get()) is not None:
            yield event

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while (event := await self._queue.get()) is not None:
            yield event

    def collect(self) -> list[Completion]:
        """Block until done; the n completions in order."""
        gathered = _Gathered(self.n)
        for event in self:
            gathered.add(event)
        return gathered.completions()

    async def acollect(self, on_event: Callable[[TokenEvent], None] | None = None) -> list[Completion]:
        """`collect` for asyncio (a stream submitted with a loop); `on_event` sees each event as it comes."""
        gathered = _Gathered(self.n)
        async for event in self:
            if on_event is not None:
                on_event(event)
            gathered.add(event)
        return gathered.completions()


class _Gathered:
    def __init__(self, n: int):
        self.texts, self.tokens, self.reasons = [""] * n, [[] for _ in range(n)], [""] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def add(self, event: TokenEvent) -> None:
        if event.error:
            raise RuntimeError(f"generation failed: {event.error}")
        self.texts[event.index] += event.text
        if event.token_id is not None:
            self.tokens[event.index].append(event.token_id)
        if event.logprob is not None:
            self.logprobs[event.index].append(event.logprob)
        self.reasons[event.index] = event.finish_reason or self.reasons[event.index]

    def completions(self) -> list[Completion]:
        return [Completion(*fields) for fields in zip(self.texts, self.tokens, self.reasons, self.logprobs)]


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences (replies) in the batch
    waiting: int  # sequences queued for a place in it
    batch: int = 0  # rows of the latest decode step


class Engine(Protocol):
    """What every backend offers and callers may rely on.

    `adapter` names a loaded LoRA adapter (one of `adapters()`), `BASE_ADAPTER` the bare base in a
    batch that mixes adapters, None the model as loaded. Backend-specific extras (`TransformersEngine.start`,
    `VLLMEngine.load_adapter`) are called on the concrete class, never through this protocol."""

    tokenizer: Any  # the model's transformers tokenizer: callers encode raw prompts and decode echoes with it
    pad_id: int  # the id callers pad token rows with (PPO's rollout batches)
    max_len: int  # the context: prompt plus reply tokens never exceed it

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue one request; raises ValueError (message starting with the bad field) for a prompt or
        adapter the engine cannot take. With `loop`, the stream is consumed with `async for` on it."""
        ...

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapter: str | None = None) -> list[list[Completion]]:
        """Block until every prompt has its n completions; `params` is one for all or one per prompt."""
        ...

    def adapters(self) -> list[str]: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad token, else its eos (models often ship without a pad), else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def check_adapter(adapter: str | None, loaded: list[str]) -> None:
    """Every backend refuses an adapter it has not loaded with the same message."""
    if adapter not in (None, BASE_ADAPTER) and adapter not in loaded:
        raise ValueError(f"adapter '{adapter}' is not loaded (loaded: {', '.join(loaded) or 'none'})")
