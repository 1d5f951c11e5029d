"""Judge report: scores with bootstrap intervals, per-category scores, relative scores, win/tie/loss
after the position-swap rule, Bradley-Terry (Elo-scale) ratings with intervals, length-controlled
win rates (length_control.py), probability-weighted scores where the judge gave logprobs
(expected.py), each judge's position consistency and the agreement between judges (agreement.py),
and parse rates. Written as JSON, Markdown and one self-contained HTML file.

Position-swap rule (MT-bench): a pair of answers is judged in both orders; a model wins only when
both orders pick it, any other combination (a flip, or a tie in either order) is a tie. A pair with
an unparseable verdict in either order is left out and counted.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from corral.atomic import atomic_write_text, read_jsonl
from corral.eval.agreement import (item_key, pairwise_agreement, position_consistency, single_agreement,
                                   votes_from_games)
from corral.eval.length_control import length_controlled


def latest(records: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """The last record for each identity (a re-asked judgment replaces the old one)."""
    keep = {}
    for r in records:
        keep[tuple(r.get(f) for f in fields)] = r
    return list(keep.values())


def bootstrap_ci(values, stat=np.mean, rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    samples = [stat(values[rng.integers(0, len(values), len(values))]) for _ in range(rounds)]
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


# ---------------------------------------------------------------------------------------------
# Single-answer scores


def single_scores(records: list[dict], rounds: int = 1000, seed: int = 0) -> dict:
    records = latest(records, ("judge", "question_id", "turn", "model"))
    by_model: dict[str, dict] = {}
    for model in sorted({r["model"] for r in records}):
        rows = [r for r in records if r["model"] == model]
        scores = [r["score"] for r in rows if r.get("parsed")]
        categories: dict[str, list] = {}
        unparsed: dict[str, int] = defaultdict(int)
        for r in rows:  # every category with a judgment is listed, its mean None when none parsed
            in_category = categories.setdefault(r["category"], [])
            if r.get("parsed"):
                in_category.append(r["score"])
            else:
                unparsed[r["category"]] += 1
        by_model[model] = {
            "mean": float(np.mean(scores)) if scores else None,
            "ci95": bootstrap_ci(scores, rounds=rounds, seed=seed) if scores else None,
            "n": len(scores),
            "unparseable": sum(not r.get("parsed") for r in rows),
            "by_turn": {t: float(np.mean(s)) for t in (1, 2)
                        if (s := [r["score"] for r in rows if r.get("parsed") and r["turn"] == t])},
            "categories": {c: float(np.mean(v)) if v else None for c, v in sorted(categories.items())},
            "category_unparseable": dict(sorted(unparsed.items())),
        }  # fmt: skip
        weighed = [r for r in rows if r.get("scoring") == "expected"]
        if weighed:  # scoring=expected: the probability-weighted score beside the sampled one
            expected = [r["expected_score"] for r in weighed if r.get("expected_score") is not None]
            by_model[model]["expected"] = {
                "mean": float(np.mean(expected)) if expected else None,
                "ci95": bootstrap_ci(expected, rounds=rounds, seed=seed) if expected else None,
                "n": len(expected),
                # the sampled score on the same judgments, so the two means compare like with like
                "parsed_mean": float(np.mean([r["score"] for r in weighed if r.get("expected_score") is not None]))
                if expected else None,
                "fallbacks": dict(sorted(Counter(r["expected_fallback"] for r in weighed
                                                 if "expected_fallback" in r).items())),
            }  # fmt: skip
    return by_model


# ---------------------------------------------------------------------------------------------
# Relative scores (Vicuna): sum of the candidate's scores over the sum of the reference's


def relative_scores(records: list[dict], rounds: int = 1000, seed: int = 0) -> dict:
    records = latest(records, ("judge", "question_id", "turn", "model_1", "model_2"))
    out = {}
    for r in records:
        candidate = r["model_1"] if r["model_2"] == r["baseline"] else r["model_2"]
        out.setdefault((candidate, r["baseline"]), []).append(r)
    result = {}
    for (candidate, baseline), rows in sorted(out.items()):
        pairs = []
        for r in rows:
            if r.get("parsed"):
                s1, s2 = r["scores"]
                pairs.append((s1, s2) if r["model_1"] == candidate else (s2, s1))
        arr = np.asarray(pairs, dtype=float).reshape(-1, 2)
        ratio = float(arr[:, 0].sum() / arr[:, 1].sum()) if len(arr) and arr[:, 1].sum() else None
        ci = None
        if len(arr) >= 2:
            rng = np.random.default_rng(seed)
            samples = []
            for _ in range(rounds):
                pick = arr[rng.integers(0, len(arr), len(arr))]
                if pick[:, 1].sum():
                    samples.append(pick[:, 0].sum() / pick[:, 1].sum())
            ci = (float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5)))
        result[candidate] = {"baseline": baseline, "relative": ratio, "ci95": ci, "n": len(arr),
                             "unparseable": sum(not r.get("parsed") for r in rows)}  # fmt: skip
    return result


def relative_from_single(single: dict, records: list[dict], baseline: str) -> dict:
    """Relative score from single-answer grades: on the turns graded for both, sum(candidate) / sum(baseline)."""
    records = [r for r in latest(records, ("judge", "question_id", "turn", "model")) if r.get("parsed")]
    by = {(r["question_id"], r["turn"], r["model"]): r["score"] for r in records}
    result = {}
    for model in single:
        if model == baseline:
            continue
        common = [(by[k], by[(k[0], k[1], baseline)]) for k in by if k[2] == model and (k[0], k[1], baseline) in by]
        if common and sum(b for _, b in common):
            result[model] = {"baseline": baseline, "relative": sum(a for a, _ in common) / sum(b for _, b in common),
                             "n": len(common), "from": "single"}  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------
# Pairwise: position-swap resolution, win rates, consistency, Bradley-Terry


def _answer_length(answers: dict | None, model: str, question_id, turn: int) -> int | None:
    record = (answers or {}).get(model, {}).get(question_id)
    return len(record["turns"][turn - 1]) if record and len(record["turns"]) >= turn else None


def _game_lengths(rows: list[dict], a: str, b: str, answers: dict | None) -> tuple[int | None, int | None]:
    """Characters of a's and b's judged answers: from the judgments (`length_1`, `length_2`), else the answer files."""
    for r in rows:
        if r.get("length_1") is not None and r.get("length_2") is not None:
            lengths = {r["model_1"]: r["length_1"], r["model_2"]: r["length_2"]}
            return lengths[a], lengths[b]
    qid, turn = rows[0]["question_id"], rows[0]["turn"]
    return _answer_length(answers, a, qid, turn), _answer_length(answers, b, qid, turn)


def resolve_pairwise(records: list[dict], answers: dict | None = None) -> tuple[list[dict], dict]:
    """Games (one per judge, question turn and pair, after the swap rule) and judge statistics.
    `answers[model][question_id]` (answer records) give the answers' lengths where the judgments lack them."""
    records = latest(records, ("judge", "question_id", "turn", "model_1", "model_2"))
    groups = defaultdict(list)
    for r in records:
        groups[(r["judge"], r["question_id"], r["turn"], frozenset((r["model_1"], r["model_2"])))].append(r)
    games, both_orders, consistent, unresolved = [], 0, 0, 0
    for (judge, qid, turn, pair), rows in groups.items():
        a, b = sorted(pair)
        if any(not r.get("parsed") for r in rows):
            unresolved += 1
            continue
        winners = [r["winner"] for r in rows]
        if len(rows) >= 2:
            both_orders += 1
            consistent += len(set(winners)) == 1
        outcome = winners[0] if len(set(winners)) == 1 else "tie"
        category = rows[0]["category"]
        length_a, length_b = _game_lengths(rows, a, b, answers)
        games.append({"judge": judge, "question_id": qid, "turn": turn, "category": category, "model_a": a,
                      "model_b": b, "winner": outcome, "flipped": len(set(winners)) > 1, "length_a": length_a,
                      "length_b": length_b})  # fmt: skip
    stats = {"games": len(games), "swapped_pairs": both_orders,
             "position_consistency": consistent / both_orders if both_orders else None,
             "unresolved": unresolved, "unparseable": sum(not r.get("parsed") for r in records),
             "verdicts": len(records)}  # fmt: skip
    return games, stats


