"""The server's request handling, as plain functions over the served models: no HTTP here.

Each handler takes the `Serving` state and a validated request (the pydantic models of
`serve/protocol.py`) and returns the OpenAI response body, or `Chunks` for a streamed reply; a bad
request raises `APIError`. Those that wait on the engine or the disk are async (and must run on the
event loop that will read their streams). `serve/api.py` routes HTTP to these, so a test can call
them directly.

Chat prompts are rendered with each model's own chat template (the code SFT trained with) and stop
at its end-of-turn. A streamed reply's engine streams travel with its chunks, so whoever sends them
can cancel the requests when the client leaves. Tool calling (`tools`, `tool_choice`) goes through
`serve/toolcalls.py`: the prompt and sampling a request's tools need, and its replies' text read into
`content` and `tool_calls`, alike for every engine.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from corral.atomic import append_line
from corral.chat.conversation import Conversation, Message, ToolCall
from corral.chat.templates import TemplateError
from corral.chat.tools import ToolError, check_tools
from corral.generate.chat import with_template_stops
from corral.generate.sampling import SamplingError, SamplingParams
from corral.generate.types import Completion, Stream, TokenEvent, TokenLogprob
from corral.serve.metrics import Metrics, RequestClock
from corral.serve.models import ServedModel
from corral.serve.protocol import APIError, ChatRequest, CompletionRequest, Vote, envelope, new_id, usage
from corral.serve.toolcalls import ReplyShaper, ToolPlan, forced_sampling
from corral.serve.toolcalls import plan as tool_plan_of


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    default_max_tokens: int = 512  # reply length when a request gives none (less where the context is shorter)
    max_tokens: int | None = None  # the most a request may ask for; above it a 400
    max_queue: int = 256  # replies waiting for a place in a full batch; past it a 429 with Retry-After
    request_timeout: float | None = None  # seconds; a request still generating then is cancelled (408)


@dataclass
class Serving:
    """What the handlers read: the served models by name and the server's settings."""

    models: dict[str, ServedModel]
    votes_path: str | Path | None = None  # arena votes are appended here; None: the server records none
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics | None = None
    preparing: dict[int, int] = field(default_factory=dict)  # engine id -> replies being tokenized and queued


@dataclass(frozen=True)
class Chunks:
    """A streamed reply: the response bodies to send, and the engine streams to cancel when sending stops."""

    bodies: AsyncIterator[dict]
    streams: list[Stream]


# ---------------------------------------------------------------------------------------------- handlers
def health(serving: Serving, public: bool) -> dict:
    """Up or not; the model names only where the API is open (with a key they are the key's to see)."""
    return {"status": "ok", "models": list(serving.models)} if public else {"status": "ok"}


def list_models(serving: Serving) -> dict:
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": m.created, "owned_by": "corral"} for m in serving.models.values()
    ]}  # fmt: skip


