"""scoring=expected (probability-weighted verdicts from the judge's top_logprobs) and constrained=true
(verdicts under a JSON schema), against the scripted OpenAI-compatible server over real HTTP: what
the requests carry, what each scripted reply is recorded as, and what the report shows."""

from __future__ import annotations

import json
import math
import re

import pytest

from corral.atomic import read_jsonl
from corral.eval import expected as weighing
from corral.eval.answer import load_answers
from corral.eval.client import BackendJudge, TokenLogprob
from corral.eval.constrained import parse_json_verdict, response_format, verdict_schema
from corral.eval.judge import build_tasks, grade, load_prompts
from corral.eval.question_set import Question
from corral.eval.report import build_report, write_report
from corral.generate.sampling import SamplingParams
from corral.recipes.judge import judge_client
from tests.fake_openai import FakeOpenAI, FakeReply

QUESTIONS = [Question(i, "generic", (f"Question {i}?",)) for i in range(1, 9)]


def write_answers(answers_dir, model: str) -> None:
    """Answer i of `model` is `model:i`: the scripted judge replies by it."""
    answers_dir.mkdir(parents=True, exist_ok=True)
    (answers_dir / f"{model}.jsonl").write_text("".join(
        json.dumps({"question_id": q.question_id, "model": model, "turns": [f"{model}:{q.question_id}"]}) + "\n"
        for q in QUESTIONS))  # fmt: skip


def judged(prompt: str) -> tuple[str, int]:
    """The (model, question) a single-answer prompt shows."""
    model, qid = re.findall(r"### Assistant\n(\w+):(\d+)", prompt)[-1]
    return model, int(qid)


RATING = ["The answer is fine.", " Rating", ":", " [[", "8", "]]"]
SINGLE_REPLIES = {  # question -> the judge's reply, for model `m`
    1: FakeReply.tokens(RATING, {4: [("8", 0.6), ("9", 0.3), ("7", 0.05), ("the", 0.05)]}),
    # `10` written as `1` + `0`: the next position splits p(1...) into 10 and 1
    2: FakeReply.tokens(["Great.", " [[", "1", "0", "]]"],
                        {2: [("1", 0.7), ("9", 0.2), ("8", 0.1)], 3: [("0", 0.8), ("]]", 0.2)]}),
    # a labelled last line; ` 6` and `6` are both 6; the written ` 7` (p 0.2) was sampled outside the top 3
    3: FakeReply.tokens(["Decent.", "\n", "Rating", ":", " 7"], {4: [(" 6", 0.5), ("6", 0.2), ("5", 0.1)]}, p=0.2),
    4: FakeReply("Good. Rating: [[6]]"),  # a server that sends no logprobs
    5: FakeReply.tokens(["I am not sure."]),  # unparseable
    6: FakeReply("Good. Rating: [[6]]", ["Good.", " Rating: [[", "6", "]]", " extra"]),  # tokens that are not the reply
    7: FakeReply.tokens(["Good. Rating: [[5", "]]"]),  # the verdict inside a token with other text
    8: FakeReply.tokens(["[[", "4", "]]"], {1: [("4", 0.5), ("10", 0.3), ("1", 0.2)]}),  # whole-number tokens
}


def single_reply(messages):
    return SINGLE_REPLIES[judged(messages[-1]["content"])[1]]


@pytest.fixture
def server():
    s = FakeOpenAI(single_reply)
    yield s
    s.stop()


def grade_single(server, tmp_path, **options):
    write_answers(tmp_path / "answers", "m")
    answers = load_answers(tmp_path / "answers", ["m"])
    tasks, _ = build_tasks("single", QUESTIONS, answers, ["m"], load_prompts(), "judge-x", **options)
    judge = judge_client(server.url, "judge-x", "NO_SUCH_KEY_VAR", retries=1, timeout=30)
    result = grade(tasks, judge, SamplingParams(max_new_tokens=64), tmp_path / "judgments" / "single.jsonl",
                   concurrency=4, progress=False)  # fmt: skip
    return tasks, result, {r["question_id"]: r for r in read_jsonl(tmp_path / "judgments" / "single.jsonl")}