def expected_win_rates(records: list[dict]) -> list[dict]:
    """scoring=expected, pairwise: per model pair, the mean over its judgments (both orders) of the
    judge's probability that model_a wins plus half its probability of a tie."""
    records = latest(records, ("judge", "question_id", "turn", "model_1", "model_2"))
    pairs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        probs = r.get("expected_probs")
        if not probs:
            continue
        a, b = sorted((r["model_1"], r["model_2"]))
        p_first, p_second, p_tie = probs.get("A", 0.0), probs.get("B", 0.0), probs.get("tie", 0.0)
        p_a = p_first if r["model_1"] == a else p_second
        pairs[(a, b)].append(p_a + 0.5 * p_tie)
    return [{"model_a": a, "model_b": b, "judgments": len(v), "win_rate_a": float(np.mean(v))}
            for (a, b), v in sorted(pairs.items())]  # fmt: skip


def win_table(games: list[dict]) -> dict:
    """Per model pair: wins of each side and ties; per model: overall win/tie/loss rates."""
    pairs = defaultdict(lambda: {"wins_a": 0, "wins_b": 0, "ties": 0})
    overall = defaultdict(lambda: {"win": 0, "tie": 0, "loss": 0})
    for g in games:
        a, b = g["model_a"], g["model_b"]
        entry = pairs[(a, b)]
        if g["winner"] == a:
            entry["wins_a"] += 1
            overall[a]["win"] += 1
            overall[b]["loss"] += 1
        elif g["winner"] == b:
            entry["wins_b"] += 1
            overall[b]["win"] += 1
            overall[a]["loss"] += 1
        else:
            entry["ties"] += 1
            overall[a]["tie"] += 1
            overall[b]["tie"] += 1
    rates = {}
    for model, c in sorted(overall.items()):
        n = sum(c.values())
        rates[model] = {k: v / n for k, v in c.items()} | {"games": n}
    return {"pairs": [{"model_a": a, "model_b": b, **v} for (a, b), v in sorted(pairs.items())], "models": rates}


