"""The server's request handling, as plain functions over the served models: no HTTP here.

Each handler takes the `Serving` state and a validated request (the pydantic models of
`serve/protocol.py`) and returns the OpenAI response body, or `Chunks` for a streamed reply; a bad
request raises `APIError`. Those that wait on the engine or the disk are async (and must run on the
event loop that will read their streams). `serve/api.py` routes HTTP to these, so a test can call
them directly.

Chat prompts are rendered with each model's own chat template (the code SFT trained with) and stop
at its end-of-turn. A streamed reply's engine streams travel with its chunks, so whoever sends them
can cancel the requests when the client leaves.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from corral.atomic import append_line
from corral.chat.conversation import Conversation, Message
from corral.chat.templates import TemplateError
from corral.generate.chat import submit_chat
from corral.generate.sampling import SamplingError, SamplingParams
from corral.generate.types import Completion, Stream
from corral.serve.models import ServedModel
from corral.serve.protocol import APIError, ChatRequest, CompletionRequest, Vote, envelope, new_id, usage


@dataclass(frozen=True)
class Serving:
    """What the handlers read: the served models by name and the server's settings."""

    models: dict[str, ServedModel]
    votes_path: str | Path | None = None  # arena votes are appended here; None: the server records none
    default_max_tokens: int = 512  # reply length when a request gives none


@dataclass(frozen=True)
class Chunks:
    """A streamed reply: the response bodies to send, and the engine streams to cancel when sending stops."""

    bodies: AsyncIterator[dict]
    streams: list[Stream]


# ---------------------------------------------------------------------------------------------- handlers
def health(serving: Serving) -> dict:
    return {"status": "ok", "models": list(serving.models)}


def list_models(serving: Serving) -> dict:
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": m.created, "owned_by": "corral"} for m in serving.models.values()
    ]}  # fmt: skip


async def chat_completions(serving: Serving, req: ChatRequest) -> dict | Chunks:
    served = lookup(serving, req.model)
    conversation = to_conversation(req)
    params = sampling(serving, req, req.max_completion_tokens)
    try:
        stream = submit_chat(served.engine, served.template, conversation, params, adapter=served.adapter,
                             loop=asyncio.get_running_loop())
    except (TemplateError, ValueError) as e:
        raise APIError(400, str(e), param="messages") from None
    request_id = new_id("chatcmpl")
    if req.stream:
        return Chunks(chat_chunks(stream, request_id, req.model, req.include_usage), [stream])
    choices = await collect(stream)
    return envelope("chat.completion", request_id, req.model, [
        {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
         "logprobs": None}
        for i, c in enumerate(choices)
    ], usage(stream.prompt_tokens, sum(len(c.token_ids) for c in choices)))  # fmt: skip


async def completions(serving: Serving, req: CompletionRequest) -> dict | Chunks:
    served = lookup(serving, req.model)
    tokenizer = served.engine.tokenizer
    if isinstance(req.prompt, str):
        prompts = [tokenizer(req.prompt)["input_ids"]]
    elif req.prompt and all(isinstance(p, int) for p in req.prompt):
        prompts = [list(req.prompt)]
    else:
        prompts = [tokenizer(p)["input_ids"] for p in req.prompt]
    params = sampling(serving, req, None)
    streams = [submit(served, ids, params, "prompt") for ids in prompts]
    request_id = new_id("cmpl")
    echoes = [tokenizer.decode(ids) if req.echo else "" for ids in prompts]
    if req.stream:
        return Chunks(completion_chunks(streams, echoes, request_id, req.model, req.include_usage), streams)
    choices, completion_tokens = [], 0
    for p, stream in enumerate(streams):
        for j, c in enumerate(await collect(stream)):
            choices.append({"index": p * params.n + j, "text": echoes[p] + c.text,
                            "finish_reason": c.finish_reason, "logprobs": None})
            completion_tokens += len(c.token_ids)
    return envelope("text_completion", request_id, req.model, choices,
                    usage(sum(s.prompt_tokens for s in streams), completion_tokens))


async def arena_vote(serving: Serving, vote: Vote) -> dict:
    if serving.votes_path is None:
        raise APIError(400, "this server records no votes (start it with --votes FILE)", param="vote")
    for field in ("model_a", "model_b"):
        if getattr(vote, field) not in serving.models:
            raise APIError(400, f"{field}: '{getattr(vote, field)}' is not a served model", param=field)
    record = vote_record(vote)
    await asyncio.to_thread(append_line, serving.votes_path, json.dumps(record, ensure_ascii=False))
    return {"recorded": True, "model_a": vote.model_a, "model_b": vote.model_b}


