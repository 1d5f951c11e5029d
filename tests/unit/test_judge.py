"""LLM-as-judge: question sets, answer generation, grading against a scripted OpenAI-compatible judge
over real HTTP, the position-swap rule, aggregation, Elo, the report, and interrupt-and-resume."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from corral.atomic import read_jsonl
from corral.data.formats import DataError
from corral.eval.answer import answer_file, generate_answers, load_answers
from corral.eval.judge import build_tasks, grade, load_prompts
from corral.eval.question_set import Question, read_questions
from corral.eval.report import bradley_terry, build_report, resolve_pairwise, write_report
from corral.generate.sampling import SamplingParams
from corral.recipes.judge import api_backend, judge_client
from tests.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Question sets and prompts


def test_builtin_question_set():
    questions = read_questions("builtin:corral_questions")
    assert len(questions) >= 80
    categories = {q.category for q in questions}
    assert {"generic", "knowledge", "roleplay", "common-sense", "fermi", "counterfactual", "coding", "math",
            "writing", "reasoning", "extraction", "stem", "humanities"} <= categories  # fmt: skip
    assert sum(len(q.turns) == 2 for q in questions) >= 20
    for q in questions:
        if q.category in ("math", "coding", "reasoning"):
            assert q.reference and len(q.reference) == len(q.turns), q.question_id


def test_fastchat_question_format_and_errors(tmp_path):
    good = tmp_path / "question.jsonl"
    good.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now another."]})
                    + "\n" + json.dumps({"question_id": 82, "category": "math", "turns": ["1+1?"], "reference": ["2"]})
                    + "\n")  # fmt: skip
    questions = read_questions(str(good))
    assert questions[0] == Question(81, "writing", ("Write a haiku.", "Now another."), None)
    assert questions[1].reference_for(0) == "2" and questions[1].reference_for(1) is None

    cases = [
        ({"question_id": 1, "category": "x", "turns": []}, "turns"),
        ({"question_id": 1, "category": "x", "turns": ["ok", 3]}, r"turns\[1\]"),
        ({"category": "x", "turns": ["ok"]}, "question_id"),
        ({"question_id": 1, "turns": ["a"], "reference": ["x", "y"]}, "reference"),
    ]
    for record, field in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"question_id": 0, "turns": ["fine"]}) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=rf"bad.jsonl:2: field '{field}"):
            read_questions(str(bad))
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"question_id": 5, "turns": ["a"]}) + "\n" + json.dumps({"question_id": 5, "turns": ["b"]}))
    with pytest.raises(DataError, match=r"dup.jsonl:2: field 'question_id': 5 already used at .*dup.jsonl:1"):
        read_questions(str(dup))


def test_prompts_file_is_validated(tmp_path):
    prompts = load_prompts()
    assert prompts.kind == "corral" and set(prompts.prompts) == {"single", "pairwise", "relative"}
    text = (ROOT / "corral" / "eval" / "prompts" / "judge_prompts.yaml").read_text()
    broken = tmp_path / "p.yaml"
    broken.write_text(text.replace("{conversation_b}\n    </assistant_b>", "{second}\n    </assistant_b>"))
    with pytest.raises(DataError, match=r"p.yaml: field 'pairwise.template': must contain \{conversation_b\}"):
        load_prompts(broken)


# ---------------------------------------------------------------------------------------------
# A scripted judge: answers mark their own quality with GOOD / BAD / GIBBERISH


QUESTIONS = [
    Question(1, "writing", ("Write a slogan.",)),
    Question(2, "math", ("What is 6 x 7?", "And 6 x 8?"), ("42", "48")),
    Question(3, "knowledge", ("Name a planet.",)),  # the judge is position-biased on this one
]


def _last_block(text: str, tag: str) -> str:
    return re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL).group(1).rsplit("### Assistant", 1)[-1]


def scripted_judge(messages: list[dict]) -> str:
    prompt = messages[-1]["content"]
    if "<conversation>" in prompt:  # single
        last = _last_block(prompt, "conversation")
        if "GIBBERISH" in last:
            return "I am not sure what to make of this."
        return "Solid. Rating: [[9]]" if "GOOD" in last else "Weak. Rating: 2/10"
    if "<assistant_a>" in prompt:  # pairwise
        if "Name a planet." in prompt:
            return "The first one reads better. [[A]]"
        return "[[B]]" if "BAD" in _last_block(prompt, "assistant_a") else "[[A]]"
    first, second = _last_block(prompt, "assistant_1"), _last_block(prompt, "assistant_2")  # relative
    return f"[[{3 if 'BAD' in first else 9}, {3 if 'BAD' in second else 9}]]"


def write_answers(answers_dir: Path, model: str, word: str, gibberish_on: int | None = None) -> None:
    answers_dir.mkdir(parents=True, exist_ok=True)
    with open(answer_file(answers_dir, model), "w") as f:
        for q in QUESTIONS:
            turns = [f"{'GIBBERISH' if q.question_id == gibberish_on else word} answer {i}" for i in range(len(q.turns))]
            f.write(json.dumps({"question_id": q.question_id, "model": model, "category": q.category,
                                "turns": turns}) + "\n")  # fmt: skip


@pytest.fixture
def judge_server():
    server = FakeOpenAI(scripted_judge)
    yield server
    server.stop()


def _grade(server, out: Path, mode: str, models: list[str], baseline=None, prompts=None, concurrency=4):
    answers = load_answers(out / "answers", models)
    tasks, missing = build_tasks(mode, QUESTIONS, answers, models, load_prompts(prompts), "judge-x",
                                 baseline=baseline)  # fmt: skip
    judge = judge_client(server.url, "judge-x", "NO_SUCH_KEY_VAR", retries=4, timeout=30)
    return tasks, grade(tasks, judge, SamplingParams(max_new_tokens=64), out / "judgments" / f"{mode}.jsonl",
                        concurrency=concurrency, progress=False)  # fmt: skip


def test_tasks_render_turns_and_references(tmp_path):
    write_answers(tmp_path / "answers", "good", "GOOD")
    write_answers(tmp_path / "answers", "bad", "BAD")
    answers = load_answers(tmp_path / "answers", ["good", "bad"])
    prompts = load_prompts()
    single, _ = build_tasks("single", QUESTIONS, answers, ["good", "bad"], prompts, "j")
    assert len(single) == 2 * 4  # 2 models x 4 question turns
    second_turn = next(t for t in single if t.record["question_id"] == 2 and t.record["turn"] == 2)
    text = second_turn.messages[-1]["content"]
    # turn 2 shows the whole conversation, the model's own first answer included, and turn 2's reference only
    assert "What is 6 x 7?" in text and "GOOD answer 0" in text and "GOOD answer 1" in text
    assert "<reference>\n48\n</reference>" in text and "\n42\n" not in text
    no_ref = next(t for t in single if t.record["question_id"] == 1)
    assert "<reference>" not in no_ref.messages[-1]["content"]
    pairwise, _ = build_tasks("pairwise", QUESTIONS, answers, ["good", "bad"], prompts, "j")
    assert len(pairwise) == 4 * 2  # 4 turns x both orders
    assert {(t.record["model_1"], t.record["model_2"]) for t in pairwise} == {("good", "bad"), ("bad", "good")}
    with pytest.raises(ValueError, match="baseline"):
        build_tasks("relative", QUESTIONS, answers, ["good", "bad"], prompts, "j")
    # an answer that is missing is counted, not asked
    del answers["bad"][3]
    tasks, missing = build_tasks("pairwise", QUESTIONS, answers, ["good", "bad"], prompts, "j")
    assert (len(tasks), missing) == (6, 2)


def test_grading_single_pairwise_relative_and_report(tmp_path, judge_server):
    write_answers(tmp_path / "answers", "good", "GOOD", gibberish_on=1)
    write_answers(tmp_path / "answers", "bad", "BAD")

    tasks, result = _grade(judge_server, tmp_path, "single", ["good", "bad"])
    assert (result.asked, result.parsed, result.unparseable, result.errors) == (8, 7, 1, [])
    records = read_jsonl(tmp_path / "judgments" / "single.jsonl")
    assert len(records) == 8 and {r["key"] for r in records} == {t.key for t in tasks}
    unparsed = [r for r in records if not r["parsed"]]
    assert unparsed[0]["judgment"] == "I am not sure what to make of this." and unparsed[0]["score"] is None

    # cache: nothing is asked twice
    before = len(judge_server.requests)
    _, again = _grade(judge_server, tmp_path, "single", ["good", "bad"])
    assert (again.asked, again.cached, len(judge_server.requests)) == (0, 8, before)

    _, result = _grade(judge_server, tmp_path, "pairwise", ["good", "bad"])
    assert (result.asked, result.unparseable) == (8, 0)
    _, result = _grade(judge_server, tmp_path, "relative", ["good", "bad"], baseline="bad")
    assert (result.asked, result.unparseable) == (8, 0)

    report = build_report(tmp_path / "judgments", baseline="bad", rounds=200)
    assert report["single"]["good"]["mean"] == 9.0 and report["single"]["good"]["n"] == 3
    assert report["single"]["good"]["unparseable"] == 1
    assert report["single"]["bad"]["mean"] == 2.0 and report["single"]["bad"]["categories"]["math"] == 2.0
    # every graded answer of a model got the same score, so every bootstrap mean is that score
    assert report["single"]["good"]["ci95"] == (9.0, 9.0) and report["single"]["bad"]["ci95"] == (2.0, 2.0)
    # relative: 9s against 3s in both orders
    assert report["relative"]["good"]["relative"] == pytest.approx(3.0)
    pairwise = report["pairwise"]
    # 4 turns judged in both orders; question 3's verdict flips with the order, so it is a tie
    assert pairwise["pairs"] == [{"model_a": "bad", "model_b": "good", "wins_a": 0, "wins_b": 3, "ties": 1}]
    assert pairwise["judge"]["position_consistency"] == pytest.approx(3 / 4)
    assert report["elo"]["good"]["elo"] > report["elo"]["bad"]["elo"] == pytest.approx(1000)  # anchored on baseline
    assert report["unparseable"] == {"single": 1, "pairwise": 0, "relative": 0}

    paths = write_report(tmp_path / "judgments", tmp_path, baseline="bad", rounds=100)
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2
    single = next(t for t in html_tables(page) if t[0][0] == "model" and t[0][1] == "mean")
    assert single[0] == ["model", "mean", "95% CI", "turn 1", "turn 2", "graded", "unparseable"]
    assert single[1][:2] == ["good", "9.00"] and single[2][:2] == ["bad", "2.00"]
    assert "| good | 9.00 |" in paths["markdown"].read_text()
    assert json.loads(paths["json"].read_text())["single"]["good"]["mean"] == 9.0

    # another prompts file means other judgments: asked anew, old ones kept
    custom = tmp_path / "prompts.yaml"
    custom.write_text((ROOT / "corral/eval/prompts/judge_prompts.yaml").read_text().replace("strict, fair", "careful"))
    _, result = _grade(judge_server, tmp_path, "single", ["good", "bad"], prompts=custom)
    assert (result.asked, result.cached) == (8, 0)


def html_tables(page: str) -> list[list[list[str]]]:
    """Every <table> of an HTML page as rows of cell texts (header row first)."""
    from html.parser import HTMLParser

    tables: list = []

    class Cells(HTMLParser):
        cell: list | None = None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                tables.append([])
            elif tag == "tr":
                tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = []

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                tables[-1][-1].append("".join(self.cell).strip())
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    Cells().feed(page)
    return tables


def test_report_page_is_markdown_rendered_self_contained(tmp_path):
    from corral.eval.report import markdown_page

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "sft.png").write_bytes(b"\x89PNG fake")
    markdown = ("# Report\n\nModel `m` said <script>alert(1)</script>\n\n"
                "| stage | minutes |\n|---|---:|\n| sft | 2.9 |\n| a \\| b | 1.0 |\n\n"
                "## Stage (sft/)\n\n![sft curves](figures/sft.png)\n\n- (score 0.50) Who? => I am <|im_end|>\n")
    page = markdown_page("Corral <test>", markdown, images_dir=tmp_path,
                         trailing_images=[("Extra", "extra", "QUJD")])
    assert page.startswith("<!doctype html>") and "<title>Corral &lt;test&gt;</title>" in page
    assert html_tables(page) == [[["stage", "minutes"], ["sft", "2.9"], ["a | b", "1.0"]]]
    assert "<h1>Report</h1>" in page and "<h2>Stage (sft/)</h2>" in page and "<code>m</code>" in page
    # raw HTML from model text is shown, never run
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<li>(score 0.50) Who? =&gt; I am &lt;|im_end|&gt;</li>" in page
    # the figure is inlined (the page opens anywhere), and nothing points at the file
    assert 'src="data:image/png;base64,iVBORyBmYWtl"' in page and "figures/sft.png" not in page
    assert page.count("data:image/png;base64,") == 2 and "<h2>Extra</h2>" in page


@pytest.mark.parametrize("status", [429, 503])
def test_judge_retries_with_backoff(tmp_path, status):
    server = FakeOpenAI(scripted_judge, fail_first=3, fail_status=status)
    try:
        write_answers(tmp_path / "answers", "good", "GOOD")
        _, result = _grade(server, tmp_path, "single", ["good"], concurrency=1)
    finally:
        server.stop()
    assert (result.asked, result.errors) == (4, [])
    assert len(server.requests) == 4 + 3


def test_failed_judgments_are_not_recorded(tmp_path):
    server = FakeOpenAI(scripted_judge, fail_first=100, fail_status=500)
    try:
        write_answers(tmp_path / "answers", "good", "GOOD")
        answers = load_answers(tmp_path / "answers", ["good"])
        tasks, _ = build_tasks("single", QUESTIONS, answers, ["good"], load_prompts(), "judge-x")
        judge = judge_client(server.url, "judge-x", "NO_SUCH_KEY_VAR", retries=1, timeout=30)
        result = grade(tasks, judge, SamplingParams(), tmp_path / "j.jsonl", progress=False)
    finally:
        server.stop()
    assert result.asked == 0 and len(result.errors) == 4 and "500" in result.errors[0]
    assert read_jsonl(tmp_path / "j.jsonl") == []


# ---------------------------------------------------------------------------------------------
# Aggregation by hand


def _verdict(qid, first, second, winner, parsed=True):
    return {"judge": "j", "question_id": qid, "turn": 1, "category": "c", "model_1": first, "model_2": second,
            "winner": winner, "parsed": parsed}  # fmt: skip


def test_position_swap_rule():
    records = [
        _verdict(1, "x", "y", "x"), _verdict(1, "y", "x", "x"),  # consistent: x wins
        _verdict(2, "x", "y", "x"), _verdict(2, "y", "x", "y"),  # flips with the order: tie
        _verdict(3, "x", "y", "tie"), _verdict(3, "y", "x", "y"),  # a tie in one order: tie
        _verdict(4, "x", "y", "tie"), _verdict(4, "y", "x", "tie"),  # tie both ways: consistent tie
        _verdict(5, "x", "y", None, parsed=False), _verdict(5, "y", "x", "y"),  # unparseable: left out
    ]  # fmt: skip
    games, stats = resolve_pairwise(records)
    assert {g["question_id"]: g["winner"] for g in games} == {1: "x", 2: "tie", 3: "tie", 4: "tie"}
    assert stats["position_consistency"] == pytest.approx(2 / 4)
    assert (stats["unresolved"], stats["unparseable"]) == (1, 1)


def test_bradley_terry_ratings():
    def games(a, b, wins_a, wins_b, ties=0):
        return ([{"model_a": a, "model_b": b, "winner": a}] * wins_a + [{"model_a": a, "model_b": b, "winner": b}] * wins_b
                + [{"model_a": a, "model_b": b, "winner": "tie"}] * ties)  # fmt: skip

    even = bradley_terry(games("x", "y", 5, 5, 2), ["x", "y"])
    assert even["x"] == pytest.approx(1000, abs=1e-6) and even["y"] == pytest.approx(1000, abs=1e-6)
    # 3:1 odds -> Elo gap 400 * log10(3) (the tiny L2 prior pulls it in a little)
    rated = bradley_terry(games("x", "y", 30, 10), ["x", "y"], l2=1e-6)
    assert rated["x"] - rated["y"] == pytest.approx(400 * np.log10(3), abs=0.5)
    # transitive ordering, and a model that won everything stays finite
    three = bradley_terry(games("a", "b", 8, 2) + games("b", "c", 8, 2) + games("a", "c", 10, 0), ["a", "b", "c"])
    assert three["a"] > three["b"] > three["c"] and np.isfinite(three["a"])


# ---------------------------------------------------------------------------------------------
# Answer generation


def test_api_answers_see_their_own_first_turn(tmp_path):
    server = FakeOpenAI(lambda messages: f"reply #{len(messages)} to: {messages[-1]['content']}")
    try:
        backends = {"remote/model": api_backend(server.url, "remote/model", "NO_SUCH_KEY_VAR", 2, 30)}
        stats = generate_answers(backends, QUESTIONS, tmp_path, SamplingParams(max_new_tokens=32), progress=False)
    finally:
        server.stop()
    assert stats["remote/model"]["new"] == 3
    path = answer_file(tmp_path, "remote/model")
    assert path.name == "remote__model.jsonl"
    answers = {r["question_id"]: r for r in read_jsonl(path)}
    assert answers[2]["turns"] == ["reply #1 to: What is 6 x 7?", "reply #3 to: And 6 x 8?"]
    second_request = next(r for r in server.requests if r["messages"][-1]["content"] == "And 6 x 8?")
    assert second_request["messages"][1] == {"role": "assistant", "content": "reply #1 to: What is 6 x 7?"}
    # MT-bench style temperatures per category
    temps = {r["messages"][0]["content"]: r["temperature"] for r in server.requests}
    assert temps["What is 6 x 7?"] == 0.0 and temps["Write a slogan."] == 0.7 and temps["Name a planet."] == 0.1


def test_local_answers_batched_through_the_engine(tiny_model_dir, tmp_path):
    from corral.chat.templates import get_template
    from corral.generate.chat import generate_replies
    from corral.generate.engine import TransformersEngine
    from corral.models.load import load_model, load_tokenizer
    from corral.serve.backends import LocalBackend
    from corral.chat.conversation import Conversation

    tokenizer = load_tokenizer(str(tiny_model_dir))
    fmt = get_template("auto", tokenizer)
    engine = TransformersEngine(load_model(str(tiny_model_dir)), tokenizer).start()
    out = tmp_path / "answers"
    params = SamplingParams(max_new_tokens=8)
    try:
        stats = generate_answers({"tiny": LocalBackend(engine, fmt)}, QUESTIONS, out, params, temperature=0.0,
                                 progress=False)  # fmt: skip
        expected = generate_replies(engine, fmt, [Conversation.from_pairs(("user", "Name a planet."))], params)
    finally:
        engine.close()
    assert stats["tiny"]["new"] == 3
    answers = {r["question_id"]: r for r in read_jsonl(answer_file(out, "tiny"))}
    assert answers[3]["turns"] == expected
    assert len(answers[2]["turns"]) == 2 and answers[2]["finish_reasons"][0] in ("stop", "length")


# ---------------------------------------------------------------------------------------------
# Interrupt and resume, through the CLI, killed hard


def _kill_when(proc, path: Path, lines: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and len(read_jsonl(path)) >= lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be interrupted:\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out")


def _kill_then_finish(args: list[str], path: Path, kill_at: int, server: FakeOpenAI) -> tuple[int, int, str]:
    """Run `corral ARGS`, SIGKILL it once `path` has `kill_at` records, run it again to the end.
    Returns (records before the re-run, requests the re-run made, its output)."""
    command = [sys.executable, "-m", "corral.cli", *args]
    _kill_when(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), path, kill_at)
    partial, asked_before = len(read_jsonl(path)), len(server.requests)
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return partial, len(server.requests) - asked_before, done.stdout


def test_answer_and_grade_resume_after_kill(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "generic", "turns": [f"Question {i}?"]})
                                 + "\n" for i in range(12)))  # fmt: skip
    answerer = FakeOpenAI(lambda m: f"GOOD answer to {m[-1]['content']}", delay=0.15)
    judge = FakeOpenAI(lambda m: "Rating: [[7]]", delay=0.15)
    out = tmp_path / "eval"
    common = ["--questions", str(questions), f"output_dir={out}", "concurrency=2"]
    try:
        answers = out / "answers" / "m.jsonl"
        partial, asked, printed = _kill_then_finish(["judge", "answer", *common, "--api", answerer.url,
                                                     "--api-model", "m"], answers, 4, answerer)  # fmt: skip
        assert f"{12 - partial} answered now, {partial} already in" in printed
        assert sorted(r["question_id"] for r in read_jsonl(answers)) == list(range(12))  # each exactly once
        assert asked == 12 - partial  # the finished ones were not asked again

        judgments = out / "judgments" / "single.jsonl"
        partial, asked, _ = _kill_then_finish(["judge", "grade", *common, "--judge-api", judge.url, "--judge-model", "j"],
                                              judgments, 3, judge)  # fmt: skip
        keys = [r["key"] for r in read_jsonl(judgments)]
        assert len(keys) == len(set(keys)) == 12
        assert asked == 12 - partial

        done = subprocess.run([sys.executable, "-m", "corral.cli", "judge", "report", f"output_dir={out}"],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "| m | 7.00 |" in done.stdout and (out / "report.html").is_file()
    finally:
        answerer.stop()
        judge.stop()


def test_cli_errors_are_clear(tmp_path):
    def corral(*args):
        return subprocess.run([sys.executable, "-m", "corral.cli", "judge", *args, f"output_dir={tmp_path}"],
                              capture_output=True, text=True)  # fmt: skip

    done = corral("grade")
    assert done.returncode == 1 and "judge_api" in done.stderr
    done = corral("grade", "judge_api=http://127.0.0.1:9/v1", "judge_model=j", "--model", "ghost")
    assert done.returncode == 1 and "no answers for model 'ghost'" in done.stderr
    done = corral("report")
    assert done.returncode == 1 and "no judgments" in done.stderr
    done = corral("answer", "questions=builtin:nope")
    assert done.returncode == 1 and "nothing built in is named 'nope' (known: corral_questions)" in done.stderr


def test_limit_is_a_stratified_sample():
    from corral.eval.question_set import describe_sample, stratified_sample

    questions = read_questions("builtin:corral_questions")  # sorted by category, 7 in each of 13
    first = stratified_sample(questions, 13, seed=0)
    assert len({q.category for q in first}) == 13  # the first 13 lines would be generic and knowledge only
    assert first == stratified_sample(questions, 13, seed=0) and first != stratified_sample(questions, 13, seed=1)
    assert [questions.index(q) for q in first] == sorted(questions.index(q) for q in first)  # file order kept
    counts = {}
    for q in stratified_sample(questions, 20, seed=3):
        counts[q.category] = counts.get(q.category, 0) + 1
    assert sum(counts.values()) == 20 and set(counts.values()) == {1, 2} and len(counts) == 13
    assert stratified_sample(questions, 0) == questions == stratified_sample(questions, 500)
    line = describe_sample(first, len(questions), 0)
    assert line.startswith("13 of 91 questions, a stratified sample across 13 categories (seed 0: coding 1,")


def test_report_shows_categories_without_a_parsed_judgment(tmp_path):
    rows = [{"mode": "single", "judge": "j", "question_id": i, "turn": 1, "model": m, "category": c,
             "score": s, "parsed": s is not None}
            for i, (m, c, s) in enumerate([("a", "writing", 8.0), ("a", "extraction", None), ("a", "extraction", None),
                                           ("b", "writing", 6.0), ("b", "extraction", 5.0)])]  # fmt: skip
    (tmp_path / "judgments").mkdir()
    (tmp_path / "judgments" / "single.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_report(tmp_path / "judgments", rounds=20)
    assert report["single"]["a"]["categories"] == {"extraction": None, "writing": 8.0}
    assert report["single"]["a"]["category_unparseable"] == {"extraction": 2}
    paths = write_report(tmp_path / "judgments", tmp_path, rounds=20)
    assert "| extraction | no parsed judgment (2 unparseable) | 5.00 |" in paths["markdown"].read_text()
    table = next(t for t in html_tables(paths["html"].read_text()) if t[0][0] == "category")
    assert ["extraction", "no parsed judgment (2 unparseable)", "5.00"] in table
