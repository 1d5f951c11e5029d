"""The work of each stage, each resumable from its own file.

Every endpoint call's result is appended to its stage's JSONL file (`append_line`: whole lines under a lock,
fsynced) as it arrives, with the usage the endpoint reported. A re-run reads the file and asks only what is
missing, so a call recorded is never made again and a call cut by a kill is made once more:

- teacher answers (`teacher_answers.jsonl`, one file for the whole run): keyed by a digest of the teacher model
  and the messages sent, so an instruction is never asked twice, in any iteration or pool;
- student answers (`iter-NN/student_answers.jsonl`): one batch of the engine at a time;
- referee judgments (`iter-NN/referee.jsonl`): one line per attempt, keyed by the messages (so per instruction
  and order); an unparseable reply is asked again with the next seed up to `parse_retries` times;
- generated candidates (`iter-NN/candidates.jsonl`): one line per request, keyed by (round, kind, index),
  whose seed instruction is drawn from a generator seeded by those same values.

What is derived from those files (discrimination.json, generated.json) is computed once the file is complete
and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from corral.atomic import append_line, read_jsonl
from corral.distill.calls import BUDGET_STOP, Budget, JobsResult, Role, run_jobs
from corral.distill.filters import CandidateFilter
from corral.distill.pools import Instruction, instruction_id
from corral.distill.prompts import REFEREE_FORMAT, DistillPrompts, generator_messages, referee_messages, teacher_messages
from corral.eval import constrained as json_verdicts
from corral.eval.judge import Task, read_verdict
from corral.eval.parsing import DEFAULT_SCALE, parse_two_scores
from corral.generate.sampling import SamplingParams

ORDERS = ("teacher_first", "student_first")  # the referee sees each pair of answers both ways


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# Teacher answers


def teacher_key(model: str, messages: list[dict]) -> str:
    return digest("teacher", model, messages)


def answer_with_teacher(instructions: list[Instruction], role: Role, params: SamplingParams, system: str | None,
                        path: Path, budget: Budget, iteration: int, pool: str) -> tuple[JobsResult, int]:
    """Teacher answers for every instruction not answered before (in any iteration). Returns (result, cached)."""
    answered = {r["key"] for r in read_jsonl(path)}
    todo, queued = [], set()
    for instruction in instructions:
        messages = teacher_messages(instruction.prompt, system)
        key = teacher_key(role.model, messages)
        if key not in answered and key not in queued:
            queued.add(key)
            todo.append((instruction, messages, key))

    def work(job) -> str | None:
        instruction, messages, key = job
        if not budget.reserve():
            return BUDGET_STOP
        started = time.perf_counter()
        try:
            reply, usage = role.ask(messages, params)
        except BaseException:
            budget.cancel()
            raise
        budget.settle(usage)
        append_line(path, json.dumps({
            "key": key, "id": instruction.id, "model": role.model, "messages": messages, "answer": reply.text.strip(),
            "finish_reason": reply.finish_reason, "usage": usage, "iteration": iteration, "pool": pool,
            "latency_s": round(time.perf_counter() - started, 4), "tstamp": time.time(),
        }, ensure_ascii=False))  # fmt: skip
        return None

    return run_jobs(todo, work, role.concurrency), len(instructions) - len(todo)


def teacher_answers(path: Path, model: str, system: str | None, instructions: list[Instruction]) -> dict[str, dict]:
    """instruction id -> its teacher answer record, for those answered."""
    by_key = {r["key"]: r for r in read_jsonl(path)}
    found = {}
    for instruction in instructions:
        record = by_key.get(teacher_key(model, teacher_messages(instruction.prompt, system)))
        if record is not None:
            found[instruction.id] = record
    return found


# ---------------------------------------------------------------------------------------------
# Student answers


def answer_with_student(instructions: list[Instruction], generate: Callable[[list[str]], list[str]], path: Path,
                        batch: int) -> int:
    """The student answers, `batch` instructions per call of `generate(prompts) -> replies` (the engine's
    continuous batch); each batch is appended when it is done. Returns how many were answered now."""
    done = {r["id"] for r in read_jsonl(path)}
    todo = [i for i in {i.id: i for i in instructions}.values() if i.id not in done]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        replies = generate([i.prompt for i in chunk])
        for instruction, reply in zip(chunk, replies, strict=True):
            append_line(path, json.dumps({"id": instruction.id, "prompt": instruction.prompt, "answer": reply,
                                          "tstamp": time.time()}, ensure_ascii=False))  # fmt: skip
    return len(todo)


def student_answers(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(path)}


# ---------------------------------------------------------------------------------------------
# Referee


@dataclass(frozen=True)
class RefereeJob:
    instruction: Instruction
    order: str
    messages: list
    key: str
    response_format: dict | None


def referee_jobs(instructions: list[Instruction], teacher: dict[str, dict], student: dict[str, dict],
                 prompts: DistillPrompts, referee_model: str, constrained: bool) -> list[RefereeJob]:
    """Two jobs per instruction with both answers: teacher's answer first, then the student's first."""
    jobs = []
    response_format = json_verdicts.response_format("relative", DEFAULT_SCALE) if constrained else None
    for instruction in instructions:
        if instruction.id not in teacher or instruction.id not in student:
            continue
        answers = {"teacher_first": (teacher[instruction.id]["answer"], student[instruction.id]["answer"]),
                   "student_first": (student[instruction.id]["answer"], teacher[instruction.id]["answer"])}  # fmt: skip
        for order in ORDERS:
            messages = referee_messages(prompts, instruction.prompt, *answers[order])
            if constrained:  # the prompt asks for [[7, 5]], which the schema rules out: say what to write instead
                messages[-1] = {**messages[-1], "content": messages[-1]["content"].rstrip() + "\n\n"
                                + json_verdicts.instruction("relative", DEFAULT_SCALE)}  # fmt: skip
            key = digest("referee", referee_model, messages, response_format)
            jobs.append(RefereeJob(instruction, order, messages, key, response_format))
    return jobs


def referee_attempts(path: Path) -> dict[str, list[dict]]:
    attempts: dict[str, list[dict]] = {}
    for record in read_jsonl(path):
        attempts.setdefault(record["key"], []).append(record)
    return attempts


def job_finished(attempts: list[dict], max_attempts: int) -> bool:
    return any(a["parsed"] for a in attempts) or len(attempts) >= max_attempts


def score_with_referee(jobs: list[RefereeJob], role: Role, params: SamplingParams, max_attempts: int, path: Path,
                       budget: Budget, iteration: int) -> JobsResult:
    """Ask the referee each job not finished in `path`: until a reply parses, at most `max_attempts` times.
    Attempt k is sent with seed + k (a retry at the same seed would get the same reply back)."""
    recorded = referee_attempts(path)
    todo = [job for job in jobs if not job_finished(recorded.get(job.key, []), max_attempts)]

    def work(job: RefereeJob) -> str | None:
        attempt = len(recorded.get(job.key, []))
        while attempt < max_attempts:
            if not budget.reserve():
                return BUDGET_STOP
            seed = None if params.seed is None else params.seed + attempt
            started = time.perf_counter()
            try:
                reply, usage = role.ask(job.messages, replace(params, seed=seed), job.response_format)
            except BaseException:
                budget.cancel()
                raise
            budget.settle(usage)
            task = Task(job.key, job.messages, {"mode": "relative"}, parse_two_scores, REFEREE_FORMAT,
                        job.response_format)  # fmt: skip
            scores, error = read_verdict(task, reply)
            record = {"key": job.key, "id": job.instruction.id, "order": job.order, "attempt": attempt, "seed": seed,
                      "parsed": scores is not None, "scores": list(scores) if scores else None,
                      "judgment": reply.text.strip(), "finish_reason": reply.finish_reason, "usage": usage,
                      "iteration": iteration, "constrained": job.response_format is not None,
                      "latency_s": round(time.perf_counter() - started, 4), "tstamp": time.time()}  # fmt: skip
            if error:
                record["parse_error"] = error
            append_line(path, json.dumps(record, ensure_ascii=False))
            if scores is not None:
                return None
            attempt += 1
        return None

    return run_jobs(todo, work, role.concurrency)


def side_scores(teacher_first: tuple[float, float], student_first: tuple[float, float]) -> tuple[float, float]:
    """Lion's average over both orders: (teacher, student) = ((s12[0] + s21[1]) / 2, (s12[1] + s21[0]) / 2),
    s12 the scores with the teacher's answer first, s21 with the student's first."""
    return ((teacher_first[0] + student_first[1]) / 2, (teacher_first[1] + student_first[0]) / 2)


def is_hard(teacher_score: float, student_score: float, threshold: float) -> bool:
    """Hard when the teacher beats the student by at least `threshold` (Lion: 1)."""
    return teacher_score - student_score >= threshold


def discriminate(jobs: list[RefereeJob], attempts: dict[str, list[dict]], teacher: dict[str, dict],
                 student: dict[str, dict], threshold: float) -> dict:
    """Scores, hard / easy and exclusions from complete referee records. An instruction whose reply in either
    order never parsed is excluded and counted, never scored."""
    by_instruction: dict[str, dict[str, RefereeJob]] = {}
    for job in jobs:
        by_instruction.setdefault(job.instruction.id, {})[job.order] = job
    rows, unparseable = [], Counter()
    for key, pair in by_instruction.items():
        parsed = {}
        for order, job in pair.items():
            good = [a for a in attempts.get(job.key, []) if a["parsed"]]
            if good:
                parsed[order] = tuple(good[0]["scores"])
        instruction = next(iter(pair.values())).instruction
        row = {"id": key, "prompt": instruction.prompt, "origin": instruction.origin,
               "teacher_answer": teacher[key]["answer"], "student_answer": student[key]["answer"],
               "attempts": {order: len(attempts.get(job.key, [])) for order, job in pair.items()}}  # fmt: skip
        missing = [order for order in ORDERS if order not in parsed]
        if missing:
            unparseable["+".join(missing)] += 1
            rows.append({**row, "label": "unparseable", "unparsed_orders": missing})
            continue
        teacher_score, student_score = side_scores(parsed["teacher_first"], parsed["student_first"])
        rows.append({**row, "label": "hard" if is_hard(teacher_score, student_score, threshold) else "easy",
                     "scores_teacher_first": list(parsed["teacher_first"]),
                     "scores_student_first": list(parsed["student_first"]),
                     "teacher_score": teacher_score, "student_score": student_score,
                     "gap": teacher_score - student_score})  # fmt: skip
    scored = [r for r in rows if r["label"] != "unparseable"]
    mean = (lambda key: sum(r[key] for r in scored) / len(scored)) if scored else (lambda key: None)
    return {
        "threshold": threshold, "scored": len(scored), "hard": sum(r["label"] == "hard" for r in rows),
        "easy": sum(r["label"] == "easy" for r in rows), "unparseable": sum(unparseable.values()),
        "unparseable_by_order": dict(unparseable), "teacher_score": mean("teacher_score"),
        "student_score": mean("student_score"), "gap": mean("gap"), "rows": rows,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class GenerationRequest:
    round: int
    kind: str  # "hard" / "easy": which prompt, and which instructions the seed is drawn from
    index: int
    seed_instruction: Instruction

    @property
    def key(self) -> str:
        return f"{self.round}:{self.kind}:{self.index}"


def generation_requests(kind: str, pool: list[Instruction], count: int, round_: int, seed: int,
                        iteration: int) -> list[GenerationRequest]:
    """`count` requests, each made from an instruction of `pool` drawn by a generator seeded with the seed,
    iteration, kind and round: a re-run draws the same ones."""
    if not pool or count <= 0:
        return []
    rng = random.Random(f"{seed}:{iteration}:{kind}:{round_}")
    return [GenerationRequest(round_, kind, i, rng.choice(pool)) for i in range(count)]


def generation_max_tokens(configured: int, instruction: str) -> int:
    """Lion's rule when 0 is configured: four tokens per word of the instruction it is made from (at least 16)."""
    return configured or max(16, 4 * len(instruction.split()))


