"""Probability-weighted verdicts (`scoring=expected`, G-Eval's idea): instead of the one score the
judge sampled, the judge's whole distribution over the score tokens where it wrote its verdict.

At the verdict's token (found in the reply by the parser's own rules, see parsing.verdict_span), the
endpoint's `top_logprobs` give the most likely tokens there. Each one whose text is a valid verdict
(an integer on the prompt's scale; `A` / `B` / `C` for pairwise) counts; the others (words,
punctuation, an out-of-range number) are left out, and the rest renormalised:

    expected score = sum_s p(s) * s / sum_s p(s)      over the valid score tokens s

`mass` (sum_s p(s) before renormalising) says how much of the distribution that covers. Token text
is compared stripped of spaces, brackets, quotes and commas (`" 8"`, `"[[8"`, `"\"A"` are 8, 8, A).

Numbers written in more than one token: where the tokenizer splits `10` into `1` + `0`, `1` at the
verdict position is both a verdict of 1 and the start of 10. When the judge wrote that `1`, the next
position's top_logprobs split it: p(10) = p(1 . . .) * p(next is `0`), p(1) = p(1 . . .) * p(next is
not a digit). When the judge wrote another score, what follows `1` is unknown: p(`1`) counts as 1 and
is recorded as `ambiguous_mass`. Where a multi-digit number is among the alternatives, the tokenizer
has whole-number tokens (GPT-4's, Llama 3's): each alternative is its own number, exactly.

Every judgment that gets no expected value records why (`expected_fallback`), and keeps its parsed
verdict: no logprobs in the reply, an unparseable reply, a verdict whose position cannot be found
in the tokens, or no valid verdict token among the alternatives there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from corral.eval.client import TokenLogprob

_STRIP = " \t\n\r[]\"',"

NO_LOGPROBS = "no logprobs in the reply"
UNPARSED = "unparseable reply: no verdict to weigh"
NOT_SPELLED = "the logprob tokens do not spell the reply"
NO_POSITION = "the verdict's position was not found in the reply"
SHARED_TOKEN = "the verdict shares its token with other text"
NO_CANDIDATE = "no valid verdict token among the top_logprobs at the verdict position"


@dataclass(frozen=True)
class Weighed:
    """The judge's distribution over the valid verdicts at the verdict position."""

    probs: dict  # verdict -> probability, renormalised over the valid verdicts (sums to 1)
    mass: float  # their probability before renormalising
    ambiguous_mass: float = 0.0  # p of a `1` that could have begun a `10` (see the module doc)
    position: int = 0  # index of the verdict's token in the reply's tokens

    def expected(self) -> float:
        return sum(float(v) * p for v, p in self.probs.items())


def _norm(token: str) -> str:
    return token.strip(_STRIP)


def token_offsets(tokens: list[TokenLogprob], reply: str) -> list[int] | None:
    """The byte offset in `reply` (UTF-8) where each token starts, or None when the tokens, joined,
    are not the reply. A token's `bytes` are used where the server sent them (a character split across
    tokens has no text of its own), its text otherwise."""
    offsets, at, joined = [], 0, []
    for t in tokens:
        data = t.bytes if t.bytes is not None else t.token.encode("utf-8")
        offsets.append(at)
        joined.append(data)
        at += len(data)
    return offsets if b"".join(joined) == reply.encode("utf-8") else None


def _alternatives(token: TokenLogprob) -> dict[str, float]:
    """Probability per normalised text at one position: the top_logprobs, and the written token where
    the server left it out of them (sampling can pick a token outside the top K)."""
    probs: dict[str, float] = {}
    seen = set()
    for text, logprob in token.top:
        if text in seen:
            continue
        seen.add(text)
        probs[_norm(text)] = probs.get(_norm(text), 0.0) + math.exp(logprob)
    if token.token not in seen:
        probs[_norm(token.token)] = probs.get(_norm(token.token), 0.0) + math.exp(token.logprob)
    return probs


def weigh(tokens: list[TokenLogprob] | None, reply: str, span: tuple[int, int] | None,
          values: dict[str, object]) -> tuple[Weighed | None, str | None]:
    """(Weighed, None), or (None, why). `span` is the verdict's (start, end) in `reply` (characters);
    `values` maps each valid verdict text (`"8"`, `"A"`) to its value (8, "A")."""
    if tokens is None:
        return None, NO_LOGPROBS
    if span is None:
        return None, NO_POSITION
    offsets = token_offsets(tokens, reply)
    if offsets is None:
        return None, NOT_SPELLED
    start = len(reply[: span[0]].encode("utf-8"))
    sizes = [len(t.bytes if t.bytes is not None else t.token.encode("utf-8")) for t in tokens]
    holding = [i for i, at in enumerate(offsets) if at <= start < at + sizes[i]]  # the token holding that byte
    if not holding:
        return None, NO_POSITION
    index = holding[0]
    written, verdict = tokens[index], reply[span[0]: span[1]]
    data = written.bytes if written.bytes is not None else written.token.encode("utf-8")
    before = data[: start - offsets[index]].decode("utf-8", "replace")
    if before.strip(_STRIP) or not verdict.startswith(_norm(written.token)) or not _norm(written.token):
        return None, SHARED_TOKEN
    written_text = _norm(written.token)
    alternatives = _alternatives(written)
    # a tokenizer with a token for `10` writes 10 in one piece: a `1` there is a 1, not a 10 begun
    whole_numbers = any(len(text) > 1 and text.isdigit() for text in alternatives)
    probs: dict[object, float] = {}
    ambiguous = 0.0
    for text, p in alternatives.items():
        longer = [v for v in values if v != text and v.startswith(text) and v[len(text):].isdigit()]
        if not longer or whole_numbers:
            if text in values:
                probs[values[text]] = probs.get(values[text], 0.0) + p
            continue
        if text == written_text and index + 1 < len(tokens):  # the next position says how the number goes on
            for following, q in _following(tokens[index + 1]).items():
                number = text + following
                if number in values:
                    probs[values[number]] = probs.get(values[number], 0.0) + p * q
        elif text in values:
            probs[values[text]] = probs.get(values[text], 0.0) + p
            ambiguous += p
    mass = sum(probs.values())
    if mass <= 0:
        return None, NO_CANDIDATE
    return Weighed({v: p / mass for v, p in sorted(probs.items())}, mass, ambiguous, index), None


def _following(token: TokenLogprob) -> dict[str, float]:
    """At the position after a number's first token: probability of each digit string it goes on with
    ("" for: the number ends here), from the raw token text."""
    probs: dict[str, float] = {}
    seen = set()
    pairs = list(token.top) + ([] if any(t == token.token for t, _ in token.top) else [(token.token, token.logprob)])
    for text, logprob in pairs:
        if text in seen:
            continue
        seen.add(text)
        digits = len(text) - len(text.lstrip("0123456789"))
        probs[text[:digits]] = probs.get(text[:digits], 0.0) + math.exp(logprob)
    return probs


def score_values(low: int, high: int) -> dict[str, float]:
    return {str(s): float(s) for s in range(low, high + 1)}


PAIRWISE_VALUES = {"A": "A", "B": "B", "C": "tie", "tie": "tie"}
