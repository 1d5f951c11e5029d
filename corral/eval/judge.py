"""LLM-as-judge grading: single-answer scores, pairwise verdicts asked in both orders, and Vicuna-style
relative scores, from any OpenAI-compatible judge.

Every judgment is appended to `judgments/<mode>.jsonl` as it arrives, with the judge's raw reply and
the parsed result (or `parsed: false`). A judgment is keyed by a digest of the judge model and the
exact messages it is sent, so it is never asked for again, and changing the prompts, an answer or the
judge asks anew. Replies that cannot be parsed are recorded and counted, never turned into a score
(parsing.py says what parses). Prompts are Corral's YAML (one per mode) or FastChat's
judge_prompts.jsonl, picked per question turn by MT-bench's rule (fastchat.py).

Two options change what is asked: `constrained` sends a JSON schema for the verdict with each
request and reads the reply as JSON (constrained.py); `scoring="expected"` also asks for the
reply's token log-probabilities and records the judge's probability-weighted verdict beside the
sampled one (expected.py). Either one is part of the cache key: switching it on asks anew.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import yaml

from corral.atomic import append_line, read_jsonl
from corral.data.formats import DataError
from corral.eval import constrained as json_verdicts
from corral.eval import expected as weighing
from corral.eval.client import JudgeReply, as_judge
from corral.eval.parsing import DEFAULT_SCALE, parse_score, parse_two_scores, parse_verdict, unparsed_reason, verdict_span
from corral.eval.question_set import Question
from corral.generate.sampling import SamplingParams

MODES = ("single", "pairwise", "relative")
SCORINGS = ("parsed", "expected")
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
    key: str  # digest of judge model + messages (+ request options): the cache key
    messages: list[dict]
    record: dict  # what identifies the judgment in the output file (mode, question_id, turn, models...)
    parse: Callable[[str], object]
    output_format: str = "[[rating]]"  # the form the prompt asks for (OUTPUT_FORMATS)
    response_format: dict | None = None  # constrained: the JSON schema sent with the request
    top_logprobs: int = 0  # scoring=expected: alternatives asked for per reply token


def _key(judge_model: str, messages: list[dict], options: dict | None = None) -> str:
    """Judgments asked without options keep the keys they had before options existed."""
    payload = [judge_model, messages] + ([options] if options else [])
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def model_pairs(models: list[str], baseline: str | None) -> list[tuple[str, str]]:
    """Every pair of models, or each model against `baseline`."""
    if baseline:
        return [(m, baseline) for m in models if m != baseline]
    return list(combinations(models, 2))


def build_tasks(mode: str, questions: list[Question], answers: dict[str, dict], models: list[str],
                prompts: PromptSet, judge_model: str, baseline: str | None = None, swap: bool = True,
                reference_categories=REFERENCE_CATEGORIES, constrained: bool = False, scoring: str = "parsed",
                top_logprobs: int = 20, reason_chars: int | None = None) -> tuple[list[Task], int]:  # fmt: skip
    """(tasks, missing): one task per question turn and model (single), or per turn, pair and order
    (pairwise, relative). `answers[model][question_id]` is an answer record; a question a model has
    not answered is counted in `missing` and not asked. Reference answers reach the judge only for
    questions in `reference_categories`. `constrained`: the verdict is asked for as JSON under a schema
    (its reason capped at `reason_chars` when given); `scoring="expected"`: `top_logprobs` alternatives per reply token are asked for too."""
    if mode == "relative" and not baseline:
        raise ValueError("mode=relative needs `baseline` (the reference model the others are scored against)")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}: expected one of {', '.join(SCORINGS)}")
    if scoring == "expected" and mode == "relative":
        raise ValueError("scoring=expected weighs one verdict per reply: use mode=single or mode=pairwise "
                         "(relative replies carry two scores)")  # fmt: skip
    if scoring == "expected" and not 1 <= top_logprobs <= 20:
        raise ValueError(f"top_logprobs={top_logprobs}: expected 1 to 20 (OpenAI's limit)")
    options = {"constrained": constrained, "top_logprobs": top_logprobs if scoring == "expected" else 0,
               "reason_chars": reason_chars}
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
                if mode == "pairwise":  # characters of each answer judged: the length-controlled win rate's covariate
                    record["length_1"], record["length_2"] = (len(r["turns"][turn]) for r in records)
                tasks.append(_task(prompts, mode, q, turn, [r["turns"] for r in records], record, judge_model,
                                   reference_categories, **options))  # fmt: skip
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
          judge_model: str, reference_categories, constrained: bool = False, top_logprobs: int = 0,
          reason_chars: int | None = None) -> Task:
    references = due_references(question, turn, reference_categories)
    prompt = prompts.select(mode, turn, references is not None)
    if prompt.output_format != MODE_FORMATS[mode]:
        raise DataError(f"{prompts.path}: prompt '{prompt.name}': output_format {prompt.output_format!r} does not "
                        f"fit mode={mode} (needs {MODE_FORMATS[mode]!r})")  # fmt: skip
    messages = render(prompt, question, turn, answers, references)
    record = {**record, "prompt": prompt.name, "reference": references is not None}
    options, response_format = {}, None
    if constrained:  # the prompt asks for [[8]], which the schema rules out: say what to write instead
        response_format = json_verdicts.response_format(mode, DEFAULT_SCALE, reason_chars)
        messages[-1] = {**messages[-1], "content": messages[-1]["content"].rstrip() + "\n\n"
                        + json_verdicts.instruction(mode, DEFAULT_SCALE)}  # fmt: skip
        options["response_format"] = response_format
        record["constrained"] = True
    if top_logprobs:
        options["top_logprobs"] = top_logprobs
        record["scoring"] = "expected"
    return Task(_key(judge_model, messages, options), messages, record, OUTPUT_FORMATS[prompt.output_format],
                prompt.output_format, response_format, top_logprobs)  # fmt: skip


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
    expected: int = 0  # scoring=expected: judgments with a probability-weighted verdict
    fallbacks: Counter = field(default_factory=Counter)  # ... and why the others have none
    parse_errors: Counter = field(default_factory=Counter)

    @property
    def parse_rate(self) -> float | None:
        return self.parsed / self.asked if self.asked else None

    def summary(self) -> str:
        text = (f"{self.asked} judgments asked ({self.parsed} parsed, {self.unparseable} unparseable"
                + (f", parse rate {self.parse_rate:.0%}" if self.asked else "") + f"), {self.cached} already in the file")  # fmt: skip
        if self.asked:
            mean = sum(self.latencies) / len(self.latencies) if self.latencies else 0.0
            text += f"; {self.seconds:.1f} s, {self.seconds / self.asked:.2f} s per judgment (mean latency {mean:.2f} s)"
        if self.parse_errors:
            reason, n = self.parse_errors.most_common(1)[0]
            text += f"; most common parse failure ({n}): {reason}"
        if self.expected or self.fallbacks:
            text += f"; scoring=expected: {self.expected} weighed, {sum(self.fallbacks.values())} kept the parsed verdict only"
            if self.fallbacks:
                text += " (" + ", ".join(f"{reason}: {n}" for reason, n in self.fallbacks.most_common()) + ")"
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


def read_verdict(task: Task, reply: JudgeReply) -> tuple[object | None, str | None]:
    """(parsed verdict, None) or (None, why): JSON under the schema when constrained, else the
    strict text parser of the prompt's output format."""
    if task.response_format is not None:
        parsed, error = json_verdicts.parse_json_verdict(reply.text, task.record["mode"], DEFAULT_SCALE)
    else:
        parsed = task.parse(reply.text)
        error = None if parsed is not None else unparsed_reason(reply.text, task.output_format)
    if error and reply.finish_reason == "length":
        error += " (the reply was cut at max_tokens)"
    return parsed, error