def generate_candidates(requests: list[GenerationRequest], role: Role, prompts: DistillPrompts, params: SamplingParams,
                        max_tokens: int, path: Path, budget: Budget, iteration: int) -> JobsResult:
    """One generator call per request not yet in `path`; the raw reply is appended as it arrives."""
    done = {r["request"] for r in read_jsonl(path)}
    todo = [r for r in requests if r.key not in done]

    def work(request: GenerationRequest) -> str | None:
        if not budget.reserve():
            return BUDGET_STOP
        messages = generator_messages(prompts, request.kind, request.seed_instruction.prompt)
        limit = generation_max_tokens(max_tokens, request.seed_instruction.prompt)
        # Each request its own seed, so two requests from one instruction are two samples, reproducibly.
        seed = None if params.seed is None else (params.seed + zlib.crc32(f"{iteration}:{request.key}".encode())) % 2**31
        started = time.perf_counter()
        try:
            reply, usage = role.ask(messages, replace(params, max_new_tokens=limit, seed=seed))
        except BaseException:
            budget.cancel()
            raise
        budget.settle(usage)
        append_line(path, json.dumps({
            "request": request.key, "round": request.round, "kind": request.kind, "index": request.index,
            "from_id": request.seed_instruction.id, "from_prompt": request.seed_instruction.prompt,
            "messages": messages, "text": reply.text, "finish_reason": reply.finish_reason, "max_tokens": limit,
            "seed": seed, "usage": usage, "iteration": iteration, "latency_s": round(time.perf_counter() - started, 4),
            "tstamp": time.time(),
        }, ensure_ascii=False))  # fmt: skip
        return None

    return run_jobs(todo, work, role.concurrency)


@dataclass
class Selection:
    kept: list[Instruction] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)

    def kept_of(self, kind: str) -> int:
        return sum(i.origin == kind for i in self.kept)


def select_new(candidates: list[dict], cache: list[Instruction], threshold: float, min_distinct_trigrams: float,
               iteration: int) -> Selection:
    """Filter and de-duplicate candidates in a fixed order (round, then hard before easy, then index), so the
    outcome depends on the records only."""
    order = {"hard": 0, "easy": 1}
    decide = CandidateFilter([i.prompt for i in cache], threshold, min_distinct_trigrams)
    selection = Selection()
    for c in sorted(candidates, key=lambda c: (c["round"], order[c["kind"]], c["index"])):
        text = c["text"].strip()
        verdict = decide.decide(text, c["finish_reason"])
        if verdict.kept:
            selection.kept.append(Instruction(instruction_id(text), text, c["kind"], iteration, c["from_id"]))
        else:
            selection.dropped.append({"request": c["request"], "kind": c["kind"], "text": text, "reason": verdict.reason,
                                      "similar_to": verdict.similar_to, "similarity": verdict.similarity,
                                      "from_id": c["from_id"]})  # fmt: skip
    return selection
