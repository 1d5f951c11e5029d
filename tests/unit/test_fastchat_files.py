"""FastChat's llm_judge files as they are: its judge_prompts.jsonl (a sample of the real lines, system
prompts shortened, in tests/fixtures), MT-bench's choice of prompt per question and turn, its
model_answer and model_judgment layouts, both ways."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from corral.atomic import read_jsonl
from corral.data.formats import DataError
from corral.eval.answer import answered_models, load_answers
from corral.eval.fastchat import answer_from_fastchat, to_fastchat_answer, write_fastchat_judgments
from corral.eval.judge import build_tasks, grade, load_prompts
from corral.eval.question_set import Question
from corral.eval.report import build_report
from corral.generate.sampling import SamplingParams
from corral.recipes.judge import judge_client
from tests.fake_openai import FakeOpenAI

PROMPTS = Path(__file__).resolve().parents[1] / "fixtures" / "fastchat_judge_prompts.jsonl"

QUESTIONS = [
    Question(81, "writing", ("Write a haiku about rain.", "Now one about snow."), ("W-REF-1", "W-REF-2")),
    Question(111, "math", ("What is 6 x 7?", "And 6 x 8?"), ("M-REF-42", "M-REF-48")),
    Question(131, "extraction", ("Extract the year from: 'born 1990'.",), ("X-REF-1990",)),
    Question(121, "coding", ("Reverse a string in Python.",), ("C-REF-[::-1]",)),
]


def write_fastchat_answers(folder: Path, model: str) -> None:
    """A FastChat `model_answer/MODEL.jsonl` (what FastChat's gen_model_answer.py writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{model}.jsonl", "w") as f:
        for q in QUESTIONS:
            turns = [f"{model} says {{answer_b}} {q.question_id}.{i}" for i in range(1, len(q.turns) + 1)]
            f.write(json.dumps({"question_id": q.question_id, "answer_id": f"id-{model}-{q.question_id}",
                                "model_id": model, "choices": [{"index": 0, "turns": turns}],
                                "tstamp": 1700000000.0}) + "\n")  # fmt: skip


def write_questions(path: Path) -> Path:
    """QUESTIONS as a FastChat question.jsonl."""
    path.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category, "turns": list(q.turns),
                                        "reference": list(q.reference)}) + "\n" for q in QUESTIONS))  # fmt: skip
    return path


