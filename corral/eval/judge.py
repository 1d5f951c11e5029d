"""LLM-as-judge grading: single-answer scores, pairwise verdicts asked in both orders, and Vicuna-style
relative scores, from any OpenAI-compatible judge.

Every judgment is appended to `judgments/<mode>.jsonl` as it arrives, with the judge's raw reply and
the parsed result (or `parsed: false`). A judgment is keyed by a digest of the judge model and the
exact messages it is sent, so it is never asked for again, and changing the prompts, an answer or the
judge asks anew. Replies that cannot be parsed are recorded and counted, never turned into a score.
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
from corral.eval.question_set import Question
from corral.generate.sampling import SamplingParams

MODES = ("single", "pairwise", "relative")
DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "judge_prompts.yaml"
PLACEHOLDERS = {"single": ("{conversation}",), "pairwise": ("{conversation_a}", "{conversation_b}"),
                "relative": ("{conversation_a}", "{conversation_b}")}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class JudgePrompt:
    system: str
    template: str
    reference: str  # block put in {reference} when the question has a reference answer


def load_prompts(path: str | Path | None = None) -> dict[str, JudgePrompt]:
    path = Path(path or DEFAULT_PROMPTS)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read judge prompts: {e.strerror}") from None
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
        prompts[mode] = JudgePrompt(entry["system"].strip(), entry["template"], entry["reference"])
    return prompts


def transcript(question: Question, answers: list[str], turn: int) -> str:
    """The conversation up to `turn` (0-based), ending with the assistant's reply to that turn."""
    parts = []
    for i in range(turn + 1):
        parts.append(f"### User\n{question.turns[i]}\n\n### Assistant\n{answers[i]}")
    return "\n\n".join(parts)


def render(prompt: JudgePrompt, question: Question, turn: int, **conversations: str) -> list[dict]:
    reference = question.reference_for(turn)
    block = prompt.reference.replace("{reference}", reference) if reference else ""
    text = prompt.template
    for name, value in conversations.items():  # replace, not str.format: answers may hold braces
        text = text.replace("{" + name + "}", value)
    text = text.replace("{reference}", block)
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# Parsing judge replies


_NUM = r"(\d+(?:\.\d+)?)"
_SCORE_PATTERNS = [
    rf"\[\[\s*{_NUM}\s*(?:/\s*10)?\s*\]\]",  # [[8]]  [[8.5]]  [[8/10]]
    rf"(?:rating|score|grade)\s*(?:is|of)?\s*[:=]?\s*\**\s*\[?\s*{_NUM}\s*\]?\s*(?:/\s*10|out of 10)?",
    rf"\[\s*{_NUM}\s*\]",  # [8]
    rf"\b{_NUM}\s*(?:/\s*10|out of 10)\b",  # 8/10
]


def _in_range(value: float) -> float | None:
    return value if 1 <= value <= 10 else None


def parse_score(text: str) -> float | None:
    """A 1-10 score: `[[8]]`, `Rating: 8/10`, `Score: 8`, `[8]`, `8/10`; the last match of the most
    explicit form found. None when there is none or it is out of range."""
    for pattern in _SCORE_PATTERNS:
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return _in_range(float(found[-1]))
    return None


_VERDICTS = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}


def parse_verdict(text: str) -> str | None:
    """`A`, `B` or `tie` from `[[A]]`, `[[B]]`, `[[C]]` / `[[tie]]`, or `Verdict: A`, `Winner: assistant B`,
    `Final verdict: tie`. None when absent or when the reply names different verdicts."""
    found = {_VERDICTS[v.lower()] for v in re.findall(r"\[\[\s*(A|B|C|tie)\s*\]\]", text, flags=re.IGNORECASE)}
    if not found:
        found = {
            _VERDICTS[v.lower()]
            for v in re.findall(r"(?:verdict|winner|better (?:reply|answer|assistant))\s*(?:is)?\s*[:\-]?\s*\**\s*"
                                r"(?:assistant\s*)?\[?\b(A|B|C|tie)\b", text, flags=re.IGNORECASE)
        }  # fmt: skip
    return found.pop() if len(found) == 1 else None