async def chat_completions(serving: Serving, req: ChatRequest) -> dict | Chunks:
    served = lookup(serving, req.model)
    tools = tool_plan_of(req, served.template, req.model)
    conversation = to_conversation(req)
    loop = asyncio.get_running_loop()

    def submit() -> Stream:  # rendering a long conversation takes a while: off the event loop
        try:
            prompt_ids = served.template.render(conversation)
        except (TemplateError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        if tools is not None and tools.prompt_suffix:  # a forced call: the model "has written" its opening
            prompt_ids = prompt_ids + served.engine.tokenizer(tools.prompt_suffix, add_special_tokens=False)["input_ids"]
        params = with_template_stops(sampling(serving.limits, req, len(prompt_ids), served.engine.max_len), served.template)
        params = forced_sampling(params, tools)
        if req.logprobs:
            vocab_bytes(served.engine.tokenizer)
        return submit_ids(served, prompt_ids, params, "messages", loop)

    with admission(serving, served, req.n):
        stream = await asyncio.to_thread(submit)
    request_id = new_id("chatcmpl")
    clock = RequestClock(serving.metrics, stream.prompt_tokens)
    if req.stream:
        tokenizer = served.engine.tokenizer if req.logprobs else None
        return Chunks(chat_chunks(stream, clock, request_id, req.model, req.include_usage, tokenizer, tools), [stream])
    choices = await collect([stream], clock, serving.limits.request_timeout)
    tokenizer = served.engine.tokenizer
    return envelope("chat.completion", request_id, req.model, [
        {"index": i, **reply_message(c.text, c.finish_reason, tools),
         "logprobs": chat_logprobs(tokenizer, c.logprobs) if req.logprobs else None}
        for i, c in enumerate(choices[0])
    ], usage(stream.prompt_tokens, sum(len(c.token_ids) for c in choices[0])))  # fmt: skip


def reply_message(text: str, finish_reason: str, tools: ToolPlan | None) -> dict:
    """A whole reply's `message` and `finish_reason`: with tools, read by the same shaper a stream goes through."""
    if tools is None:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    shaper = ReplyShaper(tools)
    shaper.feed(text)
    shaper.finish()
    return {"message": shaper.message(), "finish_reason": shaper.finish_reason(finish_reason)}


async def completions(serving: Serving, req: CompletionRequest) -> dict | Chunks:
    served = lookup(serving, req.model)
    tokenizer = served.engine.tokenizer
    loop = asyncio.get_running_loop()
    count = 1 if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else len(req.prompt)

    def submit() -> tuple[list[Stream], list[list[int]]]:  # tokenizing a long prompt takes a while: off the loop
        if isinstance(req.prompt, str):
            prompts = [tokenizer(req.prompt)["input_ids"]]
        elif isinstance(req.prompt[0], int):
            prompts = [list(req.prompt)]
        elif isinstance(req.prompt[0], str):
            prompts = [tokenizer(p)["input_ids"] for p in req.prompt]
        else:
            prompts = [list(p) for p in req.prompt]
        params = [sampling(serving.limits, req, len(ids), served.engine.max_len) for ids in prompts]
        if req.logprobs is not None:
            vocab_bytes(tokenizer)
        streams = []
        try:
            for ids, p in zip(prompts, params):
                streams.append(submit_ids(served, ids, p, "prompt", loop))
        except BaseException:
            for stream in streams:  # one prompt refused: the request fails whole, nothing of it keeps running
                stream.cancel()
            raise
        return streams, prompts

    with admission(serving, served, req.n * count):
        streams, prompts = await asyncio.to_thread(submit)
    request_id = new_id("cmpl")
    clock = RequestClock(serving.metrics, sum(s.prompt_tokens for s in streams))
    echoes = [tokenizer.decode(ids) if req.echo else "" for ids in prompts]
    logprobs = req.logprobs is not None
    if req.stream:
        return Chunks(completion_chunks(streams, clock, echoes, request_id, req.model, req.include_usage, tokenizer,
                                        logprobs), streams)  # fmt: skip
    results = await collect(streams, clock, serving.limits.request_timeout)
    choices, completion_tokens = [], 0
    for p, completions_ in enumerate(results):
        for j, c in enumerate(completions_):
            choices.append({"index": p * req.n + j, "text": echoes[p] + c.text, "finish_reason": c.finish_reason,
                            "logprobs": completion_logprobs(tokenizer, c.logprobs, len(echoes[p])) if logprobs else None})
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


@contextmanager
def admission(serving: Serving, served: ServedModel, replies: int) -> Iterator[None]:
    """Refuse (429) a request whose replies would queue past the limit; count them while they are prepared.
    Runs on the event loop, so the check and the count are one step. A request is never refused by an idle
    queue (a retry could not succeed): `n` above `max_queue` waits alone."""
    key = id(served.engine)
    queued = served.engine.stats().waiting + serving.preparing.get(key, 0)
    if queued and queued + replies > serving.limits.max_queue:  # with nothing waiting, any valid n is admitted
        raise APIError(429, f"the server is busy: {queued} replies are waiting for a place; retry shortly",
                       type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})
    serving.preparing[key] = serving.preparing.get(key, 0) + replies
    try:
        yield
    finally:
        serving.preparing[key] -= replies


def sampling(limits: Limits, req: ChatRequest | CompletionRequest, prompt_tokens: int, context: int) -> SamplingParams:
    """The engine's parameters; `max_tokens` checked against the server's limit and the context the prompt leaves."""
    asked, param = req.asked_max_tokens, req.max_tokens_param
    room = context - prompt_tokens
    if room <= 0:
        where = "messages" if isinstance(req, ChatRequest) else "prompt"
        raise APIError(400, f"{where}: {prompt_tokens} tokens, the model's context is {context}", param=where)
    if asked is None:
        max_tokens = min(limits.default_max_tokens, room, limits.max_tokens or room)
    elif limits.max_tokens is not None and asked > limits.max_tokens:
        raise APIError(400, f"{param}: {asked} is above this server's limit of {limits.max_tokens}", param=param)
    elif asked > room:
        raise APIError(400, f"{param}: {asked} tokens do not fit: the prompt has {prompt_tokens} of the model's "
                            f"{context}-token context, which leaves {room}", param=param)  # fmt: skip
    else:
        max_tokens = asked
    try:
        return req.sampling(max_tokens)
    except SamplingError as e:  # named after the request field: the engine's max_new_tokens is max_tokens here
        raise APIError(400, str(e), param=param if e.param == "max_new_tokens" else e.param) from None


