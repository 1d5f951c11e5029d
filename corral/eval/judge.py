"""LLM-as-judge grading: single-answer scores, pairwise verdicts asked in both orders, and Vicuna-style
relative scores, from any OpenAI-compatible judge.

Every judgment is appended to `judgments/<mode>.jsonl` as it arrives, with the judge's raw reply and
the parsed result (or `parsed: false`). A judgment is keyed by a digest of the judge model and the
exact messages it is sent, so it is never asked for again, and changing the prompts, an answer or the
judge asks anew. Replies that cannot be parsed are recorded and counted, never turned into a score
(parsing.py says what parses). Prompts are Corral's YAML (one per mode) or FastChat's
judge_prompts.jsonl, picked per question turn by MT-bench's rule (fastchat.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import yaml

from corral.atomic import append_line, read_jsonl
from corral.chat.conversation import Conversation, Message
from corral.data.formats import DataError
from corral.eval.parsing import parse_score, parse_two_scores, parse_verdict
from corral.eval.question_set import Question
from corral.generate.sampling import SamplingParams

MODES = ("single", "pairwise", "relative")
DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "judge_prompts.yaml"
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")  # MT-bench's: where one right answer exists
PLACEHOLDERS = {"single": ("{conversation}",), "pairwise": ("{conversation_a}", "{conversation_b}"),
                "relative": ("{conversation_a}", "{conversation_b}")}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system: str
    template: str
    output_format: str  # what the judge is told to write: one of OUTPUT_FORMATS
    reference: str = ""  # Corral's prompts: the block put in {reference} when a reference answer is due


@dataclass(frozen=True)
class PromptSet:
    """Judge prompts by name, and which rule picks one for a question turn: `corral` (one prompt per
    mode, the reference as a block) or `fastchat` (MT-bench's names, see corral/eval/fastchat.py)."""

    kind: str
    prompts: dict[str, JudgePrompt]
    path: str

    def select(self, mode: str, turn: int, with_reference: bool) -> JudgePrompt:
        if self.kind == "corral":
            return self.prompts[mode]
        from corral.eval.fastchat import select_prompt

        return select_prompt(self, mode, turn, with_reference)


# The form each output format asks for, and the parser that reads exactly that form.
OUTPUT_FORMATS = {"[[rating]]": parse_score, "[[A]]": parse_verdict, "[[rating_a,rating_b]]": parse_two_scores}
MODE_FORMATS = {"single": "[[rating]]", "pairwise": "[[A]]", "relative": "[[rating_a,rating_b]]"}


def load_prompts(path: str | Path | None = None) -> PromptSet:
    """Corral's YAML prompts (the default, or `path`), or FastChat's `judge_prompts.jsonl` as it is."""
    path = Path(path or DEFAULT_PROMPTS)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read judge prompts: {e.strerror}") from None
    if path.suffix == ".jsonl" or text.lstrip().startswith("{"):
        from corral.eval.fastchat import load_fastchat_prompts

        return load_fastchat_prompts(path)
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    prompts = {}
    for mode in MODES:
        entry = (tree or {}).get(mode)
        if not isinstance(entry, dict):
            raise DataError(f"{path}: field '{mode}': missing (need system, template, reference)")
        for key in ("system", "template", "reference"):
            if not isinstance(entry.get(key), str):
                raise DataError(f"{path}: field '{mode}.{key}': expected a string")
        for placeholder in PLACEHOLDERS[mode] + ("{reference}",):
            if placeholder not in entry["template"]:
                raise DataError(f"{path}: field '{mode}.template': must contain {placeholder}")
        if "{reference}" not in entry["reference"]:
            raise DataError(f"{path}: field '{mode}.reference': must contain {{reference}}")
        prompts[mode] = JudgePrompt(f"corral-{mode}", entry["system"].strip(), entry["template"], MODE_FORMATS[mode],
                                    entry["reference"])  # fmt: skip
    return PromptSet("corral", prompts, str(path))


def transcript(question: Question, answers: list[str], turn: int) -> str:
    """The conversation up to `turn` (0-based), ending with the assistant's reply to that turn."""
    parts = []
    for i in range(turn + 1):
        parts.append(f"### User\n{question.turns[i]}\n\n### Assistant\n{answers[i]}")
    return "\n\n".join(parts)


def fill(template: str, values: dict[str, str]) -> str:
    """`{name}` placeholders replaced in one pass: an answer holding `{answer_b}` or braces stays as written."""
    return re.sub(r"\{([a-z_0-9]+)\}", lambda m: values.get(m[1], m[0]), template)


def prompt_values(question: Question, turn: int, answers: list[list[str]], references: list[str] | None,
                  reference_block: str = "") -> dict[str, str]:
    """Every placeholder either prompt family uses, for one question turn and one or two answer lists:
    Corral's {conversation}, {conversation_a|b}, {reference}; FastChat's {question}, {question_N},
    {answer}, {answer_N}, {answer_a|b}, {answer_a|b_N}, {ref_answer_N}."""
    values = {"question": question.turns[turn], "reference": ""}
    values.update({f"question_{i}": text for i, text in enumerate(question.turns[: turn + 1], 1)})
    for side, turns in zip(("a", "b"), answers):
        values[f"conversation_{side}"] = transcript(question, turns, turn)
        values[f"answer_{side}"] = turns[turn]
        values.update({f"answer_{side}_{i}": text for i, text in enumerate(turns[: turn + 1], 1)})
    if len(answers) == 1:
        values["conversation"] = values["conversation_a"]
        values["answer"] = answers[0][turn]
        values.update({f"answer_{i}": text for i, text in enumerate(answers[0][: turn + 1], 1)})
    if references:
        values.update({f"ref_answer_{i}": text for i, text in enumerate(references, 1)})
        values["reference"] = fill(reference_block, {"reference": references[-1]})
    return values


def render(prompt: JudgePrompt, question: Question, turn: int, answers: list[list[str]],
           references: list[str] | None = None) -> list[dict]:
    text = fill(prompt.template, prompt_values(question, turn, answers, references, prompt.reference))
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": text}]


def due_references(question: Question, turn: int, reference_categories) -> list[str] | None:
    """The reference answers up to `turn` when the question's category gets them (MT-bench: math,
    reasoning, coding) and it has one for every turn so far; else None (the judge sees none)."""
    if question.category not in reference_categories:
        return None
    references = [question.reference_for(i) for i in range(turn + 1)]
    return references if all(references) else None


# ---------------------------------------------------------------------------------------------
# Tasks: what to ask the judge


@dataclass
class Task:
    key: str  # digest of judge model + messages: the cache key
    messages: list[dict]
    record: dict  # what identifies the judgment in the output file (mode, question_id, turn, models...)
    parse: Callable[[str], object]


def _key(judge_model: str, messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps([judge_model, messages], sort_keys=True).encode()).hexdigest()[:24]


def model_pairs(models: list[str], baseline: str | None) -> list[tuple[str, str]]:
    """Every pair of models, or each model against `baseline`."""
    if baseline:
        return [(m, baseline) for m in models if m != baseline]
    return list(combinations(models, 2))


def build_tasks(mode: str, questions: list[Question], answers: dict[str, dict], models: list[str],
                prompts: PromptSet, judge_model: str, baseline: str | None = None, swap: bool = True,
                reference_categories=REFERENCE_CATEGORIES) -> tuple[list[Task], int]:
    """(tasks, missing): one task per question turn and model (single), or per turn, pair and order
    (pairwise, relative). `answers[model][question_id]` is an answer record; a question a model has
    not answered is counted in `missing` and not asked. Reference answers reach the judge only for
    questions in `reference_categories`."""
    if mode == "relative" and not baseline:
        raise ValueError("mode=relative needs `baseline` (the reference model the others are scored against)")
    prompts.select(mode, 0, False)  # prompts without one for this mode fail before anything is asked
    tasks: list[Task] = []
    missing = 0
    for q in questions:
        for turn in range(len(q.turns)):
            base = {"mode": mode, "judge": judge_model, "question_id": q.question_id, "category": q.category,
                    "turn": turn + 1}  # fmt: skip
            for names in _matchups(mode, models, baseline, swap):
                records = [answers[name].get(q.question_id) for name in names]
                if any(r is None or len(r["turns"]) <= turn for r in records):
                    missing += 1
                    continue
                record = {**base, "model": names[0]} if mode == "single" else {**base, "model_1": names[0],
                                                                                 "model_2": names[1]}  # fmt: skip
                if mode == "relative":
                    record["baseline"] = baseline
                tasks.append(_task(prompts, mode, q, turn, [r["turns"] for r in records], record, judge_model,
                                   reference_categories))  # fmt: skip
    return tasks, missing


def _matchups(mode: str, models: list[str], baseline: str | None, swap: bool) -> list[tuple[str, ...]]:
    """Who is judged together: each model alone (single), or each pair in one or both orders."""
    if mode == "single":
        return [(m,) for m in models]
    matchups = []
    for a, b in model_pairs(models, baseline):
        if mode == "relative":
            a, b = b, a  # Vicuna's order: the reference model is assistant 1
        matchups += [(a, b), (b, a)] if swap else [(a, b)]
    return matchups


def _task(prompts: PromptSet, mode: str, question: Question, turn: int, answers: list[list[str]], record: dict,
          judge_model: str, reference_categories) -> Task:
    references = due_references(question, turn, reference_categories)
    prompt = prompts.select(mode, turn, references is not None)
    if prompt.output_format != MODE_FORMATS[mode]:
        raise DataError(f"{prompts.path}: prompt '{prompt.name}': output_format {prompt.output_format!r} does not "
                        f"fit mode={mode} (needs {MODE_FORMATS[mode]!r})")  # fmt: skip
    messages = render(prompt, question, turn, answers, references)
    record = {**record, "prompt": prompt.name, "reference": references is not None}
    return Task(_key(judge_model, messages), messages, record, OUTPUT_FORMATS[prompt.output_format])


# ---------------------------------------------------------------------------------------------
# Grading


@dataclass
class GradeReport:
    asked: int = 0
    cached: int = 0
    parsed: int = 0
    unparseable: int = 0
    missing_answers: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.asked} judgments asked ({self.parsed} parsed, {self.unparseable} unparseable), "
                f"{self.cached} already in the file")  # fmt: skip
        if self.asked:
            mean = sum(self.latencies) / len(self.latencies) if self.latencies else 0.0
            text += f"; {self.seconds:.1f} s, {self.seconds / self.asked:.2f} s per judgment (mean latency {mean:.2f} s)"
        if self.missing_answers:
            text += f"; {self.missing_answers} skipped for missing answers"
        if self.errors:
            text += f"; {len(self.errors)} failed after retries (asked again next run), first: {self.errors[0]}"
        return text