def test_expected_scores_from_scripted_logprobs(server, tmp_path):
    tasks, result, records = grade_single(server, tmp_path, scoring="expected", top_logprobs=5)
    assert all(r["logprobs"] is True and r["top_logprobs"] == 5 for r in server.requests)
    assert "response_format" not in server.requests[0]

    r = records[1]  # (8 x 0.6 + 9 x 0.3 + 7 x 0.05) / 0.95: `the` is not a score
    assert (r["score"], r["parsed"]) == (8.0, True)
    assert r["expected_score"] == pytest.approx(7.85 / 0.95, abs=1e-9)
    assert r["expected_probs"] == pytest.approx({"7": 0.05 / 0.95, "8": 0.6 / 0.95, "9": 0.3 / 0.95})
    assert r["expected_mass"] == pytest.approx(0.95) and "expected_fallback" not in r

    r = records[2]  # p(10) = 0.7 x 0.8, p(1) = 0.7 x 0.2 (the number ends), p(9) = 0.2, p(8) = 0.1
    assert r["score"] == 10.0
    assert r["expected_probs"] == pytest.approx({"1": 0.14, "10": 0.56, "8": 0.1, "9": 0.2})
    assert r["expected_score"] == pytest.approx(0.14 + 5.6 + 0.8 + 1.8) and "expected_ambiguous_mass" not in r

    r = records[3]
    assert r["score"] == 7.0
    assert r["expected_probs"] == pytest.approx({"5": 0.1, "6": 0.7, "7": 0.2})
    assert r["expected_score"] == pytest.approx(0.5 + 4.2 + 1.4)

    assert records[8]["expected_probs"] == pytest.approx({"1": 0.2, "10": 0.3, "4": 0.5})  # `1` is a 1 here
    assert "expected_ambiguous_mass" not in records[8]

    # no expected value: the parsed verdict stays, and the record says why
    assert (records[4]["score"], records[4]["expected_fallback"]) == (6.0, weighing.NO_LOGPROBS)
    assert (records[5]["parsed"], records[5]["expected_fallback"]) == (False, weighing.UNPARSED)
    assert records[5]["parse_error"] == "no [[rating]] marker and no labelled verdict on the last line"
    assert (records[6]["score"], records[6]["expected_fallback"]) == (6.0, weighing.NOT_SPELLED)
    assert (records[7]["score"], records[7]["expected_fallback"]) == (5.0, weighing.SHARED_TOKEN)
    for qid in (4, 5, 6, 7):
        assert "expected_score" not in records[qid]

    assert (result.asked, result.parsed, result.expected) == (8, 7, 4)
    assert result.fallbacks == {weighing.NO_LOGPROBS: 1, weighing.UNPARSED: 1, weighing.NOT_SPELLED: 1,
                                weighing.SHARED_TOKEN: 1}  # fmt: skip
    assert "scoring=expected: 4 weighed, 4 kept the parsed verdict only" in result.summary()

    # the report shows both, the sampled mean over the same judgments beside the expected one
    report = build_report(tmp_path / "judgments", rounds=50)
    weighed = [records[q]["expected_score"] for q in (1, 2, 3, 8)]
    e = report["single"]["m"]["expected"]
    assert e["mean"] == pytest.approx(sum(weighed) / 4) and e["n"] == 4
    assert e["parsed_mean"] == pytest.approx((8 + 10 + 7 + 4) / 4)
    assert report["single"]["m"]["mean"] == pytest.approx((8 + 10 + 7 + 6 + 6 + 5 + 4) / 7)
    assert e["fallbacks"] == {weighing.NO_LOGPROBS: 1, weighing.NOT_SPELLED: 1, weighing.SHARED_TOKEN: 1,
                              weighing.UNPARSED: 1}  # fmt: skip
    markdown = write_report(tmp_path / "judgments", tmp_path, rounds=50)["markdown"].read_text()
    assert f"| m | {sum(weighed) / 4:.2f} | " in markdown and " | 7.25 | 4 | " in markdown
    assert sum(weighed) / 4 == pytest.approx((7.85 / 0.95 + 8.34 + 6.1 + 5.2) / 4)

    # asking for logprobs is another request: without it, the same prompts are asked anew
    before = len(server.requests)
    _, again, _ = grade_single(server, tmp_path)
    assert (again.asked, again.cached, len(server.requests) - before) == (8, 0, 8)
    assert all("logprobs" not in r for r in server.requests[before:])
    assert {t.key for t in tasks}.isdisjoint({r["key"] for r in read_jsonl(tmp_path / "judgments" / "single.jsonl")
                                              if "scoring" not in r})  # fmt: skip


