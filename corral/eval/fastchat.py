"""FastChat's llm_judge files, read and written as they are, so MT-bench runs move between FastChat
and Corral both ways:

- `judge_prompts.jsonl`: one prompt a line (`name`, `type`, `system_prompt`, `prompt_template`,
  `output_format`, `category`), picked by MT-bench's rule (`select_prompt`);
- `model_answer/MODEL.jsonl`: `question_id`, `answer_id`, `model_id`, `choices[0].turns`, `tstamp`;
  read by `corral.eval.answer.read_answers` through `answer_from_fastchat`, written by `write_fastchat_answers`;
- `model_judgment/JUDGE_single.jsonl` and `JUDGE_pair.jsonl`: written from Corral's judgments by
  `write_fastchat_judgments`, read back into them by `read_fastchat_judgments`.

Only the file layouts and the selection rule are FastChat's; the code is Corral's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from corral.atomic import atomic_write_text, read_jsonl
from corral.data.formats import DataError, iter_records
from corral.eval.judge import OUTPUT_FORMATS, JudgePrompt, PromptSet
from corral.eval.question_set import Question

# Every placeholder FastChat's templates use; a template with another one is refused when it is read.
PLACEHOLDERS = {"question", "answer", "answer_a", "answer_b", "ref_answer_1", "ref_answer_2",
                *(f"{name}_{i}" for name in ("question", "answer", "answer_a", "answer_b") for i in (1, 2))}  # fmt: skip
PROMPT_FIELDS = ("name", "type", "system_prompt", "prompt_template", "output_format")


# ---------------------------------------------------------------------------------------------
# judge_prompts.jsonl


def load_fastchat_prompts(path: str | Path) -> PromptSet:
    """Every line of a FastChat `judge_prompts.jsonl`; errors name the file, line and field."""
    prompts = {}
    for where, record in iter_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in PROMPT_FIELDS:
            if not isinstance(record.get(key), str) or not record[key]:
                raise DataError(f"{where}: field '{key}': expected a non-empty string, got {record.get(key)!r}")
        if record["type"] not in ("single", "pairwise"):
            raise DataError(f"{where}: field 'type': expected 'single' or 'pairwise', got {record['type']!r}")
        if record["output_format"] not in OUTPUT_FORMATS:
            raise DataError(f"{where}: field 'output_format': expected one of {', '.join(OUTPUT_FORMATS)}, "
                            f"got {record['output_format']!r}")  # fmt: skip
        unknown = sorted(set(re.findall(r"\{([a-z_0-9]+)\}", record["prompt_template"])) - PLACEHOLDERS)
        if unknown:
            raise DataError(f"{where}: field 'prompt_template': unknown placeholder {{{unknown[0]}}} "
                            f"(known: {', '.join(sorted(PLACEHOLDERS))})")  # fmt: skip
        if record["name"] in prompts:
            raise DataError(f"{where}: field 'name': {record['name']!r} appears twice")
        prompts[record["name"]] = JudgePrompt(record["name"], record["system_prompt"], record["prompt_template"],
                                              record["output_format"])  # fmt: skip
    if not prompts:
        raise DataError(f"{path}: no judge prompts")
    return PromptSet("fastchat", prompts, str(path))


def prompt_name(mode: str, turn: int, with_reference: bool) -> str:
    """MT-bench's choice: `pair-v2` or `single-v1`, the `-math-` prompt where a reference answer is due
    (math, reasoning, coding), `-multi-turn` for the second turn."""
    if mode not in ("single", "pairwise"):
        raise ValueError(f"mode={mode}: FastChat's judge prompts have no {mode} prompt (use mode=single or pairwise, "
                         "or Corral's prompts)")  # fmt: skip
    if turn > 1:
        raise ValueError("FastChat's judge prompts cover two turns; this question has more")
    base = {("single", False): "single-v1", ("single", True): "single-math-v1",
            ("pairwise", False): "pair-v2", ("pairwise", True): "pair-math-v1"}[(mode, with_reference)]  # fmt: skip
    return base + ("-multi-turn" if turn == 1 else "")


def select_prompt(prompts: PromptSet, mode: str, turn: int, with_reference: bool) -> JudgePrompt:
    name = prompt_name(mode, turn, with_reference)
    prompt = prompts.prompts.get(name)
    if prompt is None:
        raise DataError(f"{prompts.path}: no prompt named '{name}' (needed for mode={mode}, turn {turn + 1}"
                        f"{', with a reference answer' if with_reference else ''}; "
                        f"the file has: {', '.join(prompts.prompts)})")  # fmt: skip
    return prompt  # its output_format is checked against the mode where the task is built


# ---------------------------------------------------------------------------------------------
# model_answer/MODEL.jsonl


def answer_from_fastchat(record: dict, where: str = "") -> dict:
    """A FastChat answer record as Corral's (`question_id`, `model`, `turns`); Corral's pass unchanged."""
    if "choices" not in record:
        return record
    try:
        turns = record["choices"][0]["turns"]
    except (KeyError, IndexError, TypeError):
        raise DataError(f"{where}: field 'choices[0].turns': expected a list of strings") from None
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise DataError(f"{where}: field 'choices[0].turns': expected a list of strings")
    return {"question_id": record["question_id"], "model": record.get("model_id"), "turns": turns,
            "answer_id": record.get("answer_id"), "tstamp": record.get("tstamp")}  # fmt: skip


def to_fastchat_answer(record: dict) -> dict:
    """Corral's answer record in FastChat's `model_answer` layout."""
    answer_id = record.get("answer_id") or f"{record['model']}-{record['question_id']}"
    return {"question_id": record["question_id"], "answer_id": answer_id, "model_id": record["model"],
            "choices": [{"index": 0, "turns": list(record["turns"])}], "tstamp": record.get("tstamp")}  # fmt: skip


def write_fastchat_answers(answers_dir: str | Path, out_dir: str | Path, models: list[str]) -> list[Path]:
    """`out_dir/model_answer/MODEL.jsonl` in FastChat's layout from Corral's answer files, written
    atomically; FastChat's gen_judgment.py grades them."""
    from corral.eval.answer import answer_file, read_answers

    written = []
    for model in models:
        rows = [to_fastchat_answer(r) for r in read_answers(answer_file(answers_dir, model)).values()]
        path = answer_file(Path(out_dir) / "model_answer", model)
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# model_judgment/JUDGE_single.jsonl, JUDGE_pair.jsonl