def reply(messages: list[dict]) -> str:
    """Single: 9 for model `good`, unparseable for the coding answer of `bad`, else 3. Pairwise: `good` wins."""
    prompt = messages[-1]["content"]
    if "Assistant B" in prompt:
        a_part = prompt.split("Assistant B", 1)[0]
        return "Comparing. [[A]]" if "good says" in a_part else "Comparing. [[B]]"
    if "bad says" in prompt and "121." in prompt:
        return "I cannot decide."
    return "Fine. Rating: [[9]]" if "good says" in prompt else "Weak. Rating: [[3]]"


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Both models answered in FastChat's layout, graded single and pairwise with FastChat's prompts."""
    out = tmp_path_factory.mktemp("fastchat")
    for model in ("good", "bad"):
        write_fastchat_answers(out / "model_answer", model)
    server = FakeOpenAI(reply)
    try:
        prompts = load_prompts(PROMPTS)
        models = answered_models(out / "model_answer")
        answers = load_answers(out / "model_answer", models)
        judge = judge_client(server.url, "judge-x", "NO_SUCH_KEY_VAR", retries=2, timeout=30)
        tasks = {}
        for mode in ("single", "pairwise"):
            tasks[mode], missing = build_tasks(mode, QUESTIONS, answers, models, prompts, "judge-x")
            assert missing == 0
            grade(tasks[mode], judge, SamplingParams(max_new_tokens=32), out / "judgments" / f"{mode}.jsonl",
                  concurrency=4, progress=False)  # fmt: skip
        yield out, tasks, list(server.requests), prompts
    finally:
        server.stop()


def test_prompts_file_read_as_it_is(tmp_path):
    prompts = load_prompts(PROMPTS)
    assert prompts.kind == "fastchat"
    assert set(prompts.prompts) == {"pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn",
                                    "single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}
    lines = PROMPTS.read_text().splitlines()
    cases = [
        (lambda r: r.pop("prompt_template"), "field 'prompt_template': expected a non-empty string"),
        (lambda r: r.update(prompt_template=r["prompt_template"] + "{answer_c}"), r"field 'prompt_template': unknown placeholder \{answer_c\}"),
        (lambda r: r.update(output_format="[[score]]"), "field 'output_format'"),
        (lambda r: r.update(type="arena"), "field 'type'"),
    ]
    for change, message in cases:
        record = json.loads(lines[1])
        change(record)
        bad = tmp_path / "judge_prompts.jsonl"
        bad.write_text(lines[0] + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=rf"judge_prompts.jsonl:2: {message}"):
            load_prompts(bad)
    one = tmp_path / "only_single.jsonl"
    one.write_text(next(line for line in lines if '"single-v1"' in line) + "\n")
    answers = {"m": {81: {"turns": ["x", "y"]}}}
    with pytest.raises(DataError, match=r"only_single.jsonl: no prompt named 'single-v1-multi-turn'"):
        build_tasks("single", QUESTIONS[:1], answers, ["m"], load_prompts(one), "j")
    with pytest.raises(ValueError, match="no relative prompt"):
        build_tasks("relative", QUESTIONS[:1], {"m": {}, "n": {}}, ["m", "n"], load_prompts(PROMPTS), "j", baseline="n")


def _sent(requests: list[dict], *needles: str, single: bool = True) -> list[tuple[str, str]]:
    """(system, user) of the single (or pairwise) requests whose user message holds every needle."""
    pairs = [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in requests]
    return [p for p in pairs if all(n in p[1] for n in needles) and single != ("Assistant B" in p[1])]


def test_mt_bench_prompt_selection(graded):
    _, tasks, requests, prompts = graded
    chosen = {(t.record["mode"], t.record["question_id"], t.record["turn"]): t.record["prompt"]
              for mode in tasks for t in tasks[mode]}  # fmt: skip
    assert chosen == {
        ("single", 81, 1): "single-v1", ("single", 81, 2): "single-v1-multi-turn",
        ("single", 111, 1): "single-math-v1", ("single", 111, 2): "single-math-v1-multi-turn",
        ("single", 131, 1): "single-v1", ("single", 121, 1): "single-math-v1",
        ("pairwise", 81, 1): "pair-v2", ("pairwise", 81, 2): "pair-v2-multi-turn",
        ("pairwise", 111, 1): "pair-math-v1", ("pairwise", 111, 2): "pair-math-v1-multi-turn",
        ("pairwise", 131, 1): "pair-v2", ("pairwise", 121, 1): "pair-math-v1",
    }  # fmt: skip
    assert len(requests) == 2 * 6 + 2 * 6  # single: 2 models x 6 turns; pairwise: 6 turns x both orders
    for system, user in ((r["messages"][0]["content"], r["messages"][-1]["content"]) for r in requests):
        assert not re.search(r"\{(question|answer|ref_answer)\w*\}", user.replace("{answer_b}", "")), user
        # references only for math and coding: never writing's or extraction's, though they have them
        assert "W-REF" not in user and "X-REF" not in user
    # single, turn 1 of math: the question, its first reference, the answer, the prompt's system prompt
    [(system, user)] = _sent(requests, "[Question]\nWhat is 6 x 7?", "good says")
    assert system == prompts.prompts["single-math-v1"].system
    assert "[The Start of Reference Answer]\nM-REF-42\n" in user and "M-REF-48" not in user
    assert "[The Start of Assistant's Answer]\ngood says {answer_b} 111.1\n" in user  # braces in answers kept
    # single, turn 2 of math: both turns, both references; the instruction is the system prompt
    [(system, user)] = _sent(requests, "### Reference answer:\nM-REF-48", "good says")
    assert system == prompts.prompts["single-math-v1-multi-turn"].system
    assert "### User:\nWhat is 6 x 7?" in user and "### User:\nAnd 6 x 8?" in user
    assert "### Assistant A:\ngood says {answer_b} 111.1\n" in user and "### Assistant A:\ngood says {answer_b} 111.2\n" in user
    # writing turn 2: the multi-turn prompt without reference
    [(system, user)] = _sent(requests, "### User:\nNow one about snow.", "good says")
    assert system == prompts.prompts["single-v1-multi-turn"].system and "Reference" not in user
    # pairwise, both orders, answers where each order puts them
    both = _sent(requests, "[User Question]\nReverse a string in Python.", single=False)
    assert len(both) == 2 and all("C-REF-[::-1]" in user for _, user in both)
    firsts = {user.split("[The Start of Assistant A's Answer]\n")[1].split(" says")[0] for _, user in both}
    assert firsts == {"good", "bad"}


def test_reference_categories_are_configurable():
    answers = {"m": {q.question_id: {"turns": ["x"] * len(q.turns)} for q in QUESTIONS}}
    tasks, _ = build_tasks("single", QUESTIONS, answers, ["m"], load_prompts(PROMPTS), "j",
                           reference_categories=["extraction"])  # fmt: skip
    prompt = {(t.record["question_id"], t.record["turn"]): t.record["prompt"] for t in tasks}
    assert prompt[(131, 1)] == "single-math-v1" and prompt[(111, 1)] == "single-v1"
    texts = "".join(t.messages[-1]["content"] for t in tasks)
    assert "X-REF-1990" in texts and "M-REF" not in texts and "C-REF" not in texts
    # Corral's own prompts follow the same rule
    corral, _ = build_tasks("single", QUESTIONS, answers, ["m"], load_prompts(), "j")
    texts = {t.record["question_id"]: t.messages[-1]["content"] for t in corral if t.record["turn"] == 1}
    assert "M-REF-42" in texts[111] and "C-REF" in texts[121] and "X-REF" not in texts[131] and "W-REF" not in texts[81]


def test_answers_both_ways(graded):
    out = graded[0]
    fastchat = read_jsonl(out / "model_answer" / "good.jsonl")[0]
    ours = answer_from_fastchat(fastchat)
    assert ours["model"] == "good" and ours["turns"] == fastchat["choices"][0]["turns"]
    assert to_fastchat_answer(ours) == fastchat
    with pytest.raises(DataError, match=r"a.jsonl:3: field 'choices\[0\].turns'"):
        answer_from_fastchat({"question_id": 1, "choices": []}, "a.jsonl:3")


def test_judgments_round_trip(graded):
    out = graded[0]
    written = write_fastchat_judgments(out / "judgments", out)
    assert [p.name for p in written] == ["judge-x_single.jsonl", "judge-x_pair.jsonl"]
    single = read_jsonl(out / "model_judgment" / "judge-x_single.jsonl")
    assert len(single) == 12 and set(single[0]) == {"question_id", "model", "judge", "user_prompt", "judgment",
                                                    "score", "turn", "tstamp"}  # fmt: skip
    assert {(r["model"], r["score"]) for r in single} == {("good", 9.0), ("bad", 3.0), ("bad", -1)}
    assert all(r["judge"][0] == "judge-x" and r["judge"][1].startswith("single-") for r in single)
    pair = read_jsonl(out / "model_judgment" / "judge-x_pair.jsonl")
    assert len(pair) == 6  # one record per question turn, both orders in it
    for r in pair:
        good = "model_1" if r["model_1"] == "good" else "model_2"
        assert r["g1_winner"] == r["g2_winner"] == good and r["g1_judgment"] and r["g2_judgment"]

    # back: `corral judge report fastchat=...` on FastChat's files gives the report of Corral's own judgments
    from corral.config import JudgeReportConfig
    from corral.recipes.judge import report

    back = out / "back"
    (back / "judgments").mkdir(parents=True)
    questions = write_questions(out / "question.jsonl")
    report(JudgeReportConfig(output_dir=str(back), bootstrap=50, questions=str(questions),
                             fastchat=[str(p) for p in written]))  # fmt: skip
    again = json.loads((back / "report.json").read_text())
    original = json.loads(json.dumps(build_report(out / "judgments", rounds=50), default=str))
    assert again["single"] == original["single"]
    assert again["pairwise"]["pairs"] == original["pairwise"]["pairs"]
    assert again["pairwise"]["judge"] == original["pairwise"]["judge"]
    assert original["single"]["bad"]["unparseable"] == 1


def test_grade_command_on_fastchat_files(tmp_path, capsys):
    """`corral judge grade` on FastChat's own prompt, question and answer files, writing FastChat's layout too."""
    from corral.config import JudgeGradeConfig
    from corral.recipes.judge import grade as grade_command

    for model in ("good", "bad"):
        write_fastchat_answers(tmp_path / "model_answer", model)
    questions = write_questions(tmp_path / "question.jsonl")
    server = FakeOpenAI(reply)
    try:
        cfg = JudgeGradeConfig(judge_api=server.url, judge_model="gpt-4", judge_key_env="NO_SUCH_KEY_VAR",
                               questions=str(questions), prompts=str(PROMPTS), output_dir=str(tmp_path / "judge"),
                               answers_dir=str(tmp_path / "model_answer"), mode="pairwise", limit=2,
                               fastchat_judgments=True)  # fmt: skip
        result = grade_command(cfg)
    finally:
        server.stop()
    printed = capsys.readouterr().out
    assert "fastchat prompts from" in printed and "2 of 4 questions, a stratified sample across 2 categories" in printed
    assert result.errors == [] and result.unparseable == 0
    pair = read_jsonl(tmp_path / "judge" / "model_judgment" / "gpt-4_pair.jsonl")
    assert pair and all(r["judge"][1].startswith("pair-") for r in pair)


def test_answer_command_writes_fastchat_answers(tmp_path):
    """Corral's answers in FastChat's model_answer layout, which Corral (and FastChat) read back."""
    from corral.config import JudgeAnswerConfig
    from corral.recipes.judge import answer as answer_command

    server = FakeOpenAI(lambda messages: f"reply to: {messages[-1]['content']}")
    try:
        answer_command(JudgeAnswerConfig(api=server.url, api_model="remote", api_key_env="NO_SUCH_KEY_VAR",
                                         questions=str(write_questions(tmp_path / "question.jsonl")),
                                         output_dir=str(tmp_path), fastchat_answers=True))  # fmt: skip
    finally:
        server.stop()
    rows = read_jsonl(tmp_path / "model_answer" / "remote.jsonl")
    assert len(rows) == len(QUESTIONS) and set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    back = load_answers(tmp_path / "model_answer", ["remote"])
    ours = load_answers(tmp_path / "answers", ["remote"])
    assert {q: r["turns"] for q, r in back["remote"].items()} == {q: r["turns"] for q, r in ours["remote"].items()}
    assert back["remote"][111]["turns"] == ["reply to: What is 6 x 7?", "reply to: And 6 x 8?"]