def test_ambiguous_one_and_split_characters():
    """Directly on the tokens: a `1` that could begin `10` when the judge wrote another score, and a
    character split across tokens (its bytes, not its text, place the tokens)."""
    values = weighing.score_values(1, 10)
    reply = "Très bien [[7]]"
    tokens = [TokenLogprob("Tr", -0.1, b"Tr"), TokenLogprob("\ufffd", -0.1, b"\xc3"), TokenLogprob("\ufffds", -0.1, b"\xa8s"),
              TokenLogprob(" bien", -0.1, b" bien"), TokenLogprob(" [[", -0.1, b" [["),
              TokenLogprob("7", math.log(0.5), b"7", (("7", math.log(0.5)), ("1", math.log(0.4)), ("x", math.log(0.1)))),
              TokenLogprob("]]", -0.1, b"]]")]  # fmt: skip
    span = (reply.index("7"), reply.index("7") + 1)
    weighed, why = weighing.weigh(tokens, reply, span, values)
    assert why is None and weighed.position == 5
    assert weighed.probs == pytest.approx({1.0: 0.4 / 0.9, 7.0: 0.5 / 0.9}) and weighed.mass == pytest.approx(0.9)
    assert weighed.ambiguous_mass == pytest.approx(0.4)  # recorded: part of it may have been a 10
    # without bytes the text is taken, and the text does not spell the reply
    no_bytes = [TokenLogprob(t.token, t.logprob, None, t.top) for t in tokens]
    assert weighing.weigh(no_bytes, reply, span, values) == (None, weighing.NOT_SPELLED)
    assert weighing.weigh(tokens, reply, None, values) == (None, weighing.NO_POSITION)


# ---------------------------------------------------------------------------------------------
# Pairwise verdict probabilities


def test_expected_pairwise_verdict_probabilities(tmp_path):
    server = FakeOpenAI(lambda messages: FakeReply.tokens(["Both fine; the first is clearer. ", "[[", "A", "]]"],
                                                          {2: [("A", 0.7), ("B", 0.2), ("C", 0.1)]}))  # fmt: skip
    try:
        for model in ("x", "y"):
            write_answers(tmp_path / "answers", model)
        answers = load_answers(tmp_path / "answers", ["x", "y"])
        tasks, _ = build_tasks("pairwise", QUESTIONS[:2], answers, ["x", "y"], load_prompts(), "judge-x",
                               scoring="expected")  # fmt: skip
        judge = judge_client(server.url, "judge-x", "NO_SUCH_KEY_VAR", retries=1, timeout=30)
        grade(tasks, judge, SamplingParams(), tmp_path / "judgments" / "pairwise.jsonl", progress=False)
    finally:
        server.stop()
    records = read_jsonl(tmp_path / "judgments" / "pairwise.jsonl")
    assert len(records) == 4
    for r in records:
        assert r["verdict"] == "A" and r["expected_probs"] == pytest.approx({"A": 0.7, "B": 0.2, "tie": 0.1})
        assert (r["length_1"], r["length_2"]) == (len(f"{r['model_1']}:{r['question_id']}"),) * 2
    report = build_report(tmp_path / "judgments", rounds=20)
    # x first: p(x) = 0.7 + 0.1 / 2; y first: p(x) = 0.2 + 0.1 / 2; the mean over both orders is 1/2
    assert report["pairwise"]["expected"] == [{"model_a": "x", "model_b": "y", "judgments": 4,
                                               "win_rate_a": pytest.approx(0.5)}]  # fmt: skip
    # a judge that always says A: every pair flips, all biased toward the first position
    assert report["agreement"]["position"]["judge-x"] == {"pairs": 2, "unparseable_pairs": 0, "consistent": 0.0,
                                                          "biased_first": 1.0, "biased_second": 0.0, "other_flip": 0.0}


def test_expected_refuses_relative_and_bad_top_logprobs(tmp_path):
    write_answers(tmp_path / "answers", "x")
    write_answers(tmp_path / "answers", "y")
    answers = load_answers(tmp_path / "answers", ["x", "y"])
    with pytest.raises(ValueError, match="scoring=expected weighs one verdict per reply: use mode=single"):
        build_tasks("relative", QUESTIONS, answers, ["x", "y"], load_prompts(), "j", baseline="y", scoring="expected")
    with pytest.raises(ValueError, match="top_logprobs=21: expected 1 to 20"):
        build_tasks("single", QUESTIONS, answers, ["x"], load_prompts(), "j", scoring="expected", top_logprobs=21)
    with pytest.raises(ValueError, match="scoring='maybe'"):
        build_tasks("single", QUESTIONS, answers, ["x"], load_prompts(), "j", scoring="maybe")