def parse_two_scores(text: str) -> tuple[float, float] | None:
    """Two 1-10 scores: `[[8, 6]]`, `[[8]] ... [[6]]`, a line `8 6`, or `Assistant 1: 8 ... Assistant 2: 6`."""
    candidates = re.findall(rf"\[\[\s*{_NUM}\s*[,;/ ]\s*{_NUM}\s*\]\]", text)
    if not candidates:
        singles = re.findall(rf"\[\[\s*{_NUM}\s*\]\]", text)
        if len(singles) == 2:
            candidates = [tuple(singles)]
    if not candidates:
        one = re.search(rf"assistant\s*(?:1|a)\s*[:\-]\s*\**\s*{_NUM}.*?assistant\s*(?:2|b)\s*[:\-]\s*\**\s*{_NUM}",
                        text, flags=re.IGNORECASE | re.DOTALL)  # fmt: skip
        if one:
            candidates = [one.groups()]
    if not candidates:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        for line in (lines[:1] + lines[-1:]) if lines else []:
            m = re.fullmatch(rf"{_NUM}\s*(?:/\s*10)?\s*[, ]\s*{_NUM}\s*(?:/\s*10)?", line)
            if m:
                candidates = [m.groups()]
                break
    if not candidates:
        return None
    a, b = (_in_range(float(x)) for x in candidates[-1])
    return (a, b) if a is not None and b is not None else None


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
                prompts: dict[str, JudgePrompt], judge_model: str, baseline: str | None = None,
                swap: bool = True) -> tuple[list[Task], int]:
    """(tasks, missing): one task per question turn and model (single), or per turn, pair and order
    (pairwise, relative). `answers[model][question_id]` is an answer record; a question a model has
    not answered is counted in `missing` and not asked."""
    tasks: list[Task] = []
    missing = 0
    prompt = prompts[mode]
    for q in questions:
        for turn in range(len(q.turns)):
            base = {"mode": mode, "judge": judge_model, "question_id": q.question_id, "category": q.category,
                    "turn": turn + 1}  # fmt: skip
            if mode == "single":
                for model in models:
                    answer = answers[model].get(q.question_id)
                    if answer is None or len(answer["turns"]) <= turn:
                        missing += 1
                        continue
                    messages = render(prompt, q, turn, conversation=transcript(q, answer["turns"], turn))
                    tasks.append(Task(_key(judge_model, messages), messages, {**base, "model": model}, parse_score))
                continue
            if mode == "relative" and not baseline:
                raise ValueError("mode=relative needs `baseline` (the reference model the others are scored against)")
            for a, b in model_pairs(models, baseline):
                if mode == "relative":
                    a, b = b, a  # Vicuna's order: the reference model is assistant 1
                orders = [(a, b), (b, a)] if swap else [(a, b)]
                for first, second in orders:
                    ans1, ans2 = answers[first].get(q.question_id), answers[second].get(q.question_id)
                    if ans1 is None or ans2 is None or min(len(ans1["turns"]), len(ans2["turns"])) <= turn:
                        missing += 1
                        continue
                    messages = render(prompt, q, turn, conversation_a=transcript(q, ans1["turns"], turn),
                                      conversation_b=transcript(q, ans2["turns"], turn))
                    record = {**base, "model_1": first, "model_2": second}
                    if mode == "relative":
                        record["baseline"] = baseline
                    parse = parse_verdict if mode == "pairwise" else parse_two_scores
                    tasks.append(Task(_key(judge_model, messages), messages, record, parse))
    return tasks, missing


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
                      "parsed": parsed is not None, "judgment": text, "key": task.key, "tstamp": time.time()}
            append_line(out_path, json.dumps(record, ensure_ascii=False))
            report.asked += 1
            report.latencies.append(latency)
            report.parsed += parsed is not None
            report.unparseable += parsed is None
    report.seconds = time.perf_counter() - start
    return report