def submit_ids(served: ServedModel, prompt_ids: list[int], params: SamplingParams, prompt_param: str,
               loop: asyncio.AbstractEventLoop) -> Stream:
    try:
        return served.engine.submit(prompt_ids, params, adapter=served.adapter, loop=loop)
    except ValueError as e:  # the message starts with the field: "prompt: ...", "response_format: ..."
        field = str(e).split(":", 1)[0]
        param = prompt_param if field == "prompt" else field if field.isidentifier() else None
        message = f"{prompt_param}{str(e)[len(field):]}" if field == "prompt" else str(e)
        raise APIError(400, message, param=param) from None


def to_conversation(req: ChatRequest) -> Conversation:
    """The request's messages and tools as a Conversation; tool use that does not fit together (a result
    answering no call, a call left without its result, arguments that are not a JSON object) is a 400
    naming the message's field."""
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        at, param = f"messages[{i}]", f"messages.{i}"
        if role == "system" and i > 0:
            raise APIError(400, f"{at}: a system message is only allowed first", param=f"{param}.role")
        if m.content is None and not (role == "assistant" and m.tool_calls):
            raise APIError(400, f"{at}.content: required (only an assistant message with tool_calls may leave it "
                                "null)", param=f"{param}.content")  # fmt: skip
        if m.tool_calls is not None and role != "assistant":
            raise APIError(400, f"{at}.tool_calls: only an assistant message makes tool calls",
                           param=f"{param}.tool_calls")
        if (m.tool_call_id is None) == (role == "tool"):
            which = "a tool message needs the tool_call_id it answers" if role == "tool" else \
                "only a tool message answers a call"
            raise APIError(400, f"{at}.tool_call_id: {which}", param=f"{param}.tool_call_id")
        calls = []
        for j, call in enumerate(m.tool_calls or []):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                field = f"{at}.tool_calls[{j}].function.arguments"
                raise APIError(400, f"{field}: must be a JSON object as text, got {call.function.arguments[:80]!r}",
                               param=f"{param}.tool_calls.{j}.function.arguments")
            calls.append(ToolCall(call.id, call.function.name, arguments))
        messages.append(Message(role, m.text(), tool_calls=calls, tool_call_id=m.tool_call_id or "",
                                name=(m.name or "") if role == "tool" else ""))
    conversation = Conversation(messages, tools=[t.openai() for t in req.tools or []])
    if conversation.uses_tools:
        try:
            check_tools(conversation)
        except ToolError as e:  # its message names the field: "field 'messages[3].tool_call_id': ..."
            named = re.match(r"field '([^']+)': ", str(e))
            field = named.group(1) if named else "messages"
            message = f"{field}: {str(e)[named.end():]}" if named else str(e)
            raise APIError(400, message, param=re.sub(r"\[(\d+)\]", r".\1", field)) from None
    return conversation


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
def observe(clock: RequestClock, event: TokenEvent) -> None:
    if event.token_id is not None:
        clock.token(event.index)
    if event.finish_reason:
        clock.finished(event.finish_reason)