# ---------------------------------------------------------------------------------------------
# Constrained verdicts


def test_verdict_schemas_and_json_parsing():
    single = verdict_schema("single")
    assert single == {"type": "object", "properties": {
        "reason": {"type": ["string", "null"], "description": "One or two sentences on why."},
        "score": {"type": "integer", "enum": list(range(1, 11))}},
        "required": ["reason", "score"], "additionalProperties": False}  # fmt: skip
    assert verdict_schema("pairwise")["properties"]["verdict"] == {"type": "string", "enum": ["A", "B", "C"]}
    assert response_format("pairwise")["json_schema"]["strict"] is True
    cases = [
        ('{"reason": "clear", "score": 8}', "single", 8.0, None),
        ('{"reason": null, "score": 10}', "single", 10.0, None),
        ('{"reason": "x", "score": 11}', "single", None, "field 'score': expected one of 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, got 11"),
        ('{"reason": "x", "score": 8.5}', "single", None, "field 'score': expected integer, got 8.5"),
        ('{"reason": "x", "score": "8"}', "single", None, 'field \'score\': expected integer, got "8"'),
        ('{"reason": "x", "score": true}', "single", None, "field 'score': expected integer, got true"),
        ('{"score": 8}', "single", None, "field 'reason': missing"),
        ('{"reason": "x", "score": 8, "note": 1}', "single", None,
         "field 'note': not in the schema (fields: reason, score)"),
        ('```json\n{"reason": "x", "score": 8}\n```', "single", None, "not JSON: Expecting value (character 0)"),
        ('[8]', "single", None, "expected a JSON object, got list"),
        ('{"reason": "x", "verdict": "C"}', "pairwise", "tie", None),
        ('{"reason": "x", "verdict": "a"}', "pairwise", None, 'field \'verdict\': expected one of "A", "B", "C", got "a"'),
        ('{"reason": 3, "verdict": "A"}', "pairwise", None, "field 'reason': expected string or null, got 3"),
        ('{"reason": "", "score_1": 3, "score_2": 9}', "relative", (3.0, 9.0), None),
    ]  # fmt: skip
    for reply, mode, value, error in cases:
        assert parse_json_verdict(reply, mode) == (value, error), reply


