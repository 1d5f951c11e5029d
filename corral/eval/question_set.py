"""Question sets for LLM-as-judge evaluation, in FastChat's `question.jsonl` format.

A record: `{"question_id": 81, "category": "writing", "turns": ["...", "..."], "reference": ["...", "..."]}`;
`reference` is optional (one answer per turn, used by the judge for math, reasoning and coding).
`builtin:corral_questions` is Corral's own set (91 questions, 13 categories, written for this project).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from corral.data.formats import DataError, iter_records, resolve_data_path

QUESTIONS_DIR = Path(__file__).parent / "questions"


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None

    def reference_for(self, turn: int) -> str | None:
        if self.reference and turn < len(self.reference) and self.reference[turn]:
            return self.reference[turn]
        return None


def read_questions(path: str) -> list[Question]:
    """Read a question file; errors name the file, line and field. Question ids must be unique."""
    questions: list[Question] = []
    seen: dict = {}
    for where, record in iter_records(resolve_data_path(path, QUESTIONS_DIR)):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        qid = record.get("question_id")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool) or qid == "":
            raise DataError(f"{where}: field 'question_id': expected an integer or a string, got {qid!r}")
        if qid in seen:
            raise DataError(f"{where}: field 'question_id': {qid!r} already used at {seen[qid]}")
        seen[qid] = where
        category = record.get("category", "general")
        if not isinstance(category, str) or not category:
            raise DataError(f"{where}: field 'category': expected a non-empty string, got {category!r}")
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field 'turns': expected a non-empty list of strings, got {turns!r}")
        for i, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn.strip():
                raise DataError(f"{where}: field 'turns[{i}]': expected a non-empty string, got {turn!r}")
        reference = record.get("reference")
        if reference is not None:
            if isinstance(reference, str):
                reference = [reference]
            if not isinstance(reference, list) or not all(isinstance(r, str) for r in reference):
                raise DataError(f"{where}: field 'reference': expected a list of strings (one per turn)")
            if len(reference) > len(turns):
                raise DataError(f"{where}: field 'reference': {len(reference)} answers for {len(turns)} turns")
        questions.append(Question(qid, category, tuple(turns), tuple(reference) if reference else None))
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def stratified_sample(questions: list[Question], n: int, seed: int = 0) -> list[Question]:
    """`n` questions spread evenly across categories, in file order.

    A question file is usually sorted by category (MT-bench's first 10 lines are all `writing`), so
    its first N lines measure one category. Here each category gets N / (number of categories),
    the remainder going to categories picked at random; within a category the questions are a
    seeded random choice. The same seed picks the same questions, so `corral judge answer` and
    `corral judge grade` with the same `limit` and `limit_seed` agree."""
    import random

    if not n or n >= len(questions):
        return list(questions)
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_category.setdefault(q.category, []).append(i)
    pools = [rng.sample(indices, len(indices)) for indices in by_category.values()]
    rng.shuffle(pools)
    chosen: list[int] = []
    while len(chosen) < n:  # round-robin: one from each category with questions left, in turn
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return [questions[i] for i in sorted(chosen)]


def describe_sample(chosen: list[Question], total: int, seed: int) -> str:
    """What `limit` picked, for the command to print: how many of how many, and per category."""
    if len(chosen) == total:
        return f"all {total} questions"
    counts: dict[str, int] = {}
    for q in chosen:
        counts[q.category] = counts.get(q.category, 0) + 1
    spread = ", ".join(f"{c} {k}" for c, k in sorted(counts.items()))
    return f"{len(chosen)} of {total} questions, a stratified sample across {len(counts)} categories (seed {seed}: {spread})"
