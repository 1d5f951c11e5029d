"""`corral distill` with a scripted fake endpoint (real HTTP) as teacher, referee and generator: ROUGE-L and the
filters by hand, the both-orders average and the hard/easy rule, unparseable referee replies retried then
excluded and counted, the pool update, the budget stop and its resume, the files written, and nothing asked
twice. The whole loop runs on the tiny random model as the student."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from corral.atomic import read_jsonl
from corral.config import ConfigError, DistillConfig, load_config
from corral.data.formats import DataError
from corral.distill.calls import Budget, make_role
from corral.distill.filters import (CUT, DUPLICATE, EMPTY, MENTIONS_INSTRUCTION, NON_ASCII, PUNCTUATION, REPETITION,
                                    SIMILAR_CACHE, SIMILAR_NEW, TOO_SHORT, CandidateFilter, lcs_length, rejection,
                                    rouge_l, rouge_tokens)
from corral.distill.pools import Instruction, instruction_id, next_pools, read_seed_pool, sample
from corral.distill.prompts import load_prompts
from corral.distill.stages import (answer_with_student, answer_with_teacher, discriminate, generate_candidates,
                                   generation_requests, is_hard, referee_attempts, referee_jobs, score_with_referee,
                                   select_new, side_scores, student_answers, teacher_answers)
from corral.generate.sampling import SamplingParams
from tests.fake_openai import FakeOpenAI

# ---------------------------------------------------------------------------------------------
# ROUGE-L and the filters, by hand


def test_rouge_l_equals_hand_computed_values():
    assert rouge_tokens("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook pair
    # LCS 5 ("the cat on the mat"): P = 5/5, R = 5/6, F = 2PR / (P + R) = 10/11
    assert rouge_l(rouge_tokens("the cat sat on the mat"), rouge_tokens("the cat on the mat")) == pytest.approx(10 / 11)
    # word order matters: LCS 2 of 4 words each side -> 0.5
    assert rouge_l(rouge_tokens("police killed the gunman"), rouge_tokens("the gunman police killed")) == 0.5
    assert rouge_l(rouge_tokens("a b c d"), rouge_tokens("d c b a")) == 0.25
    assert rouge_l(rouge_tokens("a b"), rouge_tokens("c d")) == 0.0
    assert rouge_l([], rouge_tokens("anything")) == 0.0
    # symmetric
    a, b = rouge_tokens("Describe the color red in great detail."), rouge_tokens("Describe the color red in detail.")
    assert rouge_l(a, b) == rouge_l(b, a) == pytest.approx(12 / 13)


@pytest.mark.parametrize("text, finish, reason", [
    ("", "stop", EMPTY),
    ("Write a long poem about the sea", "length", CUT),
    ("New Instruction: write a long poem about the sea", "stop", MENTIONS_INSTRUCTION),
    ("Write a poem", "stop", TOO_SHORT),
    ("Write a poem now", "stop", None),
    ("- Write a poem about the sea", "stop", PUNCTUATION),
    ("\"Write a poem about the sea\"", "stop", PUNCTUATION),
    ("Écris un poème sur la mer", "stop", NON_ASCII),
    ("the cat the cat the cat the cat", "stop", REPETITION),  # 2 distinct trigrams of 6
    ("one two three one two three", "stop", None),  # 3 distinct of 4: not degenerate
    ("Name three rivers in Africa and say where each one reaches the sea", "stop", None),
])  # fmt: skip
def test_each_filter_drops_for_its_reason(text, finish, reason):
    assert rejection(text, finish, 0.5) == reason


def test_candidates_are_deduplicated_against_the_cache_pool_and_each_other():
    decide = CandidateFilter(["Describe the color red in detail."], threshold=0.7, min_distinct_trigrams=0.5)
    assert decide.decide("Describe the color red in detail.", "stop").reason == DUPLICATE
    near = decide.decide("Describe the color red in great detail.", "stop")
    assert (near.reason, near.similarity) == (SIMILAR_CACHE, round(12 / 13, 4))
    assert near.similar_to == "Describe the color red in detail."
    assert decide.decide("Explain how volcanoes form and erupt", "stop").kept
    # 6 of 8 and 6 words in common order: F = 6/7 > 0.7, against the one kept just before
    again = decide.decide("Explain how volcanoes form and why they erupt", "stop")
    assert (again.reason, again.similar_to) == (SIMILAR_NEW, "Explain how volcanoes form and erupt")
    assert decide.decide("Explain how volcanoes form and erupt", "stop").reason == DUPLICATE
    # above the threshold drops, at it keeps: F = 0.5 exactly
    assert CandidateFilter(["police killed the gunman"], 0.5, 0).decide("the gunman police killed", "stop").kept
    dropped = CandidateFilter(["police killed the gunman"], 0.49, 0).decide("the gunman police killed", "stop")
    assert dropped.reason == SIMILAR_CACHE


# ---------------------------------------------------------------------------------------------
# Pools


def test_pool_update_sampling_and_seed_pool(tmp_path):
    def make(name):
        return Instruction(instruction_id(name), name)

    old, new = [make("a"), make("b"), make("c")], [make("d"), make("b"), make("e")]
    train, cache = next_pools(old, new)
    assert train == new  # the next train pool is the new instructions
    assert [i.prompt for i in cache] == ["a", "b", "c", "d", "e"]  # the cache grows, b not twice
    assert [i.prompt for i in next_pools(old, new, cache_max=3)[1]] == ["c", "d", "e"]  # the oldest leave first
    pool = [make(str(n)) for n in range(10)]
    assert sample(pool, 4, "s") == sample(pool, 4, "s") != sample(pool, 4, "t")
    picked = sample(pool, 4, "s")
    assert len(picked) == 4 and picked == [p for p in pool if p in picked]  # pool order kept
    assert sample(pool, 0, "s") == pool and sample(pool, 99, "s") == pool

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Translate to French.", "input": "Good morning."},
        {"instruction": "Sort the numbers.", "instances": [{"input": "3, 1, 2", "output": "1, 2, 3"},
                                                           {"input": "9, 7", "output": "7, 9"}]},
        {"messages": [{"role": "user", "content": "Name a planet."}, {"role": "assistant", "content": "Mars"},
                      {"role": "user", "content": "Another?"}]},
        {"conversations": [{"from": "human", "value": "Name a planet."}]},  # the same instruction again
    ]) + "\n")  # fmt: skip
    instructions, report = read_seed_pool(str(seeds))
    assert [i.prompt for i in instructions] == ["Translate to French.\n\nGood morning.", "Sort the numbers.\n\n3, 1, 2",
                                                "Sort the numbers.\n\n9, 7", "Name a planet."]  # fmt: skip
    assert (report.duplicates, report.multi_turn) == (1, 1)
    assert instructions[0].source == f"{seeds}:1" and instructions[0].id == instruction_id(instructions[0].prompt)
    assert len(read_seed_pool("builtin:distill_seeds")[0]) == 64

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": 5}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'instruction': expected a string"):
        read_seed_pool(str(bad))
    kept, report = read_seed_pool(str(bad), skip_invalid=True)
    assert len(kept) == 1 and "skipped 1" in report.summary()


# ---------------------------------------------------------------------------------------------
# A fake endpoint playing the three roles, told apart by their prompts


def referee_reply(user: str) -> str:
    """Order-dependent scores, so a wrong pairing of the two orders gives other numbers:
    teacher first [[9, 4]], student first [[5, 7]] -> teacher (9 + 7) / 2 = 8, student (4 + 5) / 2 = 4.5."""
    first = user.split("<answer_1>")[1].split("</answer_1>")[0]
    teacher_first = "TEACHER" in first
    if "EQUAL" in user:  # gap exactly 1: hard
        return "Close. [[7, 6]]" if teacher_first else "Close. [[6, 7]]"
    if "EASY" in user:  # teacher (7 + 7) / 2 = 7, student (6 + 7) / 2 = 6.5: gap 0.5, easy
        return "Fine. [[7, 6]]" if teacher_first else "Fine. [[7, 7]]"
    if "NEVER" in user:
        return "Both answers are fine, I would say 8 and 6."  # no verdict in the asked form
    return "Teacher is better. [[9, 4]]" if teacher_first else "Teacher is better. [[5, 7]]"


class Endpoint:
    """Teacher, referee and generator in one scripted server; `once_unparseable` marks referee prompts whose
    first reply does not parse."""

    def __init__(self, generated=None, delay: float = 0.0):
        self.generated = list(generated or [])
        self.lock = threading.Lock()
        self.seen = Counter()
        self.server = FakeOpenAI(self.reply, delay=delay)
        self.url = self.server.url

    def reply(self, messages):
        user = messages[-1]["content"]
        if "<answer_1>" in user:
            with self.lock:
                self.seen[user] += 1
                first_time = self.seen[user] == 1
            if "ONCE" in user and first_time:
                return "I cannot decide."
            if "JSON object" in user:
                return json.dumps({"reason": None, "score_1": 9, "score_2": 4} if "TEACHER" in user.split(
                    "<answer_1>")[1].split("</answer_1>")[0] else {"reason": "x", "score_1": 5, "score_2": 7})
            return referee_reply(user)
        if "new instruction" in user:
            with self.lock:
                return self.generated.pop(0) if self.generated else "Describe a sunny day at the beach with friends"
        return "TEACHER answer to: " + user

    def requests(self, role: str) -> list[dict]:
        def is_role(body):
            user = body["messages"][-1]["content"]
            return {"referee": "<answer_1>" in user, "generator": "new instruction" in user}.get(
                role, "<answer_1>" not in user and "new instruction" not in user)

        return [b for b in self.server.requests if is_role(b)]

    def stop(self):
        self.server.stop()


@pytest.fixture
def endpoint():
    server = Endpoint()
    yield server
    server.stop()


def make(prompt: str) -> Instruction:
    return Instruction(instruction_id(prompt), prompt)


def test_lion_average_over_both_orders_and_the_hard_rule():
    assert side_scores((9, 4), (5, 7)) == (8.0, 4.5)  # teacher = (s12[0] + s21[1]) / 2, student = (s12[1] + s21[0]) / 2
    assert is_hard(7.0, 6.0, 1.0) and not is_hard(7.0, 6.5, 1.0) and not is_hard(6.0, 7.0, 1.0)
    assert is_hard(7.0, 6.5, 0.5) and is_hard(5.0, 5.0, 0.0)


def test_referee_both_orders_retries_unparseable_then_excludes_them(tmp_path, endpoint):
    pool = [make("Hard one: explain tides."), make("EASY: name a color."), make("EQUAL: count to three."),
            make("ONCE: say hello."), make("NEVER: pick a number.")]
    teacher = {i.id: {"answer": f"TEACHER answer to {i.prompt}"} for i in pool}
    student = {i.id: {"answer": f"student answer to {i.prompt}"} for i in pool}
    prompts = load_prompts()
    role = make_role("referee", endpoint.url, "ref", "NO_KEY", retries=0, timeout=30, concurrency=4)
    jobs = referee_jobs(pool, teacher, student, prompts, "ref", constrained=False)
    assert [j.order for j in jobs] == ["teacher_first", "student_first"] * 5
    first = jobs[0].messages[-1]["content"]
    assert first.index("TEACHER answer to Hard one") < first.index("student answer to Hard one")
    path, budget = tmp_path / "referee.jsonl", Budget()
    result = score_with_referee(jobs, role, SamplingParams(temperature=0.2, seed=10), 3, path, budget, iteration=1)
    assert (result.done, result.errors, result.stopped) == (10, [], 0)
    # 2 calls each for three instructions, ONCE: 2 + 1 retry, NEVER: 3 attempts in each order
    assert len(endpoint.requests("referee")) == budget.calls == 6 + 4 + 6
    attempts = referee_attempts(path)
    never = [a for j in jobs if "NEVER" in j.instruction.prompt for a in attempts[j.key]]
    assert [a["attempt"] for a in never] == [0, 1, 2, 0, 1, 2] and not any(a["parsed"] for a in never)
    assert {a["seed"] for a in never} == {10, 11, 12}  # a retry asks with the next seed
    assert all(a["parse_error"].startswith("no [[rating_a,rating_b]] marker") for a in never)
    sent_seeds = sorted(b["seed"] for b in endpoint.requests("referee") if "NEVER" in b["messages"][-1]["content"])
    assert sent_seeds == [10, 10, 11, 11, 12, 12]

    found = discriminate(jobs, attempts, teacher, student, threshold=1.0)
    rows = {r["prompt"].split(":")[0]: r for r in found["rows"]}
    assert (rows["Hard one"]["teacher_score"], rows["Hard one"]["student_score"]) == (8.0, 4.5)
    assert rows["Hard one"]["label"] == "hard" and rows["ONCE"]["label"] == "hard"
    assert rows["ONCE"]["attempts"] == {"teacher_first": 2, "student_first": 2}
    assert (rows["EQUAL"]["gap"], rows["EQUAL"]["label"]) == (1.0, "hard")
    assert (rows["EASY"]["gap"], rows["EASY"]["label"]) == (0.5, "easy")
    assert rows["NEVER"]["label"] == "unparseable" and "teacher_score" not in rows["NEVER"]
    assert (found["hard"], found["easy"], found["unparseable"], found["scored"]) == (3, 1, 1, 4)
    assert found["unparseable_by_order"] == {"teacher_first+student_first": 1}
    assert found["teacher_score"] == pytest.approx((8 + 7 + 7 + 8) / 4)  # the excluded one is not in the mean

    # Run again: everything finished, nothing is asked.
    asked = len(endpoint.server.requests)
    again = score_with_referee(jobs, role, SamplingParams(temperature=0.2, seed=10), 3, path, Budget(), iteration=1)
    assert again.done == 0 and len(endpoint.server.requests) == asked


def test_failed_referee_calls_are_not_recorded_and_only_they_are_asked_again(tmp_path, endpoint):
    pool = [make(f"Hard one number {n}.") for n in range(3)]
    teacher = {i.id: {"answer": "TEACHER answer"} for i in pool}
    student = {i.id: {"answer": "student answer"} for i in pool}
    jobs = referee_jobs(pool, teacher, student, load_prompts(), "ref", constrained=False)
    path = tmp_path / "referee.jsonl"
    down = FakeOpenAI(lambda m: "unused", fail_first=1000, fail_status=500)  # the endpoint is down ...
    try:
        role = make_role("referee", down.url, "ref", "NO_KEY", retries=1, timeout=30, concurrency=2)
        failed = score_with_referee(jobs, role, SamplingParams(seed=0), 3, path, Budget(), iteration=1)
    finally:
        down.stop()
    assert len(failed.errors) == 6 and "500" in failed.errors[0] and read_jsonl(path) == []
    assert len(down.requests) == 6 * 2  # each call tried twice (retries=1), none recorded
    role = make_role("referee", endpoint.url, "ref", "NO_KEY", retries=0, timeout=30, concurrency=2)  # ... and up
    two = [job for job in jobs if job.instruction.id != pool[0].id]
    part = score_with_referee(two, role, SamplingParams(seed=0), 3, path, Budget(), iteration=1)
    assert (part.done, len(read_jsonl(path))) == (4, 4)
    rest = score_with_referee(jobs, role, SamplingParams(seed=0), 3, path, Budget(), iteration=1)
    assert (rest.done, rest.errors, len(read_jsonl(path))) == (2, [], 6)
    sent = [b["messages"][-1]["content"] for b in endpoint.requests("referee")]
    assert len(sent) == len(set(sent)) == 6  # each asked once: what was recorded was not asked again


def test_constrained_referee_sends_the_schema_and_reads_json(tmp_path, endpoint):
    pool = [make("Explain tides.")]
    teacher, student = {pool[0].id: {"answer": "TEACHER says"}}, {pool[0].id: {"answer": "student says"}}
    role = make_role("referee", endpoint.url, "ref", "NO_KEY", retries=0, timeout=30, concurrency=1)
    jobs = referee_jobs(pool, teacher, student, load_prompts(), "ref", constrained=True)
    path = tmp_path / "referee.jsonl"
    score_with_referee(jobs, role, SamplingParams(seed=0), 1, path, Budget(), iteration=1)
    sent = endpoint.requests("referee")
    assert all(b["response_format"]["type"] == "json_schema" for b in sent)
    assert len(sent) == 2 and all(b["response_format"]["json_schema"]["schema"]["required"] == ["reason", "score_1",
                                                                                                "score_2"] for b in sent)
    assert all("JSON object" in b["messages"][-1]["content"] for b in sent)  # told to write JSON, not [[7, 5]]
    found = discriminate(jobs, referee_attempts(path), teacher, student, 1.0)
    assert (found["rows"][0]["teacher_score"], found["rows"][0]["student_score"]) == (8.0, 4.5)


def test_teacher_is_sent_the_full_instruction_once(tmp_path, endpoint):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Translate to French.", "input": "Good morning."}) + "\n"
                     + json.dumps({"instruction": "Name a planet.", "input": ""}) + "\n")
    pool = read_seed_pool(str(seeds))[0]
    role = make_role("teacher", endpoint.url, "teach", "NO_KEY", retries=0, timeout=30, concurrency=2)
    path = tmp_path / "teacher_answers.jsonl"
    result, cached = answer_with_teacher(pool + pool, role, SamplingParams(seed=0), "Be brief.", path, Budget(), 1, "train")
    assert (result.done, cached) == (2, 2)  # the repeated instructions were asked once
    sent = {b["messages"][-1]["content"] for b in endpoint.requests("teacher")}
    assert sent == {"Translate to French.\n\nGood morning.", "Name a planet."}
    assert all(b["messages"][0] == {"role": "system", "content": "Be brief."} for b in endpoint.requests("teacher"))
    records = read_jsonl(path)
    assert {r["messages"][-1]["content"] for r in records} == sent  # the file keeps the prompt as sent
    assert all(r["usage"] == {"prompt_tokens": 1, "completion_tokens": 1} for r in records)
    answered, cached = answer_with_teacher(pool, role, SamplingParams(seed=0), "Be brief.", path, Budget(), 2, "cache")
    assert (answered.done, cached, len(endpoint.server.requests)) == (0, 2, 2)
    found = teacher_answers(path, "teach", "Be brief.", pool)
    assert found[pool[0].id]["answer"] == "TEACHER answer to: Translate to French.\n\nGood morning."


def test_student_answers_are_kept_batch_by_batch_and_resumed(tmp_path):
    pool = [make(f"Question {n}?") for n in range(5)]
    calls = []

    def generate(prompts):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise RuntimeError("killed in the second batch")
        return [f"answer to {p}" for p in prompts]

    path = tmp_path / "student_answers.jsonl"
    with pytest.raises(RuntimeError):
        answer_with_student(pool, generate, path, batch=2)
    assert len(read_jsonl(path)) == 2
    assert answer_with_student(pool, generate, path, batch=2) == 3
    assert calls[2:] == [["Question 2?", "Question 3?"], ["Question 4?"]]  # only what was missing
    assert {r["answer"] for r in student_answers(path).values()} == {f"answer to Question {n}?" for n in range(5)}


def test_generation_requests_are_seeded_and_candidates_filtered_in_order(tmp_path):
    hard = [make(f"Hard seed instruction number {n} about tides") for n in range(4)]
    assert generation_requests("hard", hard, 3, 0, 7, 1) == generation_requests("hard", hard, 3, 0, 7, 1)
    assert [r.key for r in generation_requests("easy", hard, 2, 1, 7, 1)] == ["1:easy:0", "1:easy:1"]
    assert generation_requests("hard", [], 3, 0, 7, 1) == []
    server = Endpoint(generated=["Describe how glaciers carve valleys over time", "Instruction: do something else",
                                 "Describe how glaciers carve the valleys over time", "short one"])
    try:
        role = make_role("generator", server.url, "gen", "NO_KEY", retries=0, timeout=30, concurrency=1)
        requests = generation_requests("hard", hard, 4, 0, 7, 1)
        path = tmp_path / "candidates.jsonl"
        result = generate_candidates(requests, role, load_prompts(), SamplingParams(temperature=1.0, seed=3), 0, path,
                                     Budget(), 1)  # fmt: skip
        assert result.done == 4
        sent = server.requests("generator")
        assert all(b["max_tokens"] == max(16, 4 * 7) for b in sent)  # Lion's length rule: 4 per word of the seed
        assert len({b["seed"] for b in sent}) == 4  # every request its own seed
        again = generate_candidates(requests, role, load_prompts(), SamplingParams(seed=3), 0, path, Budget(), 1)
        assert again.done == 0 and len(server.server.requests) == 4
    finally:
        server.stop()
    selection = select_new(read_jsonl(path), hard, 0.7, 0.5, iteration=1)
    assert [i.prompt for i in selection.kept] == ["Describe how glaciers carve valleys over time"]
    assert [d["reason"] for d in selection.dropped] == [MENTIONS_INSTRUCTION, SIMILAR_NEW, TOO_SHORT]
    kept = selection.kept[0]
    assert (kept.origin, kept.iteration) == ("hard", 1) and kept.source in {h.id for h in hard}


def test_budget_counts_in_flight_calls():
    budget = Budget(max_calls=2)
    assert budget.reserve() and budget.reserve() and not budget.reserve()  # two in flight: the cap is reached
    budget.cancel()
    assert budget.reserve()
    budget.settle({"prompt_tokens": 3, "completion_tokens": 4})
    assert (budget.calls, budget.tokens) == (1, 7)
    tokens = Budget(max_tokens=7, tokens=7)
    assert not tokens.reserve() and "max_teacher_tokens=7" in tokens.exhausted()


# ---------------------------------------------------------------------------------------------
# Prompts and config


def test_prompts_file_is_validated(tmp_path):
    import yaml

    from corral.distill.prompts import DEFAULT_PROMPTS

    good = yaml.safe_load(DEFAULT_PROMPTS.read_text())
    path = tmp_path / "p.yaml"
    broken = {**good, "referee": {**good["referee"], "template": "Score {instruction} and {answer_1}."}}
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(DataError, match=r"p.yaml: field 'referee.template': must contain \{answer_2\}"):
        load_prompts(path)
    path.write_text(yaml.safe_dump({k: v for k, v in good.items() if k != "generate_easy"}))
    with pytest.raises(DataError, match="field 'generate_easy': missing"):
        load_prompts(path)
    path.write_text(yaml.safe_dump({**good, "generate_medium": good["generate_easy"]}))
    with pytest.raises(DataError, match="field 'generate_medium': unknown"):
        load_prompts(path)


def test_config_errors_name_the_key_and_shipped_config_is_valid(capsys):
    from corral.cli import COMMANDS, main, resolve_config_path

    assert "distill" in COMMANDS
    with pytest.raises(ConfigError, match="teacher: required"):
        load_config(DistillConfig, None, {})
    with pytest.raises(ConfigError, match="referee.parse_retries: Input should be greater than or equal to 0"):
        load_config(DistillConfig, None, {"teacher.api": "u", "teacher.model": "m", "referee.parse_retries": -1})
    assert main(["distill", "teacher.api=u", "teacher.model=m", "generator.new_hardest=3"]) == 2
    assert "generator.new_hardest: unknown key" in capsys.readouterr().err
    cfg = load_config(DistillConfig, resolve_config_path("distill.yaml"))
    assert cfg.model == "smollm2-135m" and cfg.teacher.api.startswith("http://127.0.0.1")
    assert main(["distill", "--help"]) == 0
    shown = capsys.readouterr().out
    for key in ("teacher.api", "referee.constrained", "generator.similarity", "threshold", "max_teacher_calls",
                "max_teacher_tokens", "data.train_size", "train.lr", "lora.r", "iterations", "output_dir"):
        assert f"  {key} = " in shown, key


# ---------------------------------------------------------------------------------------------
# The whole loop on the tiny model


def distill_config(tmp_path, model_dir, url, **overrides) -> DistillConfig:
    seeds = tmp_path / "seeds.jsonl"
    if not seeds.exists():
        seeds.write_text("".join(json.dumps({"instruction": text, "input": ""}) + "\n" for text in [
            "Explain why tides happen.", "EASY: name a color you like.", "EQUAL: count from one to three.",
            "NEVER: pick a number between one and ten."]))  # fmt: skip
    tree = {"model": str(model_dir), "output_dir": str(tmp_path / "run"), "iterations": 2, "data.path": str(seeds),
            "teacher.api": url, "teacher.model": "teach", "teacher.retries": 0, "referee.parse_retries": 1,
            "max_tokens": 6, "generator.new_hard": 2, "generator.new_easy": 1, "generator.max_rounds": 2,
            "train.max_steps": 1, "train.batch_size": 2, "train.max_len": 128, "lora.r": 4, "lora.alpha": 8,
            "student.max_batch": 4}  # fmt: skip
    return load_config(DistillConfig, None, {**tree, **overrides})


GENERATED = ["Explain why the moon changes its shape every night", "Instruction: explain the moon",
             "Describe the warmest color in a sunset sky", "Explain why rivers flow toward the sea",
             "Describe what makes a rainbow appear after rain", "Explain how a ship floats on water"]


def test_two_iterations_write_every_file_update_the_pools_and_ask_nothing_twice(tmp_path, tiny_model_dir):
    from corral.recipes.distill import run

    server = Endpoint(generated=GENERATED)
    try:
        cfg = distill_config(tmp_path, tiny_model_dir, server.url)
        result = run(cfg)
        out = tmp_path / "run"
        it1, it2 = out / "iter-01", out / "iter-02"
        for it in (it1, it2):
            for name in ("train_pool.jsonl", "cache_pool.jsonl", "imitation_data.jsonl", "imitation.json", "student",
                         "student_answers.jsonl", "referee.jsonl", "discrimination.json", "candidates.jsonl",
                         "generated.json", "iteration.json"):  # fmt: skip
                assert (it / name).exists(), it / name
        for name in ("config.yaml", "teacher_answers.jsonl", "report.json", "report.md", "report.html", "figures/distill.png"):
            assert (out / name).is_file(), name

        d1 = json.loads((it1 / "discrimination.json").read_text())
        assert (d1["hard"], d1["easy"], d1["unparseable"]) == (2, 1, 1)  # tides + EQUAL hard, EASY easy, NEVER out
        g1 = json.loads((it1 / "generated.json").read_text())
        # round 1: 2 hard + 1 easy requests -> the 2nd ("Instruction: ...") dropped; round 2: 1 more hard
        assert g1["counts"]["requests"] == 4 and g1["counts"]["dropped"] == {MENTIONS_INSTRUCTION: 1}
        assert (g1["counts"]["kept_hard"], g1["counts"]["kept_easy"]) == (2, 1)
        # the pools: the next train pool is exactly the new instructions; the cache pool grew by them
        cache1 = [json.loads(line)["id"] for line in (it1 / "cache_pool.jsonl").read_text().splitlines()]
        train2 = [json.loads(line)["id"] for line in (it2 / "train_pool.jsonl").read_text().splitlines()]
        cache2 = [json.loads(line)["id"] for line in (it2 / "cache_pool.jsonl").read_text().splitlines()]
        assert train2 == [i["id"] for i in g1["kept"]] and cache2 == cache1 + train2 and len(cache2) == 7
        # iteration 2 trains from iteration 1's merged weights
        assert json.loads((it2 / "imitation.json").read_text())["start"] == str(it1 / "student")

        report = json.loads((out / "report.json").read_text())
        first = report["iterations"][0]
        for key in ("train_pool", "cache_pool", "hard", "easy", "generated", "teacher_score", "student_score",
                    "teacher_calls", "teacher_tokens"):
            assert key in first, key
        assert (first["train_pool"], first["cache_pool"], first["hard"], first["easy"]) == (4, 4, 2, 1)
        assert first["teacher_score"] == pytest.approx((8 + 7 + 7) / 3)
        # every call is one record; the endpoint saw exactly that many requests, none twice
        records = len(read_jsonl(out / "teacher_answers.jsonl")) + sum(
            len(read_jsonl(it / name)) for it in (it1, it2) for name in ("referee.jsonl", "candidates.jsonl"))
        assert len(server.server.requests) == records == report["spent"]["calls"]
        assert first["teacher_calls"] + report["iterations"][1]["teacher_calls"] == records
        assert first["teacher_tokens"] == 2 * first["teacher_calls"]  # the fake reports 1 + 1 tokens per call
        teacher_prompts = [b["messages"][-1]["content"] for b in server.requests("teacher")]
        assert len(teacher_prompts) == len(set(teacher_prompts)) == 7  # 4 seeds + 3 new ones, each asked once
        page = (out / "report.html").read_text()
        assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "EQUAL: count" in page

        asked = len(server.server.requests)
        again = run(cfg)  # finished: nothing asked, the same figures
        assert len(server.server.requests) == asked
        assert again["iterations"] == result["iterations"]
        with pytest.raises(ValueError, match=r"other settings \(threshold: 1.0 -> 2.0\)"):
            run(distill_config(tmp_path, tiny_model_dir, server.url, threshold=2.0))
    finally:
        server.stop()


def test_budget_stops_the_run_cleanly_and_a_larger_one_continues(tmp_path, tiny_model_dir):
    from corral.recipes.distill import run

    server = Endpoint(generated=GENERATED)
    out = tmp_path / "run"
    try:
        stopped = run(distill_config(tmp_path, tiny_model_dir, server.url, iterations=1, max_teacher_calls=3))
        assert "max_teacher_calls=3 reached (3 calls) during iteration 1 imitation" in stopped["stopped"]
        assert len(server.server.requests) == 3 and len(read_jsonl(out / "teacher_answers.jsonl")) == 3
        assert json.loads((out / "report.json").read_text())["stopped"] == stopped["stopped"]
        assert not (out / "iter-01" / "imitation.json").exists()

        # 4 teacher answers, then the referee: 8 more calls allowed, of the 2 x 4 first attempts + 2 retries
        stopped = run(distill_config(tmp_path, tiny_model_dir, server.url, iterations=1, max_teacher_calls=12))
        assert "during iteration 1 discrimination (referee)" in stopped["stopped"]
        assert len(server.server.requests) == 12 and len(read_jsonl(out / "iter-01" / "referee.jsonl")) == 8
        assert (out / "iter-01" / "imitation.json").is_file() and not (out / "iter-01" / "discrimination.json").exists()

        done = run(distill_config(tmp_path, tiny_model_dir, server.url, iterations=1))
        assert done["stopped"] is None and (out / "iter-01" / "iteration.json").is_file()
        referee = [b["messages"][-1]["content"] + str(b["seed"]) for b in server.requests("referee")]
        assert len(referee) == len(set(referee)) == 10  # nothing asked twice across the three runs
        assert len(server.server.requests) == done["spent"]["calls"] == 4 + 10 + 4
    finally:
        server.stop()