def expected_fields(task: Task, reply: JudgeReply, parsed) -> dict:
    """scoring=expected: the probability-weighted verdict at the verdict's token, or why there is none.
    Single: `expected_score` and `expected_probs` per score; pairwise: `expected_probs` of A / B / tie."""
    mode = task.record["mode"]
    if parsed is None:
        return {"expected_fallback": weighing.UNPARSED}
    if task.response_format is not None:
        span = json_verdicts.json_value_span(reply.text, "score" if mode == "single" else "verdict")
        values = weighing.score_values(DEFAULT_SCALE.low, DEFAULT_SCALE.high) if mode == "single" else json_verdicts.VERDICTS
    else:
        span = verdict_span(reply.text, task.output_format)
        values = weighing.score_values(DEFAULT_SCALE.low, DEFAULT_SCALE.high) if mode == "single" else weighing.PAIRWISE_VALUES
    if span is not None and values.get(reply.text[span[0]: span[1]]) != parsed:
        span = None  # what stands there is not the verdict the parser read
    weighed, why = weighing.weigh(reply.logprobs, reply.text, span, values)
    if weighed is None:
        return {"expected_fallback": why}
    fields = {"expected_probs": {str(int(v)) if mode == "single" else v: p for v, p in weighed.probs.items()},
              "expected_mass": weighed.mass}  # fmt: skip
    if mode == "single":
        fields["expected_score"] = weighed.expected()
    if weighed.ambiguous_mass:
        fields["expected_ambiguous_mass"] = weighed.ambiguous_mass
    return fields


