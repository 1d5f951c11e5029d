"""A small OpenAI-compatible chat server on 127.0.0.1 whose replies a test scripts: a test double for a
remote judge (or a remote model). Real HTTP, so the official `openai` client, its retries and our
concurrency are exercised for real."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.conftest import free_port


class FakeOpenAI:
    """`reply(messages) -> str` scripts the answers. `fail_first=N` answers the first N requests with
    `fail_status` (429 by default, with a short retry-after); `delay` seconds per request."""

    def __init__(self, reply: Callable[[list[dict]], str], fail_first: int = 0, fail_status: int = 429,
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
            text = self.reply(body["messages"])
            return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
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
