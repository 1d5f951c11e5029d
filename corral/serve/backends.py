"""Chat backends: one conversation in, a reply out, from a local model or any OpenAI-compatible server.

The terminal chat streams through them; answer generation and the judge call `complete`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from corral.chat.conversation import Conversation
from corral.generate.chat import ChatTemplate, submit_chat
from corral.generate.sampling import SamplingParams
from corral.generate.types import Engine


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" | "length" | ...


class ChatBackend(Protocol):
    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        """Reply text pieces as they come; closing the iterator stops generation."""
        ...

    def complete(self, conversation: Conversation, params: SamplingParams) -> Reply: ...


@dataclass
class LocalBackend:
    """A model in this process, through the generation engine and the model's chat template.
    Thread-safe when the engine runs its background loop (`engine.start()`)."""

    engine: Engine
    template: ChatTemplate
    adapter: str | None = None

    def _submit(self, conversation: Conversation, params: SamplingParams):
        return submit_chat(self.engine, self.template, conversation, params, adapter=self.adapter)

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        request = self._submit(conversation, params)
        try:
            for event in request:
                if event.error:
                    raise RuntimeError(event.error)
                yield event.text
        finally:
            request.cancel()

    def complete(self, conversation: Conversation, params: SamplingParams) -> Reply:
        completion = self._submit(conversation, params).collect()[0]
        if completion.finish_reason == "error":
            raise RuntimeError("generation failed (see the log)")
        return Reply(completion.text.strip(), completion.finish_reason)


@dataclass
class APIBackend:
    """Any OpenAI-compatible server (`corral serve`, vLLM, OpenAI, ...). Retries on 429/5xx with backoff
    are the `openai` client's own (`OpenAI(max_retries=...)`)."""

    client: object
    model: str
    send_extensions: bool  # top_k / repetition_penalty are extensions: sent only when the user set them

    def _request(self, conversation: Conversation, params: SamplingParams, stream: bool):
        extra = {}
        if self.send_extensions:
            extra = {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty}
        return self.client.chat.completions.create(
            model=self.model, messages=conversation.to_openai(), stream=stream, temperature=params.temperature,
            top_p=params.top_p, max_tokens=params.max_new_tokens, seed=params.seed, extra_body=extra or None,
        )  # fmt: skip

    def stream(self, conversation: Conversation, params: SamplingParams) -> Iterator[str]:
        response = self._request(conversation, params, stream=True)
        try:
            for chunk in response:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            response.close()

    def complete(self, conversation: Conversation, params: SamplingParams) -> Reply:
        choice = self._request(conversation, params, stream=False).choices[0]
        return Reply((choice.message.content or "").strip(), choice.finish_reason or "stop")
