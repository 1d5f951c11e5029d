"""Endpoint calls for the three roles: the judge's client, what each call costs, and the budget.

Every call goes through `corral.eval.client.OpenAIJudge` (the official `openai` client: retries with backoff
on 429 / 5xx / connection errors, timeouts), made by the judge recipe's `judge_client`. The client is wrapped
so that the token counts the endpoint reports (`usage`) reach the caller, which records them with the call's
result: the money a run has spent is then the sum over its files, and survives a kill.

The budget is checked before each call is sent: once the calls (or tokens) reach the cap no new call starts,
calls in flight finish and are recorded, and the stage stops cleanly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from corral.eval.client import JudgeReply, OpenAIJudge
from corral.generate.sampling import SamplingParams

BUDGET_STOP = "budget"  # what a job returns when the budget let no (more) calls start


class MeteredClient:
    """An `openai` client whose `chat.completions.create` keeps the response's `usage` for the calling thread:
    `OpenAIJudge.ask` returns the reply only, and the caller asks `take_usage()` right after, on its thread."""

    def __init__(self, client):
        self._client = client
        self._local = threading.local()
        self.chat = _Namespace(completions=_Namespace(create=self._create))

    def _create(self, **kwargs):
        response = self._client.chat.completions.create(**kwargs)
        usage = getattr(response, "usage", None)
        self._local.usage = None if usage is None else {
            "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        }  # fmt: skip
        return response

    def take_usage(self) -> dict | None:
        usage, self._local.usage = getattr(self._local, "usage", None), None
        return usage


class _Namespace:
    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def tokens_of(usage: dict | None) -> int:
    return 0 if not usage else usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)


@dataclass
class Role:
    """One of the teacher's three parts (teacher, referee, generator) at its endpoint."""

    name: str
    judge: OpenAIJudge  # its `client` is a MeteredClient
    concurrency: int

    @property
    def model(self) -> str:
        return self.judge.model

    def ask(self, messages: list[dict], params: SamplingParams, response_format: dict | None = None) -> tuple[JudgeReply, dict | None]:
        reply = self.judge.ask(messages, params, response_format=response_format)
        return reply, self.judge.client.take_usage()


def make_role(name: str, url: str, model: str, key_env: str, retries: int, timeout: float, concurrency: int) -> Role:
    from corral.recipes.judge import judge_client

    judge = judge_client(url, model, key_env, retries, timeout)
    judge.client = MeteredClient(judge.client)
    return Role(name, judge, concurrency)


@dataclass
class Budget:
    """Caps on endpoint calls and tokens (0: none), over the whole run folder: `calls` and `tokens` start at what
    the files already record. Thread-safe: `reserve` before sending, `settle` with the reply's usage after, or
    `cancel` when the call failed."""

    max_calls: int = 0
    max_tokens: int = 0
    calls: int = 0
    tokens: int = 0
    in_flight: int = 0
    no_usage: int = 0  # replies without a `usage` field: the token cap cannot count them
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def exhausted(self) -> str | None:
        """Why no call may start now, or None."""
        if self.max_calls and self.calls + self.in_flight >= self.max_calls:
            return f"max_teacher_calls={self.max_calls} reached ({self.calls} calls)"
        if self.max_tokens and self.tokens >= self.max_tokens:
            return f"max_teacher_tokens={self.max_tokens} reached ({self.tokens} tokens)"
        return None

    def reserve(self) -> bool:
        with self._lock:
            if self.exhausted():
                return False
            self.in_flight += 1
            return True

    def settle(self, usage: dict | None) -> None:
        with self._lock:
            self.in_flight -= 1
            self.calls += 1
            self.tokens += tokens_of(usage)
            self.no_usage += usage is None

    def cancel(self) -> None:
        with self._lock:
            self.in_flight -= 1


@dataclass
class JobsResult:
    done: int = 0  # jobs that finished
    stopped: int = 0  # jobs the budget left undone
    errors: list[str] = field(default_factory=list)  # failures after the client's retries (asked again next run)


def run_jobs(jobs: Iterable, work: Callable[[object], str | None], concurrency: int) -> JobsResult:
    """`work(job)` for every job, `concurrency` at a time. A job returns BUDGET_STOP when the budget let it
    send nothing more; an exception is a failed job, reported and left for the next run."""
    result = JobsResult()
    jobs = list(jobs)
    if not jobs:
        return result
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(work, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as e:  # noqa: BLE001 - one failed call is reported; the rest go on
                result.errors.append(f"{type(e).__name__}: {e}")
                continue
            if outcome == BUDGET_STOP:
                result.stopped += 1
            else:
                result.done += 1
    return result
