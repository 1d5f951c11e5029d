"""How far judges can be trusted: agreement between two judges (or a judge and people), and each
judge's position consistency.

- Pairwise verdicts: Cohen's kappa between two judges over the items both judged (a question turn
  and a pair of models), on the outcome after the position-swap rule (report.resolve_pairwise: a
  verdict that flips with the order is a tie), with three categories: one model wins, the other
  wins, tie. Where a judge has several votes on an item (people: MT-bench's human judgments have
  several experts per item), every pair of votes of the two judges counts once, as FastChat's
  compute_agreement.py counts them. The share of agreeing votes is given with and without ties
  (an item where either vote is a tie left out), MT-bench's two agreement figures.
- Single scores: Spearman's rank correlation between two judges' scores of the same answer turns
  (ranks averaged over ties, then Pearson's correlation of the ranks).
- Position consistency (MT-bench's "consistency"): the share of pairs judged in both orders whose
  verdict names the same model (or tie) both times; the flips split into "biased toward the first
  position" (A both times), "toward the second" (B both times), and the rest (a tie in one order).

    kappa = (p_o - p_e) / (1 - p_e),   p_o = share of agreeing votes,
    p_e = sum_k p1(k) p2(k), the agreement two judges with these label frequencies reach by chance.

Kappa is None (undefined) when p_e = 1: both judges gave one and the same label to everything.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

import numpy as np

from corral.data.formats import DataError, iter_records


def cohen_kappa(labels_1: list, labels_2: list) -> float | None:
    """Cohen's kappa of two equally long label lists (vote pairs); None when undefined (no votes, or
    chance agreement 1)."""
    if len(labels_1) != len(labels_2):
        raise ValueError(f"cohen_kappa: {len(labels_1)} labels against {len(labels_2)}")
    n = len(labels_1)
    if not n:
        return None
    observed = sum(a == b for a, b in zip(labels_1, labels_2)) / n
    count_1, count_2 = Counter(labels_1), Counter(labels_2)
    chance = sum(count_1[k] * count_2[k] for k in count_1) / (n * n)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def average_ranks(values) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span (`[10, 20, 20, 30]` -> `[1, 2.5, 2.5, 4]`)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rho with average ranks for ties; None for fewer than 2 pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else None


# ---------------------------------------------------------------------------------------------
# Votes: one outcome per judge, item and vote


def item_key(question_id, turn, model_x: str, model_y: str) -> tuple:
    """A question turn and an unordered model pair (sorted)."""
    a, b = sorted((model_x, model_y))
    return (question_id, turn, a, b)


def votes_from_games(games: list[dict]) -> dict[str, dict[tuple, list[str]]]:
    """{judge: {item: [winner]}} from resolved games (winner: a model's name or `tie`)."""
    votes: dict[str, dict[tuple, list[str]]] = defaultdict(lambda: defaultdict(list))
    for g in games:
        votes[g["judge"]][item_key(g["question_id"], g["turn"], g["model_a"], g["model_b"])].append(g["winner"])
    return votes


def _human_judge(judge) -> str:
    """FastChat's compute_agreement.py names: `expert_*` votes are `human`, `author_*` are `author`; a
    [model, prompt] list is the model."""
    if isinstance(judge, list):
        return str(judge[0]) if judge else "unknown"
    judge = str(judge)
    return "human" if judge.startswith("expert") else "author" if judge.startswith("author") else judge


def read_votes(path) -> list[dict]:
    """Pairwise votes in MT-bench's human-judgment layout (lmsys/mt_bench_human_judgments, FastChat's
    compute_agreement.py): records with `question_id`, `turn`, `model_a`, `model_b`, `winner`
    (`model_a`, `model_b`, `tie`, `tie (bothbad)`) and `judge`; JSONL or a JSON list. Returns
    {judge, question_id, turn, model_a, model_b, winner: model name or tie}; errors name file, record, field."""
    votes = []
    for where, row in iter_records(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("question_id", "turn", "model_a", "model_b", "winner", "judge"):
            if key not in row:
                raise DataError(f"{where}: field '{key}': missing (a vote needs question_id, turn, model_a, model_b, "
                                "winner, judge)")  # fmt: skip
        if not isinstance(row["turn"], int) or row["turn"] < 1:
            raise DataError(f"{where}: field 'turn': expected 1, 2, ..., got {row['turn']!r}")
        winner = row["winner"]
        if winner == "model_a" or winner == "model_b":
            winner = row[winner]
        elif isinstance(winner, str) and winner.startswith("tie"):
            winner = "tie"
        else:
            raise DataError(f"{where}: field 'winner': expected model_a, model_b or tie, got {winner!r}")
        votes.append({"judge": _human_judge(row["judge"]), "question_id": row["question_id"], "turn": row["turn"],
                      "model_a": row["model_a"], "model_b": row["model_b"], "winner": winner})  # fmt: skip
    return votes


def pairwise_agreement(votes: dict[str, dict[tuple, list[str]]]) -> list[dict]:
    """For each pair of judges: vote pairs on common items, agreement (with and without ties), kappa."""
    rows = []
    for j1, j2 in combinations(sorted(votes), 2):
        common = sorted(set(votes[j1]) & set(votes[j2]), key=str)
        labels_1, labels_2 = [], []
        for item in common:
            for v1 in votes[j1][item]:
                for v2 in votes[j2][item]:
                    labels_1.append(v1)
                    labels_2.append(v2)
        decided = [(a, b) for a, b in zip(labels_1, labels_2) if a != "tie" and b != "tie"]
        n = len(labels_1)
        rows.append({"judges": [j1, j2], "items": len(common), "votes": n,
                     "agreement": sum(a == b for a, b in zip(labels_1, labels_2)) / n if n else None,
                     "kappa": cohen_kappa(labels_1, labels_2),
                     "votes_without_ties": len(decided),
                     "agreement_without_ties": sum(a == b for a, b in decided) / len(decided) if decided else None})  # fmt: skip
    return rows


def single_agreement(records: list[dict]) -> list[dict]:
    """For each pair of judges: Spearman's rho of their parsed scores on the answer turns both scored
    (one score per judge and answer turn: the last one recorded)."""
    scores: dict[str, dict[tuple, float]] = defaultdict(dict)
    for r in records:
        if r.get("parsed"):
            scores[r["judge"]][(r["question_id"], r["turn"], r["model"])] = float(r["score"])
    rows = []
    for j1, j2 in combinations(sorted(scores), 2):
        common = sorted(set(scores[j1]) & set(scores[j2]), key=str)
        x, y = [scores[j1][k] for k in common], [scores[j2][k] for k in common]
        rows.append({"judges": [j1, j2], "items": len(common), "spearman": spearman(x, y),
                     "mean_abs_difference": float(np.mean(np.abs(np.subtract(x, y)))) if common else None})  # fmt: skip
    return rows


def position_consistency(records: list[dict]) -> dict[str, dict]:
    """Per judge, over the pairs it judged in both orders with both verdicts parsed: the share
    consistent, biased toward the first position, toward the second, and other flips."""
    latest = {}
    for r in records:
        latest[(r["judge"], r["question_id"], r["turn"], r["model_1"], r["model_2"])] = r
    out: dict[str, dict] = {}
    counts: dict[str, Counter] = defaultdict(Counter)
    for (judge, qid, turn, m1, m2), first in latest.items():
        if m1 > m2:
            continue  # each pair once: from the order with the smaller name first
        second = latest.get((judge, qid, turn, m2, m1))
        if second is None:
            continue
        c = counts[judge]
        if not (first.get("parsed") and second.get("parsed")):
            c["unparseable"] += 1
            continue
        c["pairs"] += 1
        if first["winner"] == second["winner"]:
            c["consistent"] += 1
        elif first.get("verdict") == second.get("verdict") == "A":
            c["biased_first"] += 1
        elif first.get("verdict") == second.get("verdict") == "B":
            c["biased_second"] += 1
        else:
            c["other_flip"] += 1
    for judge, c in sorted(counts.items()):
        n = c["pairs"]
        out[judge] = {"pairs": n, "unparseable_pairs": c["unparseable"],
                      **{k: c[k] / n if n else None for k in ("consistent", "biased_first", "biased_second", "other_flip")}}  # fmt: skip
    return out