def verdict_fields(mode: str, record: dict, parsed) -> dict:
    """The parsed result as record fields: score / winner / scores."""
    if mode == "single":
        return {"score": parsed}
    if mode == "pairwise":
        winner = {"A": record["model_1"], "B": record["model_2"], "tie": "tie"}.get(parsed) if parsed else None
        return {"verdict": parsed, "winner": winner}
    return {"scores": list(parsed) if parsed else None}


def grade(tasks: list[Task], judge, params: SamplingParams, out_path: str | Path, concurrency: int = 8,
          progress: bool = True) -> GradeReport:
    """Ask `judge` (a chat backend with `complete`) every task not already in `out_path`, `concurrency`
    at a time; append each judgment as it comes."""
    from tqdm import tqdm

    report = GradeReport()
    done = {r.get("key") for r in read_jsonl(out_path)}
    todo = [t for t in tasks if t.key not in done]
    report.cached = len(tasks) - len(todo)

    def ask(task: Task):
        started = time.perf_counter()
        conversation = Conversation([Message(m["role"], m["content"]) for m in task.messages])
        reply = judge.complete(conversation, params)
        return task, reply.text, time.perf_counter() - started

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(ask, t) for t in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="judging", disable=not progress):
            try:
                task, text, latency = future.result()
            except Exception as e:  # noqa: BLE001 - a failed request is reported, not recorded as a judgment
                report.errors.append(f"{type(e).__name__}: {e}")
                continue
            parsed = task.parse(text)
            record = {**task.record, **verdict_fields(task.record["mode"], task.record, parsed),
                      "parsed": parsed is not None, "judgment": text, "user_prompt": task.messages[-1]["content"],
                      "key": task.key, "tstamp": time.time()}
            append_line(out_path, json.dumps(record, ensure_ascii=False))
            report.asked += 1
            report.latencies.append(latency)
            report.parsed += parsed is not None
            report.unparseable += parsed is None
    report.seconds = time.perf_counter() - start
    return report