def win_matrix(games: list[dict], models: list[str]) -> np.ndarray:
    """M[i, j]: share of games model i won against model j, a tie counting half (NaN: never met)."""
    idx = {m: i for i, m in enumerate(models)}
    score = np.zeros((len(models), len(models)))
    count = np.zeros((len(models), len(models)))
    for g in games:
        i, j = idx[g["model_a"]], idx[g["model_b"]]
        s = 1.0 if g["winner"] == g["model_a"] else 0.0 if g["winner"] == g["model_b"] else 0.5
        score[i, j] += s
        score[j, i] += 1 - s
        count[i, j] += 1
        count[j, i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, score / np.maximum(count, 1), np.nan)


def bradley_terry(games: list[dict], models: list[str], l2: float = 0.01, anchor: str | None = None) -> dict[str, float]:
    """Bradley-Terry strengths fitted by Newton's method (ties count half a win each way), on the Elo
    scale: 400 / ln 10 per unit of log-strength, mean 1000 (or `anchor` at 1000). A small L2 penalty
    keeps a model that won or lost every game finite."""
    idx = {m: i for i, m in enumerate(models)}
    n = len(models)
    theta = np.zeros(n)
    rows = [(idx[g["model_a"]], idx[g["model_b"]],
             1.0 if g["winner"] == g["model_a"] else 0.0 if g["winner"] == g["model_b"] else 0.5) for g in games]  # fmt: skip
    for _ in range(100):
        grad = -l2 * theta
        hess = -l2 * np.eye(n)
        for i, j, s in rows:
            p = 1.0 / (1.0 + math.exp(-(theta[i] - theta[j])))
            grad[i] += s - p
            grad[j] -= s - p
            w = p * (1 - p)
            hess[i, i] -= w
            hess[j, j] -= w
            hess[i, j] += w
            hess[j, i] += w
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    elo = 400 / math.log(10) * theta
    elo += 1000 - (elo[idx[anchor]] if anchor in idx else elo.mean())
    return {m: float(elo[idx[m]]) for m in models}


def elo_ratings(games: list[dict], models: list[str], rounds: int = 200, seed: int = 0,
                anchor: str | None = None) -> dict:
    point = bradley_terry(games, models, anchor=anchor)
    rng = np.random.default_rng(seed)
    samples = defaultdict(list)
    for _ in range(rounds if len(games) >= 2 else 0):
        pick = [games[k] for k in rng.integers(0, len(games), len(games))]
        for m, v in bradley_terry(pick, models, anchor=anchor).items():
            samples[m].append(v)
    return {m: {"elo": point[m], "ci95": (float(np.percentile(samples[m], 2.5)), float(np.percentile(samples[m], 97.5)))
                if samples[m] else None} for m in sorted(models, key=lambda m: -point[m])}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The report