def fastchat_judgment_files(out_dir: str | Path, judge: str) -> dict[str, Path]:
    """FastChat's names: `model_judgment/gpt-4_single.jsonl`, `model_judgment/gpt-4_pair.jsonl`."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", judge)
    folder = Path(out_dir) / "model_judgment"
    return {"single": folder / f"{safe}_single.jsonl", "pairwise": folder / f"{safe}_pair.jsonl"}


def single_to_fastchat(record: dict) -> dict:
    """FastChat scores an unparseable reply -1."""
    return {"question_id": record["question_id"], "model": record["model"],
            "judge": [record["judge"], record.get("prompt", "single-v1")], "user_prompt": record.get("user_prompt", ""),
            "judgment": record["judgment"], "score": record["score"] if record.get("parsed") else -1,
            "turn": record["turn"], "tstamp": record.get("tstamp")}  # fmt: skip


def pair_to_fastchat(g1: dict, g2: dict | None) -> dict:
    """One FastChat pair record from Corral's two orders: g1 shows model_1 first, g2 the swap.
    Winners are named `model_1` / `model_2` / `tie` / `error` relative to g1's order, as FastChat does."""

    def winner(record: dict | None) -> str:
        if record is None or not record.get("parsed"):
            return "error"
        return {g1["model_1"]: "model_1", g1["model_2"]: "model_2"}.get(record["winner"], "tie")

    g2 = g2 or {}
    return {"question_id": g1["question_id"], "model_1": g1["model_1"], "model_2": g1["model_2"],
            "g1_winner": winner(g1), "g2_winner": winner(g2) if g2 else "error",
            "judge": [g1["judge"], g1.get("prompt", "pair-v2")],
            "g1_user_prompt": g1.get("user_prompt", ""), "g1_judgment": g1["judgment"],
            "g2_user_prompt": g2.get("user_prompt", ""), "g2_judgment": g2.get("judgment", ""),
            "turn": g1["turn"], "tstamp": g1.get("tstamp")}  # fmt: skip