async def collect(streams: list[Stream], clock: RequestClock, timeout: float | None) -> list[list[Completion]]:
    """Every stream's completions. The request is cancelled if it is abandoned (the client left: this
    task is cancelled), if it fails, or when it runs past the server's timeout."""

    async def gather():
        return [await stream.acollect(on_event=lambda e: observe(clock, e)) for stream in streams]

    try:
        return await asyncio.wait_for(gather(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the reply took longer than this server's limit of {timeout:g} s", type="timeout",
                       code="request_timeout") from None
    except RuntimeError as e:
        raise APIError(500, str(e), type="server_error") from None
    finally:
        for stream in streams:
            stream.cancel()  # a no-op for finished ones
        clock.done()


def _error_chunk(message: str) -> dict:
    return APIError(500, f"generation failed: {message}", type="server_error").body()


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as OpenAI shows it in logprobs: its text and its UTF-8 bytes (a piece of a character
    shows as U+FFFD in the text; its bytes are exact)."""
    vocab = vocab_bytes(tokenizer)
    return tokenizer.decode([token_id]), list(vocab[token_id] if token_id < len(vocab) else b"")


_VOCAB_BYTES: dict[int, list[bytes]] = {}  # id(tokenizer) -> each token's bytes; served tokenizers live as long


def vocab_bytes(tokenizer) -> list[bytes]:
    """Each token's bytes, from xgrammar's reading of the vocabulary (byte-level, byte-fallback or raw).
    Built once per tokenizer (a fraction of a second): call it off the event loop first."""
    if id(tokenizer) not in _VOCAB_BYTES:
        import xgrammar as xgr

        _VOCAB_BYTES[id(tokenizer)] = xgr.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab
    return _VOCAB_BYTES[id(tokenizer)]


def finite(logprob: float) -> float:
    """JSON has no -inf: an impossible token's logprob is sent as -9999.0, as vLLM sends it."""
    return max(logprob, -9999.0)


def chat_logprobs(tokenizer, logprobs: list[TokenLogprob]) -> dict:
    def entry(token_id, logprob):
        text, raw = token_text(tokenizer, token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": raw}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs], "refusal": None}


def completion_logprobs(tokenizer, logprobs: list[TokenLogprob], offset: int) -> dict:
    """The legacy completions layout: parallel lists, and each token's top alternatives as {text: logprob}."""
    tokens = [token_text(tokenizer, lp.token_id)[0] for lp in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [{token_text(tokenizer, t)[0]: finite(v) for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


async def chat_chunks(stream: Stream, clock: RequestClock, request_id: str, model: str, include_usage: bool,
                      tokenizer=None, tools: ToolPlan | None = None) -> AsyncIterator[dict]:
    """The chunks of a streamed chat reply; with `tokenizer`, each token's logprobs ride with its text. With
    `tools`, each reply's text goes through its `ReplyShaper`: content and tool-call deltas, in OpenAI's shape."""
    logprobs = tokenizer is not None
    shapers = {i: ReplyShaper(tools) for i in range(stream.n)} if tools is not None else {}

    def chunk(choices, usage_=None):
        body = envelope("chat.completion.chunk", request_id, model, choices)
        if include_usage:
            body["usage"] = usage_
        return body

    first = {"role": "assistant", "content": None if tools is not None and tools.mode == "forced" else ""}
    yield chunk([{"index": i, "delta": dict(first), "finish_reason": None} for i in range(stream.n)])
    completion_tokens = 0
    try:
        async for event in stream:
            observe(clock, event)
            if event.error:
                yield _error_chunk(event.error)
                return
            completion_tokens += event.token_id is not None
            shaper = shapers.get(event.index)
            if shaper is None:
                deltas = [{"content": event.text}] if event.text else []
            else:
                deltas = (shaper.feed(event.text) if event.text else []) + (shaper.finish() if event.finish_reason else [])
            if logprobs and event.logprob and not deltas:
                deltas = [{}]  # the token's logprobs go out even while its text is held back
            for k, delta in enumerate(deltas):
                choice = {"index": event.index, "delta": delta, "finish_reason": None}
                if k == 0 and logprobs and event.logprob:
                    choice["logprobs"] = chat_logprobs(tokenizer, [event.logprob])
                yield chunk([choice])
            if event.finish_reason:
                reason = shaper.finish_reason(event.finish_reason) if shaper is not None else event.finish_reason
                yield chunk([{"index": event.index, "delta": {}, "finish_reason": reason}])
        if include_usage:
            yield chunk([], usage(stream.prompt_tokens, completion_tokens))
    finally:
        clock.done()


async def completion_chunks(streams: list[Stream], clock: RequestClock, echoes: list[str], request_id: str,
                            model: str, include_usage: bool, tokenizer, logprobs: bool) -> AsyncIterator[dict]:
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, stream: Stream):
        async for event in stream:
            await merged.put((p, stream.n, event))
        await merged.put(None)

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    offsets: dict[tuple[int, int], int] = {}
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
            observe(clock, event)
            if event.error:
                yield _error_chunk(event.error)
                return
            completion_tokens += event.token_id is not None
            if event.text or event.finish_reason or (logprobs and event.logprob):
                index = p * n + event.index
                choice = {"index": index, "text": event.text, "finish_reason": event.finish_reason, "logprobs": None}
                if logprobs and event.logprob:
                    offset = offsets.get((p, event.index), len(echoes[p]))
                    choice["logprobs"] = completion_logprobs(tokenizer, [event.logprob], offset)
                    offsets[(p, event.index)] = offset + len(choice["logprobs"]["tokens"][0])
                yield envelope("text_completion", request_id, model, [choice])
        if include_usage:
            body = envelope("text_completion", request_id, model, [])
            body["usage"] = usage(sum(s.prompt_tokens for s in streams), completion_tokens)
            yield body
    finally:
        for task in tasks:
            task.cancel()
        clock.done()
