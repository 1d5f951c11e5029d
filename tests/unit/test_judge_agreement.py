"""Judge agreement (Cohen's kappa, Spearman, position consistency) and the length-controlled win rate,
against values worked out by hand, and as `corral judge report` shows them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from corral.data.formats import DataError
from corral.eval.agreement import average_ranks, cohen_kappa, position_consistency, read_votes, spearman
from corral.eval.length_control import fit_length_model, length_controlled
from corral.eval.report import build_report, resolve_pairwise

# ---------------------------------------------------------------------------------------------
# The formulas


def test_cohen_kappa_by_hand():
    first = ["x", "x", "y", "tie", "x", "y", "y", "tie", "x", "x"]
    second = ["x", "y", "y", "tie", "x", "y", "x", "x", "x", "tie"]
    # p_o = 6/10; both judges: x 5, y 3, tie 2, so p_e = (25 + 9 + 4) / 100; kappa = 0.22 / 0.62
    assert cohen_kappa(first, second) == pytest.approx(11 / 31, abs=1e-12)
    assert cohen_kappa(first, first) == 1.0
    assert cohen_kappa(["x", "x", "y", "y"], ["x", "y", "x", "y"]) == pytest.approx(0.0, abs=1e-12)  # chance level
    assert cohen_kappa(["x", "x", "y", "y"], ["y", "y", "x", "x"]) == pytest.approx(-1.0)
    assert cohen_kappa(["x"] * 4, ["x", "y", "x", "x"]) == pytest.approx(0.0, abs=1e-12)  # one judge says x always
    assert cohen_kappa(["x"] * 3, ["x"] * 3) is None  # chance agreement 1: undefined
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="3 labels against 2"):
        cohen_kappa(["x"] * 3, ["x"] * 2)


def test_spearman_by_hand():
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 3, 3, 2]).tolist() == [4.0, 1.0, 4.0, 4.0, 2.0]
    # ranks [1, 2.5, 2.5, 4, 5] and [2, 1, 3.5, 3.5, 5]: sum of centred products 7.25, each sum of squares 9.5
    assert spearman([1, 2, 2, 3, 5], [2, 1, 4, 4, 5]) == pytest.approx(29 / 38, abs=1e-12)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # ranks only: any monotone relation is 1
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    assert spearman([5, 5, 5], [1, 2, 3]) is None and spearman([1], [2]) is None


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(1, 11, 40), rng.integers(1, 11, 40)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def _pair(judge, qid, first, second, verdict, parsed=True, turn=1, lengths=None):
    """A pairwise judgment as `corral judge grade` records it: `first` is shown as assistant A."""
    winner = {"A": first, "B": second, "tie": "tie"}.get(verdict) if parsed else None
    record = {"mode": "pairwise", "judge": judge, "question_id": qid, "turn": turn, "category": "c", "model_1": first,
              "model_2": second, "verdict": verdict if parsed else None, "winner": winner, "parsed": parsed}  # fmt: skip
    if lengths:
        record["length_1"], record["length_2"] = lengths
    return record


def test_position_consistency_counts_each_kind_of_flip():
    records = [
        _pair("j", 1, "x", "y", "A"), _pair("j", 1, "y", "x", "B"),  # x both times: consistent
        _pair("j", 2, "x", "y", "A"), _pair("j", 2, "y", "x", "A"),  # the first answer both times
        _pair("j", 3, "x", "y", "B"), _pair("j", 3, "y", "x", "B"),  # the second answer both times
        _pair("j", 4, "x", "y", "tie"), _pair("j", 4, "y", "x", "A"),  # a tie in one order
        _pair("j", 5, "x", "y", "tie"), _pair("j", 5, "y", "x", "tie"),  # tie both times: consistent
        _pair("j", 6, "x", "y", "A"), _pair("j", 6, "y", "x", None, parsed=False),  # left out, counted
        _pair("j", 7, "x", "y", "A"),  # one order only: not a swap
        _pair("k", 1, "y", "x", "A"), _pair("k", 1, "x", "y", "A"),  # another judge, kept apart
    ]  # fmt: skip
    assert position_consistency(records) == {
        "j": {"pairs": 5, "unparseable_pairs": 1, "consistent": 0.4, "biased_first": 0.2, "biased_second": 0.2,
              "other_flip": 0.2},
        "k": {"pairs": 1, "unparseable_pairs": 0, "consistent": 0.0, "biased_first": 1.0, "biased_second": 0.0,
              "other_flip": 0.0}}  # fmt: skip
    _, stats = resolve_pairwise([r for r in records if r["judge"] == "j"])
    assert stats["position_consistency"] == pytest.approx(0.4)  # the report's own figure says the same


def test_votes_in_mt_bench_human_judgment_layout(tmp_path):
    rows = [{"question_id": 81, "model_a": "x", "model_b": "y", "winner": "model_a", "judge": "expert_3", "turn": 1},
            {"question_id": 81, "model_a": "y", "model_b": "x", "winner": "tie (bothbad)", "judge": "author_1", "turn": 2},
            {"question_id": 82, "model_a": "x", "model_b": "y", "winner": "model_b", "judge": ["gpt-4", "pair-v2"],
             "turn": 1}]  # fmt: skip
    path = tmp_path / "human_judgments.json"  # a JSON list, as FastChat's compute_agreement.py reads it
    path.write_text(json.dumps(rows))
    assert [(v["judge"], v["winner"]) for v in read_votes(path)] == [("human", "x"), ("author", "tie"), ("gpt-4", "y")]
    jsonl = tmp_path / "votes.jsonl"  # the JSONL `datasets` writes
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps({**rows[0], "winner": "both"}) + "\n")
    with pytest.raises(DataError, match=r"votes.jsonl:3: field 'winner': expected model_a, model_b or tie, got 'both'"):
        read_votes(jsonl)
    jsonl.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "turn"}) + "\n")
    with pytest.raises(DataError, match=r"votes.jsonl:1: field 'turn': missing"):
        read_votes(jsonl)


# ---------------------------------------------------------------------------------------------
# Agreement in the report


def _both_orders(judge, qid, winner, a="x", b="y", lengths=None):
    """Both orders of a pair with a consistent verdict: `winner` is a, b or tie."""
    la, lb = lengths or (None, None)
    first = {a: "A", b: "B", "tie": "tie"}[winner]
    second = {a: "B", b: "A", "tie": "tie"}[winner]
    return [_pair(judge, qid, a, b, first, lengths=lengths and (la, lb)),
            _pair(judge, qid, b, a, second, lengths=lengths and (lb, la))]


def _single(judge, qid, score, model="x"):
    return {"mode": "single", "judge": judge, "question_id": qid, "turn": 1, "category": "c", "model": model,
            "score": float(score), "parsed": True}  # fmt: skip


def _write(folder, name, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_agreement_between_two_judges_and_people(tmp_path, capsys):
    from corral.config import JudgeReportConfig
    from corral.recipes.judge import report as report_command

    pairwise = []
    for qid, (w1, w2) in enumerate([("x", "x"), ("x", "y"), ("y", "y"), ("tie", "tie")], 1):
        pairwise += _both_orders("j1", qid, w1) + _both_orders("j2", qid, w2)
    single = [_single("j1", q, s) for q, s in enumerate([1, 2, 2, 3, 5], 1)]
    single += [_single("j2", q, s) for q, s in enumerate([2, 1, 4, 4, 5], 1)]
    _write(tmp_path / "judgments", "pairwise.jsonl", pairwise)
    _write(tmp_path / "judgments", "single.jsonl", single)
    votes = [{"question_id": 1, "turn": 1, "model_a": "x", "model_b": "y", "winner": "model_a", "judge": "expert_0"},
             {"question_id": 1, "turn": 1, "model_a": "y", "model_b": "x", "winner": "model_a", "judge": "expert_1"},
             {"question_id": 2, "turn": 1, "model_a": "x", "model_b": "y", "winner": "model_b", "judge": "expert_0"},
             {"question_id": 9, "turn": 1, "model_a": "x", "model_b": "y", "winner": "model_a", "judge": "expert_0"}]  # fmt: skip
    _write(tmp_path, "human.jsonl", votes)

    report_command(JudgeReportConfig(output_dir=str(tmp_path), votes=[str(tmp_path / "human.jsonl")], bootstrap=20))
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {tuple(r["judges"]): r for r in report["agreement"]["pairwise"]}
    # j1 x x y tie, j2 x y y tie: p_o 3/4, p_e (2x1 + 1x2 + 1x1) / 16, kappa (12 - 5) / (16 - 5)
    assert rows[("j1", "j2")]["kappa"] == pytest.approx(7 / 11) and rows[("j1", "j2")]["agreement"] == 0.75
    assert (rows[("j1", "j2")]["agreement_without_ties"], rows[("j1", "j2")]["votes_without_ties"]) == (
        pytest.approx(2 / 3), 3)
    # people on questions 1 (x, then y) and 2 (y): vote pairs with j1 (x, x), (x, y), (x, y): p_o = p_e = 1/3
    assert (rows[("human", "j1")]["items"], rows[("human", "j1")]["votes"]) == (2, 3)
    assert rows[("human", "j1")]["agreement"] == pytest.approx(1 / 3)
    assert rows[("human", "j1")]["kappa"] == pytest.approx(0.0, abs=1e-12)
    assert rows[("human", "j2")]["agreement"] == pytest.approx(2 / 3)  # (x, x), (x, y), (y, y)
    [scores] = report["agreement"]["single"]
    assert scores["judges"] == ["j1", "j2"] and scores["spearman"] == pytest.approx(29 / 38)
    assert report["agreement"]["position"]["j1"]["consistent"] == 1.0

    shown = capsys.readouterr().out
    assert "| j1 | j2 | 4 | 4 | 0.75 | 0.64 | 0.67 | 3 |" in shown
    assert f"| j1 | j2 | 5 | {29 / 38:.2f} | 1.00 |" in shown  # mean |difference|: (1 + 1 + 2 + 1 + 0) / 5
    assert "| j1 | 4 | 1.00 | 0.00 | 0.00 | 0.00 |" in shown


# ---------------------------------------------------------------------------------------------
# Length-controlled win rate


def test_length_controlled_win_rate_exact_cases():
    # Wins explained by length alone: 3 in 4 won when 100 characters longer (12 games), 1 in 4 when
    # 100 shorter (4 games). Raw: 10 / 16. Two values of d: the fit is exact, and sigmoid(b0) = 1/2.
    y = [1] * 9 + [0] * 3 + [1] + [0] * 3
    d = [100] * 12 + [-100] * 4
    fit = fit_length_model(y, d)
    assert fit["win_rate"] == 0.625 and fit["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    # b0 + b1 tanh(100 / sd) = logit(3/4) with sd the population sd of d
    assert fit["length_sd"] == pytest.approx(float(np.std(d)))
    assert fit["length_coef"] * np.tanh(100 / fit["length_sd"]) == pytest.approx(np.log(3), abs=1e-5)
    # Skill as well: 9 in 10 won when longer, 1 in 2 when shorter: b0 = (logit 0.9 + logit 0.5) / 2 = ln(3),
    # so the LC win rate is exactly 3/4 (raw: 11 / 14)
    fit = fit_length_model([1] * 9 + [0] + [1, 1, 0, 0], [40] * 10 + [-40] * 4)
    assert fit["win_rate"] == pytest.approx(11 / 14) and fit["lc_win_rate"] == pytest.approx(0.75, abs=1e-6)
    # ties count half; all lengths equal: nothing to control for, LC = raw
    fit = fit_length_model([1, 0.5, 0.5, 0], [7, 7, 7, 7])
    assert fit["length_coef"] == 0.0 and fit["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    fit = fit_length_model([1, 1, 1, 0], [3, 3, 3, 3])
    assert fit["lc_win_rate"] == pytest.approx(0.75, abs=1e-6)


def test_length_controlled_invariances_and_optimum():
    rng = np.random.default_rng(1)
    d = rng.normal(0, 300, 60)
    y = (rng.random(60) < 1 / (1 + np.exp(-(0.4 + d / 300)))).astype(float)
    y[:5] = 0.5  # a few ties
    fit = fit_length_model(y, d)
    # the opponent's view: outcomes and differences mirrored give 1 - LC
    assert fit_length_model(1 - y, -d)["lc_win_rate"] == pytest.approx(1 - fit["lc_win_rate"], abs=1e-9)
    # characters or bytes, doubled or not: d is standardised
    assert fit_length_model(y, 7 * d)["lc_win_rate"] == pytest.approx(fit["lc_win_rate"], abs=1e-9)
    # the fitted (b0, b1) is the optimum: the penalised log-likelihood's gradient is zero there
    z = np.tanh(d / d.std())
    p = 1 / (1 + np.exp(-(fit["intercept"] + fit["length_coef"] * z)))
    gradient = [np.sum(y - p) - 1e-6 * fit["intercept"], np.sum((y - p) * z) - 1e-6 * fit["length_coef"]]
    assert np.abs(gradient).max() < 1e-8
    with pytest.raises(ValueError, match="outcomes must lie in"):
        fit_length_model([2.0, 0.0], [1, 2])


def test_report_length_controlled_from_judgments_and_from_answers(tmp_path):
    pairwise, answers = [], {"long": {}, "base": {}}
    outcomes = ["long"] * 9 + ["base"] * 3 + ["long"] + ["base"] * 3  # as in the exact case above
    for qid, winner in enumerate(outcomes):
        length_long, length_base = (300, 200) if qid < 12 else (200, 300)
        pairwise += _both_orders("j", qid, winner, a="long", b="base", lengths=(length_long, length_base))
        answers["long"][qid] = {"turns": ["L" * length_long]}
        answers["base"][qid] = {"turns": ["B" * length_base]}
    _write(tmp_path / "judgments", "pairwise.jsonl", pairwise)
    report = build_report(tmp_path / "judgments", baseline="base", rounds=50)
    [row] = report["pairwise"]["length_controlled"]
    assert (row["model"], row["opponent"], row["games"], row["games_without_length"]) == ("long", "base", 16, 0)
    assert row["win_rate"] == 0.625 and row["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert row["mean_length_difference"] == pytest.approx(50.0)
    assert row["lc_ci95"][0] <= 0.5 <= row["lc_ci95"][1]

    # FastChat's judgments record no lengths: they come from the answer files, the same fit
    _write(tmp_path / "judgments", "pairwise.jsonl",
           [{k: v for k, v in r.items() if not k.startswith("length_")} for r in pairwise])
    [without] = build_report(tmp_path / "judgments", baseline="base", rounds=50)["pairwise"]["length_controlled"]
    assert (without["games"], without["games_without_length"], "lc_win_rate" in without) == (0, 16, False)
    [again] = build_report(tmp_path / "judgments", baseline="base", rounds=50,
                           answers=answers)["pairwise"]["length_controlled"]  # fmt: skip
    assert again["lc_win_rate"] == pytest.approx(row["lc_win_rate"]) and again["games"] == 16


def test_length_controlled_orientation():
    games = [{"model_a": "a", "model_b": "b", "winner": w, "length_a": la, "length_b": lb}
             for w, la, lb in [("a", 10, 5), ("b", 5, 10), ("a", 10, 5), ("tie", 7, 7)]]  # fmt: skip
    [ab] = length_controlled(games, rounds=10)
    [ba] = length_controlled(games, baseline="a", rounds=10)
    assert (ab["model"], ab["opponent"], ba["model"], ba["opponent"]) == ("a", "b", "b", "a")
    assert ab["win_rate"] == pytest.approx(2.5 / 4) and ba["win_rate"] == pytest.approx(1.5 / 4)
    assert ab["lc_win_rate"] == pytest.approx(1 - ba["lc_win_rate"], abs=1e-9)
    assert ab["mean_length_difference"] == pytest.approx(1.25) == -ba["mean_length_difference"]