def test_constrained_requests_carry_the_schema_and_replies_parse(tmp_path):
    replies = {1: '{"reason": "Clear and right.", "score": 8}', 2: '{"reason": null, "score": 3}',
               3: '{"reason": "x", "score": 11}', 4: 'Rating: [[7]]',
               5: FakeReply('{"reason": "It goes on and on', finish_reason="length")}  # fmt: skip
    json_tokens = ['{"', "reason", '":', ' "', "Fine", '",', ' "', "score", '":', " ", "9", "}"]
    server = FakeOpenAI(lambda m: FakeReply.tokens(json_tokens, {10: [("9", 0.5), ("8", 0.5)]})
                        if judged(m[-1]["content"])[1] == 6 else replies.get(judged(m[-1]["content"])[1], "{}"))
    try:
        write_answers(tmp_path / "answers", "m")
        answers = load_answers(tmp_path / "answers", ["m"])
        questions = QUESTIONS[:6]
        tasks, _ = build_tasks("single", questions, answers, ["m"], load_prompts(), "judge-x", constrained=True,
                               scoring="expected")  # fmt: skip
        judge = judge_client(server.url, "judge-x", "NO_SUCH_KEY_VAR", retries=1, timeout=30)
        result = grade(tasks, judge, SamplingParams(), tmp_path / "judgments" / "single.jsonl", progress=False)
    finally:
        server.stop()
    for body in server.requests:
        assert body["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "judge_score", "schema": verdict_schema("single"), "strict": True}}  # fmt: skip
        assert body["messages"][-1]["content"].endswith('"score": <an integer from 1 to 10>}.')
    records = {r["question_id"]: r for r in read_jsonl(tmp_path / "judgments" / "single.jsonl")}
    assert all(r["constrained"] is True for r in records.values())
    assert [records[q]["score"] for q in range(1, 7)] == [8.0, 3.0, None, None, None, 9.0]
    assert records[3]["parse_error"] == "field 'score': expected one of 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, got 11"
    assert records[4]["parse_error"] == "not JSON: Expecting value (character 0)"  # the [[7]] form is not read
    assert records[5]["parse_error"] == ("not JSON: Unterminated string starting at (character 11) "
                                         "(the reply was cut at max_tokens)")  # fmt: skip
    assert records[6]["expected_score"] == pytest.approx(8.5)  # the score's token inside the JSON
    assert (result.parsed, result.unparseable, result.parse_rate) == (3, 3, 0.5)

    report = build_report(tmp_path / "judgments", rounds=20)
    [rates] = report["parse_rates"]
    assert (rates["mode"], rates["constrained"], rates["judgments"], rates["parsed"], rates["rate"]) == (
        "single", True, 6, 3, 0.5)
    assert rates["seconds_per_judgment"] > 0 and len(rates["reasons"]) == 3

    # constrained judgments are other requests than plain ones: another key for the same prompt
    plain, _ = build_tasks("single", questions, answers, ["m"], load_prompts(), "judge-x")
    assert {t.key for t in plain}.isdisjoint(t.key for t in tasks)


def test_a_backend_without_structured_outputs_refuses_constrained():
    class TextOnly:
        def complete(self, conversation, params):
            raise AssertionError("must not be asked")

    with pytest.raises(ValueError, match="TextOnly cannot constrain its replies"):
        BackendJudge(TextOnly()).ask([{"role": "user", "content": "hi"}], SamplingParams(),
                                     response_format=response_format("single"))  # fmt: skip


def test_grade_command_options(tmp_path, capsys):
    """`corral judge grade constrained=true scoring=expected`: the config keys reach the requests."""
    from corral.config import JudgeGradeConfig
    from corral.recipes.judge import grade as grade_command

    write_answers(tmp_path / "judge" / "answers", "m")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q.question_id, "category": q.category,
                                             "turns": list(q.turns)}) + "\n" for q in QUESTIONS[:2]))  # fmt: skip
    json_tokens = ['{"reason": "ok", "score": ', "6", "}"]
    server = FakeOpenAI(lambda m: FakeReply.tokens(json_tokens, {1: [("6", 0.75), ("4", 0.25)]}))
    try:
        result = grade_command(JudgeGradeConfig(judge_api=server.url, judge_model="j", judge_key_env="NO_SUCH_KEY_VAR",
                                                questions=str(questions), output_dir=str(tmp_path / "judge"),
                                                constrained=True, scoring="expected", top_logprobs=3))  # fmt: skip
    finally:
        server.stop()
    assert "verdicts constrained to a JSON schema, scoring=expected (top_logprobs=3)" in capsys.readouterr().out
    assert all(r["top_logprobs"] == 3 and r["response_format"]["type"] == "json_schema" for r in server.requests)
    assert (result.parsed, result.expected) == (2, 2)
    records = read_jsonl(tmp_path / "judge" / "judgments" / "single.jsonl")
    assert [r["expected_score"] for r in records] == pytest.approx([5.5, 5.5])


def test_constrained_pairwise_verdicts(tmp_path):
    verdicts = iter(['{"reason": null, "verdict": "C"}', '{"reason": "B is right.", "verdict": "B"}'])
    server = FakeOpenAI(lambda messages: next(verdicts))
    try:
        for model in ("x", "y"):
            write_answers(tmp_path / "answers", model)
        answers = load_answers(tmp_path / "answers", ["x", "y"])
        tasks, _ = build_tasks("pairwise", QUESTIONS[:1], answers, ["x", "y"], load_prompts(), "judge-x",
                               constrained=True)  # fmt: skip
        judge = judge_client(server.url, "judge-x", "NO_SUCH_KEY_VAR", retries=1, timeout=30)
        grade(tasks, judge, SamplingParams(), tmp_path / "j.jsonl", concurrency=1, progress=False)
    finally:
        server.stop()
    assert [r["response_format"]["json_schema"]["name"] for r in server.requests] == ["judge_verdict"] * 2
    assert server.requests[0]["response_format"]["json_schema"]["schema"] == verdict_schema("pairwise")
    records = read_jsonl(tmp_path / "j.jsonl")
    assert [(r["verdict"], r["winner"]) for r in records] == [("tie", "tie"), ("B", records[1]["model_2"])]
