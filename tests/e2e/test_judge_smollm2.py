"""The whole judge chain with real models: two tiny local models answer (batched through the engine),
`corral serve` with the embedded SmolLM2 judges over HTTP, the report is produced. This checks the
bookkeeping (every judgment recorded, parsed or marked unparseable), not a 135M judge's taste."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from corral.atomic import read_jsonl
from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

QUESTIONS = [
    {"question_id": 1, "category": "knowledge", "turns": ["What is the capital of France?"]},
    {"question_id": 2, "category": "math", "turns": ["What is 3 + 4?", "And 3 + 5?"], "reference": ["7", "8"]},
    {"question_id": 3, "category": "writing", "turns": ["Write one sentence about the sea."]},
]


def corral(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "corral.cli", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_answer_grade_report_with_the_embedded_judge(tmp_path, tiny_model_dir, tiny_lora_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    out = tmp_path / "eval"
    common = ["--questions", str(questions), f"output_dir={out}"]
    corral("judge", "answer", *common, "--model", f"base={tiny_model_dir}", "--model", f"tuned={tiny_lora_dir}",
           "max_tokens=24")  # fmt: skip
    for model in ("base", "tuned"):
        answers = read_jsonl(out / "answers" / f"{model}.jsonl")
        assert sorted(a["question_id"] for a in answers) == [1, 2, 3]
        assert [len(a["turns"]) for a in sorted(answers, key=lambda a: a["question_id"])] == [1, 2, 1]

    server = ServerProcess([], timeout=300)  # the embedded SmolLM2 as the judge
    try:
        judge = ["--judge-api", server.url + "/v1", "--judge-model", "smollm2-135m", "max_tokens=96"]
        printed = corral("judge", "grade", *common, *judge, "mode=single")
        printed += corral("judge", "grade", *common, *judge, "mode=pairwise")
        constrained_out, expected_out = tmp_path / "constrained", tmp_path / "expected"
        for folder in (constrained_out, expected_out):
            shutil.copytree(out / "answers", folder / "answers")
        wide = [*judge[:-1], "max_tokens=200"]  # room for the JSON's 300-character reason before its verdict
        for mode in ("single", "pairwise"):
            printed += corral("judge", "grade", "--questions", str(questions), f"output_dir={constrained_out}", *wide,
                              f"mode={mode}", "constrained=true", "constrained_reason_chars=300")  # fmt: skip
        printed += corral("judge", "grade", "--questions", str(questions), f"output_dir={expected_out}", *wide,
                          "mode=single", "scoring=expected", "constrained=true", "constrained_reason_chars=300")  # fmt: skip
    finally:
        server.stop()
    rates = {}
    for mode in ("single", "pairwise"):
        records = read_jsonl(constrained_out / "judgments" / f"{mode}.jsonl")
        assert len(records) == 8
        for record in records:  # under the schema, reason capped, every verdict parses
            assert record["parsed"], record
        rates[f"constrained {mode}"] = sum(r["parsed"] for r in records) / len(records)
    rates["free single"] = sum(r["parsed"] for r in read_jsonl(out / "judgments" / "single.jsonl")) / 8
    rates["free pairwise"] = sum(r["parsed"] for r in read_jsonl(out / "judgments" / "pairwise.jsonl")) / 8
    weighed = 0
    for record in read_jsonl(expected_out / "judgments" / "single.jsonl"):
        if record["parsed"] and "expected_fallback" not in record:
            assert 1 <= record["expected_score"] <= 10 and 0 < record["expected_mass"] <= 1 + 1e-6
            weighed += 1
        else:
            assert record.get("expected_fallback"), record
    assert weighed > 0  # corral serve's logprobs reach the judge: the verdict token's distribution is weighed
    print("parse rates:", rates)
    print(printed)
    single = read_jsonl(out / "judgments" / "single.jsonl")
    pairwise = read_jsonl(out / "judgments" / "pairwise.jsonl")
    assert len(single) == 2 * 4 and len(pairwise) == 4 * 2  # every judgment recorded, none lost
    for record in single + pairwise:
        assert isinstance(record["judgment"], str) and isinstance(record["parsed"], bool)  # the judge's own text
        if record["parsed"]:
            assert 1 <= record.get("score", 5) <= 10 or record.get("winner") in ("base", "tuned", "tie")
        else:
            assert record.get("score") is None and record.get("winner") is None

    shown = corral("judge", "report", f"output_dir={out}", "baseline=base")
    report = json.loads((out / "report.json").read_text())
    unparsed = sum(not r["parsed"] for r in single)
    assert report["unparseable"]["single"] == unparsed
    assert sum(s["n"] + s["unparseable"] for s in report["single"].values()) == len(single)
    assert "Corral judge report" in shown and (out / "report.html").read_text().startswith("<!doctype html>")
