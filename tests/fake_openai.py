"""A small OpenAI-compatible chat server on 127.0.0.1 whose replies a test scripts: a test double for a
remote judge (or a remote model). Real HTTP, so the official `openai` client, its retries and our
concurrency are exercised for real.

A scripted reply is a string (sent without logprobs), or a FakeReply with the reply's tokens and
their log-probabilities, sent in OpenAI's shape (`choices[0].logprobs.content[i].{token, bytes,
logprob, top_logprobs[j]}`) when the request asks for `logprobs` (the first `top_logprobs`
alternatives of each token), and `logprobs: null` otherwise, as OpenAI does."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.conftest import free_port


@dataclass
class FakeReply:
    """A scripted reply. `pieces`: its tokens (joined, normally the reply: `FakeReply.tokens`), sent as
    logprobs when asked for; None: a server that sends no logprobs even when asked. `top[i]`: the
    alternatives at token i as (text, probability), most likely first; a token without an entry has
    itself alone, at probability `p`."""

    text: str
    pieces: list[str] | None = None
    top: dict[int, list[tuple[str, float]]] | None = None
    p: float = 0.99
    finish_reason: str = "stop"

    @classmethod
    def tokens(cls, pieces: list[str], top: dict[int, list[tuple[str, float]]] | None = None, **kw) -> FakeReply:
        return cls("".join(pieces), list(pieces), top, **kw)

    def logprobs(self, top_logprobs: int) -> dict | None:
        if self.pieces is None:
            return None

        def entry(text: str, p: float) -> dict:
            return {"token": text, "bytes": list(text.encode()), "logprob": math.log(p)}

        content = []
        for i, piece in enumerate(self.pieces):
            alternatives = (self.top or {}).get(i) or [(piece, self.p)]
            own = dict(alternatives).get(piece, self.p)
            content.append({**entry(piece, own), "top_logprobs": [entry(t, p) for t, p in alternatives[:top_logprobs]]})
        return {"content": content, "refusal": None}


class FakeOpenAI:
    """`reply(messages) -> str | FakeReply` scripts the answers. `fail_first=N` answers the first N
    requests with `fail_status` (429 by default, with a short retry-after); `delay` seconds per request."""

    def __init__(self, reply: Callable[[list[dict]], str | FakeReply], fail_first: int = 0, fail_status: int = 429,
                 delay: float = 0.0):
        self.reply, self.fail_first, self.fail_status, self.delay = reply, fail_first, fail_status, delay
        self.requests: list[dict] = []  # every request body received, failed ones included
        self.lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self.lock:
                self.requests.append(body)
                failing = len(self.requests) <= self.fail_first
            if failing:
                return JSONResponse({"error": {"message": "scripted failure", "type": "rate_limit"}},
                                    status_code=self.fail_status, headers={"retry-after-ms": "10"})
            if self.delay:
                import asyncio

                await asyncio.sleep(self.delay)
            scripted = self.reply(body["messages"])
            if isinstance(scripted, str):
                scripted = FakeReply(scripted)
            choice = {"index": 0, "finish_reason": scripted.finish_reason,
                      "message": {"role": "assistant", "content": scripted.text},
                      "logprobs": scripted.logprobs(body.get("top_logprobs") or 0) if body.get("logprobs") else None}  # fmt: skip
            return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"], "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise TimeoutError("fake OpenAI server did not start")
            time.sleep(0.05)

    @property
    def answered(self) -> int:
        return len(self.requests) - min(self.fail_first, len(self.requests))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
