"""Answer generation: models answer a question set, every turn in order (a second turn sees the model's
own first answer, as in MT-bench).

One JSONL file per model under `answers/`; each question's record is appended when all its turns are
answered, so an interrupted run resumes with the questions it had not finished. Local models answer
through the generation engine, `concurrency` questions at a time in one continuous batch; API models
through any OpenAI-compatible endpoint, `concurrency` requests at a time.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from corral.atomic import append_line, read_jsonl
from corral.chat.conversation import Conversation, Message
from corral.data.formats import DataError
from corral.eval.question_set import Question
from corral.generate.sampling import SamplingParams

if TYPE_CHECKING:
    from corral.serve.backends import ChatBackend

# MT-bench's practice: deterministic where there is one right answer, some freedom where style matters.
CATEGORY_TEMPERATURE = {
    "writing": 0.7, "roleplay": 0.7, "generic": 0.7, "counterfactual": 0.7,
    "knowledge": 0.1, "stem": 0.1, "humanities": 0.1, "common-sense": 0.1, "fermi": 0.1,
    "math": 0.0, "coding": 0.0, "reasoning": 0.0, "extraction": 0.0,
}  # fmt: skip
DEFAULT_TEMPERATURE = 0.7


def answer_file(answers_dir: str | Path, model: str) -> Path:
    """`answers/<model>.jsonl`; a model name like `org/name` becomes `org__name.jsonl`."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", model.replace("/", "__"))
    return Path(answers_dir) / f"{safe}.jsonl"


def read_answers(path: str | Path) -> dict:
    """question_id -> answer record (the last one when a question was answered twice). Corral's
    records or FastChat's `model_answer` ones (`choices[0].turns`), so FastChat's answers are graded as they are."""
    from corral.eval.fastchat import answer_from_fastchat

    records = [answer_from_fastchat(r, f"{path}") for r in read_jsonl(path) if "question_id" in r]
    return {r["question_id"]: r for r in records if "turns" in r}


def load_answers(answers_dir: str | Path, models: list[str]) -> dict[str, dict]:
    answers = {}
    for model in models:
        path = answer_file(answers_dir, model)
        if not path.is_file():
            known = answered_models(answers_dir)
            raise DataError(f"{path}: no answers for model '{model}' (answers there: {', '.join(known) or 'none'}; "
                            f"run `corral judge answer` first)")  # fmt: skip
        answers[model] = read_answers(path)
    return answers


def answered_models(answers_dir: str | Path) -> list[str]:
    """The models with an answer file there (Corral's `model`, FastChat's `model_id`)."""
    firsts = [r for p in Path(answers_dir).glob("*.jsonl") for r in read_jsonl(p)[:1]]
    return sorted({r.get("model") or r.get("model_id") for r in firsts} - {None})


def question_params(question: Question, params: SamplingParams, temperature: float | None) -> SamplingParams:
    """The request's sampling: the configured temperature, or the category's."""
    if temperature is None:
        temperature = CATEGORY_TEMPERATURE.get(question.category, DEFAULT_TEMPERATURE)
    return replace(params, temperature=temperature)


def answer_question(backend: ChatBackend, question: Question, params: SamplingParams,
                    system: str | None = None) -> dict:
    """All turns of one question, in order; returns the answer fields of its record."""
    messages = [Message("system", system)] if system else []
    turns, finish = [], []
    for text in question.turns:
        messages.append(Message("user", text))
        reply = backend.complete(Conversation(list(messages)), params)
        messages.append(Message("assistant", reply.text))
        turns.append(reply.text)
        finish.append(reply.finish_reason)
    return {"turns": turns, "finish_reasons": finish}


def generate_answers(backends: dict[str, ChatBackend], questions: list[Question], answers_dir: str | Path,
                     params: SamplingParams, temperature: float | None = None, system: str | None = None,
                     concurrency: int = 16, progress: bool = True) -> dict[str, dict]:
    """Every model in `backends` (name -> chat backend) answers every question it has not answered yet.
    Returns per model {"new": n, "done_before": n, "errors": [...]}."""
    from tqdm import tqdm

    stats = {}
    jobs = []
    for model, backend in backends.items():
        path = answer_file(answers_dir, model)
        done = read_answers(path)
        todo = [q for q in questions if q.question_id not in done]
        stats[model] = {"new": 0, "done_before": len(questions) - len(todo), "errors": [], "file": str(path)}
        jobs += [(model, backend, path, q) for q in todo]

    def run(job):
        model, backend, path, q = job
        fields = answer_question(backend, q, question_params(q, params, temperature), system)
        record = {"question_id": q.question_id, "model": model, "category": q.category, **fields,
                  "tstamp": time.time()}  # fmt: skip
        append_line(path, json.dumps(record, ensure_ascii=False))
        return model

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(run, job): job for job in jobs}
        for future in tqdm(as_completed(futures), total=len(futures), desc="answering", disable=not progress):
            model = futures[future][0]
            try:
                future.result()
                stats[model]["new"] += 1
            except Exception as e:  # noqa: BLE001 - reported per model; the question is asked again next run
                stats[model]["errors"].append(f"question {futures[future][3].question_id}: {type(e).__name__}: {e}")
    return stats