# ---------------------------------------------------------------------------------------------- requests
def lookup(serving: Serving, name: str) -> ServedModel:
    if name not in serving.models:
        raise APIError(404, f"model '{name}' does not exist; served: {', '.join(serving.models)}", param="model",
                       code="model_not_found")
    return serving.models[name]


def sampling(serving: Serving, req: ChatRequest | CompletionRequest, max_tokens: int | None) -> SamplingParams:
    try:
        return req.sampling(max_tokens or req.max_tokens or serving.default_max_tokens)
    except SamplingError as e:  # named after the request field: the engine's max_new_tokens is max_tokens here
        raise APIError(400, str(e), param="max_tokens" if e.param == "max_new_tokens" else e.param) from None


def submit(served: ServedModel, prompt_ids: list[int], params: SamplingParams, param: str) -> Stream:
    try:
        return served.engine.submit(prompt_ids, params, adapter=served.adapter, loop=asyncio.get_running_loop())
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None


def to_conversation(req: ChatRequest) -> Conversation:
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i > 0:
            raise APIError(400, f"messages[{i}]: a system message is only allowed first", param=f"messages.{i}.role")
        messages.append(Message(role, m.text()))
    return Conversation(messages)


def vote_record(vote: Vote) -> dict:
    """One line of the preference file. `prompt`/`chosen`/`rejected` are what the reward-model and DPO
    readers take; a tie or "both bad" carries no preference, so its `chosen`/`rejected` are null (a
    reader counts and skips it) while `replies` and `models` keep both sides for other uses."""
    record = {"prompt": vote.prompt, "chosen": None, "rejected": None}
    if vote.vote in ("a", "b"):
        winner, loser = ("a", "b") if vote.vote == "a" else ("b", "a")
        replies = {"a": vote.reply_a, "b": vote.reply_b}
        names = {"a": vote.model_a, "b": vote.model_b}
        record.update(chosen=replies[winner], rejected=replies[loser],
                      models={"chosen": names[winner], "rejected": names[loser]})
    else:
        record["models"] = {"a": vote.model_a, "b": vote.model_b}
    record.update(replies={"a": vote.reply_a, "b": vote.reply_b}, vote=vote.vote,
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return record


# ---------------------------------------------------------------------------------------------- replies
async def collect(stream: Stream) -> list[Completion]:
    try:
        return await stream.acollect()
    except RuntimeError as e:
        stream.cancel()
        raise APIError(500, str(e), type="server_error") from None


def _error_chunk(message: str) -> dict:
    return APIError(500, f"generation failed: {message}", type="server_error").body()


async def chat_chunks(stream: Stream, request_id: str, model: str, include_usage: bool) -> AsyncIterator[dict]:
    def chunk(choices, usage_=None):
        body = envelope("chat.completion.chunk", request_id, model, choices)
        if include_usage:
            body["usage"] = usage_
        return body

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(stream.n)])
    completion_tokens = 0
    async for event in stream:
        if event.error:
            yield _error_chunk(event.error)
            return
        completion_tokens += event.token_id is not None
        if event.text:
            yield chunk([{"index": event.index, "delta": {"content": event.text}, "finish_reason": None}])
        if event.finish_reason:
            yield chunk([{"index": event.index, "delta": {}, "finish_reason": event.finish_reason}])
    if include_usage:
        yield chunk([], usage(stream.prompt_tokens, completion_tokens))


async def completion_chunks(streams: list[Stream], echoes: list[str], request_id: str, model: str,
                            include_usage: bool) -> AsyncIterator[dict]:
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, stream: Stream):
        async for event in stream:
            await merged.put((p, stream.n, event))
        await merged.put(None)

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    try:
        for p, echo in enumerate(echoes):
            if echo:
                for j in range(streams[p].n):
                    yield envelope("text_completion", request_id, model,
                                   [{"index": p * streams[p].n + j, "text": echo, "finish_reason": None}])
        open_streams, completion_tokens = len(streams), 0
        while open_streams:
            item = await merged.get()
            if item is None:
                open_streams -= 1
                continue
            p, n, event = item
            if event.error:
                yield _error_chunk(event.error)
                return
            completion_tokens += event.token_id is not None
            if event.text or event.finish_reason:
                yield envelope("text_completion", request_id, model, [
                    {"index": p * n + event.index, "text": event.text, "finish_reason": event.finish_reason,
                     "logprobs": None}])  # fmt: skip
        if include_usage:
            body = envelope("text_completion", request_id, model, [])
            body["usage"] = usage(sum(s.prompt_tokens for s in streams), completion_tokens)
            yield body
    finally:
        for task in tasks:
            task.cancel()
