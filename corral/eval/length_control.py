"""Length-controlled win rate: AlpacaEval 2's idea, in a small version that says exactly what it fits.

Judges prefer longer answers, so a model can raise its win rate by writing more. For one model
against one opponent, over the games between them (one per question turn, after the position-swap
rule), fit a logistic model of the outcome on the length difference:

    P(model wins game i) = sigmoid(b0 + b1 * tanh(d_i / sd(d)))

where d_i = characters of the model's answer - characters of the opponent's (the judged turn's
answers), sd(d) is the standard deviation of d over these games (population, ddof 0; no scaling
when every d is equal), and the outcome y_i is 1 for a win, 0 for a loss and 1/2 for a tie. b0 and
b1 maximise sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - l2/2 (b0^2 + b1^2) (Newton's method with
step halving; the tiny `l2` keeps a fit finite when the outcome is separable by length). The
length-controlled win rate is the fitted model's win rate at zero length difference, sigmoid(b0).

What AlpacaEval 2 fits and this does not: one model over all models at once, with a per-instruction
difficulty term. With two points of d only (x and -x), the fit is exact: a model whose wins are
explained by length alone (win share q when longer, 1 - q when shorter) gets exactly 1/2.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))


def fit_length_model(outcomes, length_diffs, l2: float = 1e-6, max_steps: int = 100) -> dict:
    """outcomes (N,) in [0, 1] (1 win, 0 loss, 1/2 tie) and length_diffs (N,) in characters (model -
    opponent). Returns intercept b0, length_coef b1, length_sd, win_rate (mean outcome) and
    lc_win_rate = sigmoid(b0)."""
    y = np.asarray(outcomes, dtype=float)
    d = np.asarray(length_diffs, dtype=float)
    if y.shape != d.shape or y.ndim != 1 or not len(y):
        raise ValueError(f"fit_length_model: outcomes {y.shape} and length_diffs {d.shape} must be equal, non-empty (N,)")
    if ((y < 0) | (y > 1)).any():
        raise ValueError("fit_length_model: outcomes must lie in [0, 1]")
    sd = float(d.std())
    z = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    features = np.column_stack([np.ones_like(z), z])
    beta = np.zeros(2)

    def loss(b: np.ndarray) -> float:
        eta = features @ b
        return float(-(y * eta - np.logaddexp(0.0, eta)).sum() + 0.5 * l2 * (b @ b))

    for _ in range(max_steps):
        p = _sigmoid(features @ beta)
        grad = features.T @ (p - y) + l2 * beta
        hess = features.T @ (features * (p * (1 - p))[:, None]) + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale, current = 1.0, loss(beta)
        while loss(beta - scale * step) > current and scale > 1e-8:  # Newton can overshoot: halve until it helps
            scale /= 2
        beta = beta - scale * step
        if np.abs(scale * step).max() < 1e-12:
            break
    return {"intercept": float(beta[0]), "length_coef": float(beta[1]), "length_sd": sd,
            "win_rate": float(y.mean()), "lc_win_rate": float(_sigmoid(beta[0]))}  # fmt: skip


def length_controlled(games: list[dict], baseline: str | None = None, l2: float = 1e-6, rounds: int = 200,
                      seed: int = 0) -> list[dict]:  # fmt: skip
    """One row per model pair: the games with both answers' lengths (`length_a`, `length_b`), the raw
    win rate (ties half) and the length-controlled one with a bootstrap 95% interval over games
    (`rounds` resamples; a wide one says the fit rests on few games). With `baseline`, each model
    against it; else the first model of the pair (sorted) against the second."""
    pairs: dict[tuple[str, str], list[dict]] = {}
    for g in games:
        pairs.setdefault((g["model_a"], g["model_b"]), []).append(g)
    rows = []
    for (a, b), rows_of_pair in sorted(pairs.items()):
        model, opponent = (b, a) if baseline == a else (a, b)
        measured = [g for g in rows_of_pair if g.get("length_a") is not None and g.get("length_b") is not None]
        row = {"model": model, "opponent": opponent, "games": len(measured),
               "games_without_length": len(rows_of_pair) - len(measured)}  # fmt: skip
        if len(measured) >= 2:
            y = [1.0 if g["winner"] == model else 0.0 if g["winner"] == opponent else 0.5 for g in measured]
            d = [(g["length_a"] - g["length_b"]) * (1 if model == g["model_a"] else -1) for g in measured]
            row.update(fit_length_model(y, d, l2=l2))
            row["mean_length_difference"] = float(np.mean(d))
            rng = np.random.default_rng(seed)
            y_arr, d_arr = np.asarray(y), np.asarray(d, dtype=float)
            samples = []
            for _ in range(rounds):
                pick = rng.integers(0, len(y_arr), len(y_arr))
                samples.append(fit_length_model(y_arr[pick], d_arr[pick], l2=l2)["lc_win_rate"])
            row["lc_ci95"] = (float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))) if samples else None
        rows.append(row)
    return rows
