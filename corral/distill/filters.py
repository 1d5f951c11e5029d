"""Which generated instructions are kept: Lion's filters, a repetition check, and ROUGE-L de-duplication.

The filters are Lion's (`generate_hard_instruction.py`): a reply containing "instruction" (it talks about the
task instead of being one), cut at max_tokens, of 3 words or fewer, starting with punctuation or with a
non-ASCII character. Ours adds degenerate repetition (a small generator loops). A candidate that passes is
compared with the cache pool and with the candidates kept before it: ROUGE-L F-measure above the threshold
(Lion's 0.7) drops it.

ROUGE-L is written here rather than taken from `rouge-score`, with that package's default tokenizer
(lowercase; runs of characters other than a-z and 0-9 split words; no stemming), so scores equal its
`RougeScorer(["rougeL"]).score(a, b).fmeasure`. The score is symmetric: F = 2PR / (P + R) with P = LCS / len(a),
R = LCS / len(b).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

_NON_ALNUM = re.compile(r"[^a-z0-9]+")

# The reasons a candidate is dropped, in the order they are checked (the first that applies is recorded).
EMPTY = "empty"
CUT = "cut at max_tokens"
MENTIONS_INSTRUCTION = "contains 'instruction'"
TOO_SHORT = "3 words or fewer"
PUNCTUATION = "starts with punctuation"
NON_ASCII = "starts with a non-ASCII character"
REPETITION = "degenerate repetition"
DUPLICATE = "exact duplicate"
SIMILAR_CACHE = "similar to the cache pool"
SIMILAR_NEW = "similar to another new instruction"
REASONS = (EMPTY, CUT, MENTIONS_INSTRUCTION, TOO_SHORT, PUNCTUATION, NON_ASCII, REPETITION, DUPLICATE,
           SIMILAR_CACHE, SIMILAR_NEW)  # fmt: skip


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lowercase, anything but a-z / 0-9 separates words."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists (0 when either is empty)."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


class SimilarityIndex:
    """Instructions to compare new ones with. `most_similar` skips, without computing the LCS, every entry
    whose bound 2 * |common tokens| / (len(a) + len(b)) (the LCS is at most the shared multiset) cannot
    exceed the best found so far or the threshold: with a large pool most pairs never reach the table."""

    def __init__(self, texts: list[str] = ()):
        self.tokens: list[list[str]] = []
        self.counts: list[Counter] = []
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        tokens = rouge_tokens(text)
        self.tokens.append(tokens)
        self.counts.append(Counter(tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    def first_above(self, text: str, threshold: float) -> tuple[int, float] | None:
        """(index, score) of the first entry whose ROUGE-L with `text` is above `threshold`, or None."""
        tokens = rouge_tokens(text)
        counts = Counter(tokens)
        for i, (other, other_counts) in enumerate(zip(self.tokens, self.counts)):
            if not tokens or not other:
                continue
            common = sum((counts & other_counts).values())
            if 2 * common / (len(tokens) + len(other)) <= threshold:
                continue
            score = rouge_l(tokens, other)
            if score > threshold:
                return i, score
        return None


def is_degenerate(text: str, min_distinct_trigrams: float) -> bool:
    """A text of 6 words or more whose distinct word trigrams (case ignored) are fewer than
    `min_distinct_trigrams` of all its trigrams: "the cat the cat the cat" has 2 distinct of 4."""
    words = text.lower().split()
    if min_distinct_trigrams <= 0 or len(words) < 6:
        return False
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < min_distinct_trigrams * len(trigrams)


def rejection(text: str, finish_reason: str, min_distinct_trigrams: float = 0.5) -> str | None:
    """Why a generated instruction is dropped by the per-candidate filters, or None when it passes."""
    if not text:
        return EMPTY
    if finish_reason == "length":
        return CUT
    if "instruction" in text.lower():
        return MENTIONS_INSTRUCTION
    if len(text.split()) <= 3:
        return TOO_SHORT
    if text[0] in string.punctuation:
        return PUNCTUATION
    if not text[0].isascii():
        return NON_ASCII
    if is_degenerate(text, min_distinct_trigrams):
        return REPETITION
    return None


@dataclass(frozen=True)
class Verdict:
    kept: bool
    reason: str | None = None  # one of REASONS when dropped
    similar_to: str | None = None  # the instruction it was too close to
    similarity: float | None = None


class CandidateFilter:
    """Decides candidates one at a time, in a fixed order: a kept candidate joins what later ones are
    compared with, so the outcome depends on the order only, never on timing."""

    def __init__(self, cache_prompts: list[str], threshold: float, min_distinct_trigrams: float):
        self.threshold, self.min_distinct_trigrams = threshold, min_distinct_trigrams
        self.cache_texts = list(cache_prompts)
        self.cache = SimilarityIndex(self.cache_texts)
        self.new_texts: list[str] = []
        self.new = SimilarityIndex()
        self.seen = {" ".join(text.split()) for text in self.cache_texts}

    def decide(self, text: str, finish_reason: str) -> Verdict:
        reason = rejection(text, finish_reason, self.min_distinct_trigrams)
        if reason:
            return Verdict(False, reason)
        normalised = " ".join(text.split())
        if normalised in self.seen:
            return Verdict(False, DUPLICATE, similar_to=normalised, similarity=1.0)
        for index, texts, reason in ((self.cache, self.cache_texts, SIMILAR_CACHE), (self.new, self.new_texts, SIMILAR_NEW)):
            hit = index.first_above(text, self.threshold)
            if hit is not None:
                return Verdict(False, reason, similar_to=texts[hit[0]], similarity=round(hit[1], 4))
        self.seen.add(normalised)
        self.new.add(text)
        self.new_texts.append(text)
        return Verdict(True)