def judgment_record(task: Task, reply: JudgeReply, latency: float) -> dict:
    """What is appended to the judgments file for one reply."""
    parsed, error = read_verdict(task, reply)
    record = {**task.record, **verdict_fields(task.record["mode"], task.record, parsed), "parsed": parsed is not None,
              "judgment": reply.text.strip(), "user_prompt": task.messages[-1]["content"], "key": task.key,
              "latency_s": round(latency, 4), "tstamp": time.time()}  # fmt: skip
    if error:
        record["parse_error"] = error
    if task.top_logprobs:
        record.update(expected_fields(task, reply, parsed))
    return record


def grade(tasks: list[Task], judge, params: SamplingParams, out_path: str | Path, concurrency: int = 8,
          progress: bool = True) -> GradeReport:
    """Ask `judge` (a corral.eval.client.Judge, or a chat backend with `complete`) every task not
    already in `out_path`, `concurrency` at a time; append each judgment as it comes."""
    from tqdm import tqdm

    judge = as_judge(judge)
    report = GradeReport()
    done = {r.get("key") for r in read_jsonl(out_path)}
    todo = [t for t in tasks if t.key not in done]
    report.cached = len(tasks) - len(todo)

    def ask(task: Task):
        started = time.perf_counter()
        reply = judge.ask(task.messages, params, top_logprobs=task.top_logprobs, response_format=task.response_format)
        return task, reply, time.perf_counter() - started

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(ask, t) for t in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="judging", disable=not progress):
            try:
                task, reply, latency = future.result()
            except Exception as e:  # noqa: BLE001 - a failed request is reported, not recorded as a judgment
                report.errors.append(f"{type(e).__name__}: {e}")
                continue
            record = judgment_record(task, reply, latency)
            append_line(out_path, json.dumps(record, ensure_ascii=False))
            report.asked += 1
            report.latencies.append(latency)
            report.parsed += record["parsed"]
            report.unparseable += not record["parsed"]
            if "parse_error" in record:
                report.parse_errors[record["parse_error"]] += 1
            if task.top_logprobs:
                report.expected += "expected_probs" in record
                if "expected_fallback" in record:
                    report.fallbacks[record["expected_fallback"]] += 1
    report.seconds = time.perf_counter() - start
    return report