def to_fastchat_judgments(mode: str, records: list[dict]) -> list[dict]:
    """Corral's judgments of one mode as FastChat's records (the last judgment of each identity)."""
    if mode == "single":
        latest = {(r["judge"], r["question_id"], r["turn"], r["model"]): r for r in records}
        return [single_to_fastchat(r) for r in latest.values()]
    latest = {(r["judge"], r["question_id"], r["turn"], r["model_1"], r["model_2"]): r for r in records}
    out, used = [], set()
    for (judge, qid, turn, m1, m2), g1 in latest.items():
        if (judge, qid, turn, m1, m2) in used:
            continue
        swapped = (judge, qid, turn, m2, m1)
        used |= {(judge, qid, turn, m1, m2), swapped}
        out.append(pair_to_fastchat(g1, latest.get(swapped)))
    return out


def write_fastchat_judgments(judgments_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """FastChat `model_judgment` files (one per judge and mode) rebuilt from Corral's `judgments/`,
    written atomically; FastChat's `show_result.py` reads them."""
    written = []
    for mode in ("single", "pairwise"):
        records = read_jsonl(Path(judgments_dir) / f"{mode}.jsonl")
        for judge in sorted({r["judge"] for r in records}):
            rows = to_fastchat_judgments(mode, [r for r in records if r["judge"] == judge])
            path = fastchat_judgment_files(out_dir, judge)[mode]
            atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            written.append(path)
    return written


def read_fastchat_judgments(path: str | Path, questions: list[Question]) -> list[dict]:
    """A FastChat `model_judgment` file as Corral's judgment records (mode from the record's fields;
    category from `questions`), so `corral judge report` reads judgments FastChat made."""
    categories = {q.question_id: q.category for q in questions}
    records = []
    for where, row in iter_records(path):
        judge, prompt = (row.get("judge") or ["", ""])[:2]
        base = {"judge": judge, "prompt": prompt, "question_id": row.get("question_id"), "turn": row.get("turn"),
                "category": categories.get(row.get("question_id"), "unknown")}  # fmt: skip
        if "score" in row:
            parsed = row["score"] != -1
            records.append({**base, "mode": "single", "model": row["model"], "score": row["score"] if parsed else None,
                            "parsed": parsed, "judgment": row.get("judgment", ""),
                            "user_prompt": row.get("user_prompt", "")})  # fmt: skip
        elif "g1_winner" in row:
            records += _pair_from_fastchat(row, base)
        else:
            raise DataError(f"{where}: neither 'score' (single) nor 'g1_winner' (pair): not a model_judgment record")
    return records


def _pair_from_fastchat(row: dict, base: dict) -> list[dict]:
    """The two orders of a FastChat pair record as Corral's pairwise records."""
    m1, m2 = row["model_1"], row["model_2"]
    out = []
    for order, (first, second) in (("g1", (m1, m2)), ("g2", (m2, m1))):
        name = row.get(f"{order}_winner")
        if order == "g2" and name == "error" and not row.get("g2_judgment"):
            continue  # asked in one order only
        winner = {"model_1": m1, "model_2": m2, "tie": "tie"}.get(name)
        verdict = None if winner is None else "tie" if winner == "tie" else "A" if winner == first else "B"
        out.append({**base, "mode": "pairwise", "model_1": first, "model_2": second, "verdict": verdict,
                    "winner": winner, "parsed": winner is not None, "judgment": row.get(f"{order}_judgment", ""),
                    "user_prompt": row.get(f"{order}_user_prompt", "")})  # fmt: skip
    return out