def parse_rates(records: list[dict]) -> list[dict]:
    """Per mode, judge and constrained or not: judgments, parsed share, mean seconds per judgment, the
    most common reasons a reply did not parse."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r.get("mode", "?"), r["judge"], bool(r.get("constrained")))].append(r)
    rows = []
    for (mode, judge, constrained), rows_of in sorted(groups.items()):
        latencies = [r["latency_s"] for r in rows_of if r.get("latency_s") is not None]
        parsed = sum(bool(r.get("parsed")) for r in rows_of)
        reasons = Counter(r["parse_error"] for r in rows_of if r.get("parse_error"))
        rows.append({"mode": mode, "judge": judge, "constrained": constrained, "judgments": len(rows_of),
                     "parsed": parsed, "rate": parsed / len(rows_of),
                     "seconds_per_judgment": float(np.mean(latencies)) if latencies else None,
                     "reasons": reasons.most_common(3)})  # fmt: skip
    return rows


def build_report(judgments_dir: str | Path, baseline: str | None = None, rounds: int = 1000, seed: int = 0,
                 extra: dict[str, list[dict]] | None = None, votes: list[dict] | None = None,
                 answers: dict | None = None) -> dict:  # fmt: skip
    """The report over `judgments_dir/MODE.jsonl`, plus `extra` judgments by mode (FastChat's, read in),
    `votes` (people's pairwise verdicts, agreement.read_votes) to measure the judges' agreement against,
    and `answers[model][question_id]` for the answers' lengths where the judgments lack them."""
    judgments_dir = Path(judgments_dir)
    extra = extra or {}
    single, pairwise, relative = (read_jsonl(judgments_dir / f"{mode}.jsonl") + extra.get(mode, [])
                                  for mode in ("single", "pairwise", "relative"))  # fmt: skip
    if not (single or pairwise or relative):
        raise FileNotFoundError(f"{judgments_dir}: no judgments (run `corral judge grade` first)")
    report: dict = {"judges": sorted({r["judge"] for r in single + pairwise + relative}), "baseline": baseline}
    if single:
        report["single"] = single_scores(single, rounds, seed)
    if relative:
        report["relative"] = relative_scores(relative, rounds, seed)
    elif single and baseline and baseline in report["single"]:
        report["relative"] = relative_from_single(report["single"], single, baseline)
    games: list[dict] = []
    if pairwise:
        games, stats = resolve_pairwise(pairwise, answers)
        models = sorted({g["model_a"] for g in games} | {g["model_b"] for g in games})
        report["pairwise"] = {"judge": stats, **win_table(games)}
        report["pairwise"]["matrix"] = {"models": models, "win_rate": win_matrix(games, models).tolist()}
        report["pairwise"]["length_controlled"] = length_controlled(games, baseline, rounds=min(rounds, 200), seed=seed)
        if any(r.get("scoring") == "expected" for r in pairwise):
            report["pairwise"]["expected"] = expected_win_rates(pairwise)
        report["elo"] = elo_ratings(games, models, rounds=min(rounds, 200), seed=seed, anchor=baseline) if models else {}
    report["agreement"] = agreement_section(single, pairwise, games, votes or [])
    report["parse_rates"] = parse_rates(single + pairwise + relative)
    report["unparseable"] = {mode: sum(not r.get("parsed") for r in rows)
                             for mode, rows in (("single", single), ("pairwise", pairwise), ("relative", relative)) if rows}  # fmt: skip
    return report


def agreement_section(single: list[dict], pairwise: list[dict], games: list[dict], votes: list[dict]) -> dict:
    """Each judge's position consistency; with two or more judges (people's votes count as judges),
    their pairwise agreement (Cohen's kappa) and single-score agreement (Spearman)."""
    section: dict = {"position": position_consistency(pairwise) if pairwise else {}}
    pair_votes = votes_from_games(games)
    for v in votes:
        pair_votes[v["judge"]][item_key(v["question_id"], v["turn"], v["model_a"], v["model_b"])].append(v["winner"])
    section["pairwise"] = pairwise_agreement(pair_votes) if len(pair_votes) >= 2 else []
    section["single"] = single_agreement(single) if len({r["judge"] for r in single}) >= 2 else []
    return section


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci, digits: int = 2) -> str:
    return "-" if not ci or any(math.isnan(v) for v in ci) else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _category_cell(scores: dict, category: str) -> str:
    """A model's mean in a category; a category it was judged in with no parsed judgment says so."""
    if category in scores["categories"] and scores["categories"][category] is None:
        return f"no parsed judgment ({scores.get('category_unparseable', {}).get(category, 0)} unparseable)"
    return _fmt(scores["categories"].get(category))


def to_markdown(report: dict) -> str:
    lines = ["# Corral judge report", "", f"Judge: {', '.join(report['judges'])}"
             + (f"; baseline: {report['baseline']}" if report.get("baseline") else ""), ""]  # fmt: skip
    if "single" in report:
        lines += ["## Single-answer scores (1-10)", "", "| model | mean | 95% CI | turn 1 | turn 2 | graded | unparseable |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for m, s in sorted(report["single"].items(), key=lambda kv: -(kv[1]["mean"] or 0)):
            lines.append(f"| {m} | {_fmt(s['mean'])} | {_ci(s['ci95'])} | {_fmt(s['by_turn'].get(1))} | "
                         f"{_fmt(s['by_turn'].get(2))} | {s['n']} | {s['unparseable']} |")  # fmt: skip
        categories = sorted({c for s in report["single"].values() for c in s["categories"]})
        models = sorted(report["single"])
        lines += ["", "### By category", "", "| category | " + " | ".join(models) + " |",
                  "|---|" + "---:|" * len(models)]  # fmt: skip
        for c in categories:
            lines.append(f"| {c} | " + " | ".join(_category_cell(report["single"][m], c) for m in models) + " |")
        lines.append("")
        lines += _expected_scores_markdown(report["single"])
    if report.get("relative"):
        lines += ["## Relative score (sum of the model's scores / sum of the baseline's)", "",
                  "| model | baseline | relative | 95% CI | graded |", "|---|---|---:|---:|---:|"]  # fmt: skip
        for m, r in report["relative"].items():
            lines.append(f"| {m} | {r['baseline']} | {_fmt(r['relative'] and 100 * r['relative'], 1)}% | "
                         f"{_ci(r.get('ci95') and [100 * v for v in r['ci95']], 1)} | {r['n']} |")  # fmt: skip
        lines.append("")
    if "pairwise" in report:
        p = report["pairwise"]
        j = p["judge"]
        lines += ["## Pairwise (both orders; a verdict that flips with the order is a tie)", "",
                  "| model A | model B | A wins | B wins | ties |", "|---|---|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['model_a']} | {r['model_b']} | {r['wins_a']} | {r['wins_b']} | {r['ties']} |" for r in p["pairs"]]
        lines += ["", "| model | win | tie | loss | games | Elo (Bradley-Terry) | 95% CI |", "|---|---:|---:|---:|---:|---:|---:|"]
        for m, e in report["elo"].items():
            w = p["models"].get(m, {})
            lines.append(f"| {m} | {_fmt(w.get('win'))} | {_fmt(w.get('tie'))} | {_fmt(w.get('loss'))} | "
                         f"{w.get('games', 0)} | {e['elo']:.0f} | {_ci(e['ci95'], 0)} |")  # fmt: skip
        lines += ["", f"Judge position consistency: {_fmt(j['position_consistency'])} "
                  f"({j['swapped_pairs']} pairs judged in both orders); "
                  f"{j['unresolved']} pairs left out for an unparseable verdict.", ""]  # fmt: skip
        lines += _length_controlled_markdown(p.get("length_controlled", []))
        if p.get("expected"):
            lines += ["### Probability-weighted verdicts (scoring=expected)", "",
                      "Mean over the judgments of both orders of the judge's probability that model A wins, plus "
                      "half its probability of a tie, read from its token probabilities at the verdict.", "",
                      "| model A | model B | judgments | A's weighted win rate |", "|---|---|---:|---:|"]  # fmt: skip
            lines += [f"| {r['model_a']} | {r['model_b']} | {r['judgments']} | {_fmt(r['win_rate_a'])} |"
                      for r in p["expected"]] + [""]  # fmt: skip
    lines += _agreement_markdown(report.get("agreement", {}))
    lines += ["## Judge replies parsed", "", "| mode | judge | constrained | parsed | judgments | parse rate | "
              "s per judgment | most common failure |", "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in report.get("parse_rates", []):
        failure = f"{r['reasons'][0][0]} ({r['reasons'][0][1]})" if r["reasons"] else "-"
        lines.append(f"| {r['mode']} | {r['judge']} | {'yes' if r['constrained'] else 'no'} | {r['parsed']} | "
                     f"{r['judgments']} | {_fmt(r['rate'])} | {_fmt(r['seconds_per_judgment'])} | "
                     f"{_cell(failure)} |")  # fmt: skip
    lines += ["", "Unparseable judge replies: " + ", ".join(f"{mode} {n}" for mode, n in report["unparseable"].items()), ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _expected_scores_markdown(single: dict) -> list[str]:
    rows = [(m, s["expected"]) for m, s in sorted(single.items()) if "expected" in s]
    if not rows:
        return []
    lines = ["### Probability-weighted scores (scoring=expected)", "",
             "The judge's expected score at its verdict (sum of p(score) x score over the score tokens it could "
             "have written there, renormalised), beside the score it wrote, on the same judgments.", "",
             "| model | expected | 95% CI | sampled | weighed | kept the sampled score only |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for m, e in rows:
        kept = ", ".join(f"{reason}: {n}" for reason, n in e["fallbacks"].items()) or "-"
        lines.append(f"| {m} | {_fmt(e['mean'])} | {_ci(e['ci95'])} | {_fmt(e['parsed_mean'])} | {e['n']} | "
                     f"{_cell(kept)} |")  # fmt: skip
    return lines + [""]


LC_METHOD = ("Length-controlled win rate (AlpacaEval 2's idea, smaller): for each pair, a logistic fit "
             "P(model wins) = sigmoid(b0 + b1 tanh(d / sd(d))), d = characters of the model's answer minus the "
             "opponent's, ties counted 1/2; the LC win rate is sigmoid(b0), the fitted win rate at equal length. "
             "95% interval: bootstrap over games.")  # fmt: skip


def _length_controlled_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["### Length-controlled win rate", "", LC_METHOD, "",
             "| model | opponent | games | win rate | LC win rate | 95% CI | mean length difference | length coef |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['opponent']} | {r['games']} | {_fmt(r.get('win_rate'))} | "
                     f"{_fmt(r.get('lc_win_rate'))} | {_ci(r.get('lc_ci95'))} | {_fmt(r.get('mean_length_difference'), 0)} | "
                     f"{_fmt(r.get('length_coef'))} |")  # fmt: skip
    missing = sum(r["games_without_length"] for r in rows)
    if missing:
        lines += ["", f"{missing} games left out: the lengths of their answers are unknown (give answers_dir)."]
    return lines + [""]


def _agreement_markdown(agreement: dict) -> list[str]:
    lines: list[str] = []
    if agreement.get("position"):
        lines += ["## Judge agreement", "", "### Position consistency (pairs judged in both orders)", "",
                  "| judge | pairs | consistent | biased to first | biased to second | other flips |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for judge, c in agreement["position"].items():
            lines.append(f"| {judge} | {c['pairs']} | {_fmt(c['consistent'])} | {_fmt(c['biased_first'])} | "
                         f"{_fmt(c['biased_second'])} | {_fmt(c['other_flip'])} |")  # fmt: skip
        lines.append("")
    if agreement.get("pairwise"):
        lines += ([] if lines else ["## Judge agreement", ""]) + [
            "### Pairwise verdicts (after the swap rule; Cohen's kappa over vote pairs)", "",
            "| judge | judge | items | votes | agreement | kappa | agreement without ties | votes without ties |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in agreement["pairwise"]:
            lines.append(f"| {r['judges'][0]} | {r['judges'][1]} | {r['items']} | {r['votes']} | {_fmt(r['agreement'])} | "
                         f"{_fmt(r['kappa'])} | {_fmt(r['agreement_without_ties'])} | {r['votes_without_ties']} |")  # fmt: skip
        lines.append("")
    if agreement.get("single"):
        lines += ([] if lines else ["## Judge agreement", ""]) + [
            "### Single scores (Spearman's rank correlation)", "",
            "| judge | judge | answer turns | Spearman | mean absolute difference |", "|---|---|---:|---:|---:|"]  # fmt: skip
        for r in agreement["single"]:
            lines.append(f"| {r['judges'][0]} | {r['judges'][1]} | {r['items']} | {_fmt(r['spearman'])} | "
                         f"{_fmt(r['mean_abs_difference'])} |")  # fmt: skip
        lines.append("")
    return lines


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(report: dict) -> dict[str, str]:
    """Base64 PNGs: per-category bars of single scores, the pairwise win-rate matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    if "single" in report:
        models = sorted(report["single"])
        categories = sorted({c for s in report["single"].values() for c in s["categories"]})
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(categories) + 2), 4))
        width = 0.8 / max(1, len(models))
        for k, m in enumerate(models):
            means = [report["single"][m]["categories"].get(c) for c in categories]
            x = np.arange(len(categories)) + k * width
            ax.bar(x, [v or 0 for v in means], width, label=m)
            for xi, c, v in zip(x, categories, means):
                if v is None and c in report["single"][m]["categories"]:  # judged, none parsed: shown, not dropped
                    ax.text(xi, 0.2, "no parsed\njudgment", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(np.arange(len(categories)) + width * (len(models) - 1) / 2, categories, rotation=30, ha="right")
        ax.set_ylim(0, 10)
        ax.set_ylabel("mean score (1-10)")
        ax.set_title("Single-answer score by category")
        ax.legend()
        images["categories"] = _png(fig)
    if report.get("pairwise", {}).get("matrix", {}).get("models"):
        models = report["pairwise"]["matrix"]["models"]
        m = np.asarray(report["pairwise"]["matrix"]["win_rate"], dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 * len(models) + 3, 1.0 * len(models) + 2))
        ax.imshow(np.nan_to_num(m, nan=0.5), cmap="RdYlGn", vmin=0, vmax=1)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_yticks(range(len(models)), models)
        for i in range(len(models)):
            for j in range(len(models)):
                ax.text(j, i, "-" if math.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center")
        ax.set_title("Win rate of row model against column model (tie = 1/2)")
        images["win_rate"] = _png(fig)
    return images


def to_html(report: dict, markdown: str) -> str:
    """One self-contained page: the report's Markdown rendered to HTML (its tables as tables) and the plots."""
    images = [("Scores by category" if name == "categories" else "Win-rate matrix", name, data)
              for name, data in plots(report).items()]  # fmt: skip
    return markdown_page("Corral judge report", markdown, trailing_images=images)


def markdown_page(title: str, markdown: str, images_dir: str | Path | None = None,
                  trailing_images: list[tuple[str, str, str]] = ()) -> str:
    """A self-contained HTML page from a report's Markdown (CommonMark plus tables, by markdown-it-py).

    Raw HTML in the Markdown is escaped, not passed through: reports quote model replies. A local
    image `![alt](file.png)` is embedded as a base64 data URI read from `images_dir`, so the page opens
    anywhere; `trailing_images` are (heading, alt, base64 PNG) appended at the end."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    if images_dir is not None:
        for token in tokens:
            for child in token.children or []:
                if child.type == "image":
                    child.attrSet("src", _data_uri(Path(images_dir), str(child.attrGet("src"))))
    body = [md.renderer.render(tokens, md.options, {})]
    for heading, name, data in trailing_images:
        image = f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
        body.append(f"<h2>{html.escape(heading)}</h2>{image}")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")  # fmt: skip


def _data_uri(images_dir: Path, src: str) -> str:
    """`src` (relative to `images_dir`, as markdown-it percent-encoded it) as a data URI; URLs are kept."""
    from urllib.parse import unquote

    if ":" in src.split("/", 1)[0]:  # http:, https:, data: ...: not a local file
        return src
    path = images_dir / unquote(src)
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
            ".svg": "image/svg+xml", ".webp": "image/webp"}.get(path.suffix.lower(), "application/octet-stream")  # fmt: skip
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def write_report(judgments_dir: str | Path, out_dir: str | Path, baseline: str | None = None, rounds: int = 1000,
                 seed: int = 0, extra: dict[str, list[dict]] | None = None, votes: list[dict] | None = None,
                 answers: dict | None = None) -> dict[str, Path]:  # fmt: skip
    report = build_report(judgments_dir, baseline, rounds, seed, extra, votes, answers)
    markdown = to_markdown(report)
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_text(paths["html"], to_html(report, markdown))
    return paths
