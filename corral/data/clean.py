"""Fit conversations to the context: split long ones at turn boundaries (as Vicuna did).

A conversation longer than `max_len` tokens is cut between exchanges (a user turn and its reply) into
pieces that each keep the system prompt. A piece grows while its rendering still fits, so a piece is the
longest run of exchanges that fits; the last exchange always lands in a piece, even when it is the one that
overflows (FastChat's splitter drops it).

Finding where a piece ends renders candidate pieces, and rendering is the cost. Trying every growing
candidate (as this module once did) renders each exchange once per exchange after it in the same piece:
quadratic in the number of turns. Instead the full conversation's rendering, which is needed anyway to
know it is too long, tells roughly where each reply ends in tokens; that gives a guess of each piece's end,
and a search around the guess renders about two candidates per piece, so the work is linear in the length
of the conversation. The pieces are exactly those of growing one exchange at a time, because a longer
piece never renders shorter (checked against that rule in tests/unit/test_data_clean.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from corral.chat.conversation import Conversation, Message
from corral.chat.templates import IGNORE_INDEX


@dataclass
class Sample:
    """One training sequence. `targets[t]` is the token predicted at position t (labels shifted by one)."""

    input_ids: list[int]
    targets: list[int]
    source: str = ""

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class SplitReport:
    conversations: int = 0
    samples: int = 0
    split: int = 0  # conversations split into several samples
    truncated: int = 0  # samples cut inside a reply (one exchange longer than max_len)
    dropped: int = 0  # samples with no trained token left (a prompt longer than max_len)
    dropped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.conversations} conversations -> {self.samples} samples ({self.split} split at turn boundaries"
        text += f", {self.truncated} truncated inside a reply, {self.dropped} dropped with no trained token left)"
        if self.dropped_examples:
            text += f"; dropped e.g. {', '.join(self.dropped_examples[:3])}"
        return text


def to_sample(input_ids: list[int], labels: list[int], source: str = "") -> Sample:
    # Shift once, per sample: then packing can never make one sample predict the next one's first token.
    return Sample(input_ids, labels[1:] + [IGNORE_INDEX], source)


def exchanges_of(conv: Conversation) -> list[list[Message]]:
    """The turns in exchanges: [user, assistant], ... (a trailing user turn is an exchange of its own)."""
    turns = conv.turns
    return [turns[i : i + 2] for i in range(0, len(turns), 2)]


def _reply_ends(labels: list[int], replies: int) -> list[int] | None:
    """Token index just past each trained run (a reply and its end-of-turn) of a rendering, or None when
    the runs do not match the replies one to one (an empty reply with no end token, say)."""
    ends, inside = [], False
    for t, label in enumerate(labels):
        trained = label != IGNORE_INDEX
        if inside and not trained:
            ends.append(t)
        inside = trained
    if inside:
        ends.append(len(labels))
    return ends if len(ends) == replies else None


def _last_fitting(lo: int, hi: int, guess: int, fits: Callable[[int], bool]) -> int:
    """The largest k in [lo, hi] with fits(k), where fits(lo) is taken as true and fits is monotone (true up
    to some k, then false). Probes next to `guess` with doubling steps, then bisects: two calls when the guess
    is right, O(log) when it is not."""
    guess = min(max(guess, lo), hi)
    step = 1
    if guess > lo and not fits(guess):
        good, bad = lo, guess
        while bad - step > good:
            if fits(bad - step):
                good = bad - step
                break
            bad, step = bad - step, step * 2
    else:
        good, bad = guess, hi + 1
        while good + step <= hi:
            if not fits(good + step):
                bad = good + step
                break
            good, step = good + step, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


Rendered = tuple[list[int], list[int]]


def plan_pieces(conv: Conversation, fmt, max_len: int,
                rendered: Rendered | None = None) -> list[tuple[int, int, Rendered]]:
    """Where to cut `conv`: pieces as exchange ranges [start, end) with each piece's rendering (ids, labels),
    the system prompt included. One piece when the whole conversation fits. A piece of one exchange may
    still be longer than max_len (its single exchange is); the caller decides what to do with it."""
    ids, labels = rendered if rendered is not None else fmt.render_with_masks(conv)
    exchanges = exchanges_of(conv)
    n = len(exchanges)
    if len(ids) <= max_len:
        return [(0, n, (ids, labels))]
    system = [conv.messages[0]] if conv.system is not None else []
    renders: dict[tuple[int, int], Rendered] = {(0, n): (ids, labels)}

    def render(start: int, end: int) -> Rendered:
        if (start, end) not in renders:
            turns = [m for exchange in exchanges[start:end] for m in exchange]
            renders[start, end] = fmt.render_with_masks(Conversation(system + turns, source=conv.source))
        return renders[start, end]

    ends = _reply_ends(labels, sum(len(e) == 2 for e in exchanges))
    if ends is not None and len(ends) < n:  # a trailing user turn: its span runs to the end
        ends.append(len(ids))

    def span(start: int, end: int) -> int:  # tokens of exchanges [start, end) in the full rendering
        return ends[end - 1] - (ends[start - 1] if start else 0)

    # A piece renders `offset` tokens more than its span: the template's closing text for the first piece,
    # plus the header (start, system prompt) for the others. Measured once, then on every piece made.
    pieces, start, offset = [], 0, 0
    while start < n:
        def fits(end: int, start: int = start) -> bool:
            return len(render(start, end)[0]) <= max_len

        guess = start + 1
        if ends is not None:
            if len(pieces) == 1:  # the second piece: the first with a header of its own
                offset = len(render(start, start + 1)[0]) - span(start, start + 1)
            while guess < n and span(start, guess + 1) + offset <= max_len:
                guess += 1
        end = _last_fitting(start + 1, n, guess, fits)
        piece = render(start, end)
        if ends is not None:
            offset = len(piece[0]) - span(start, end)
        pieces.append((start, end, piece))
        start = end
    return pieces


def split_long(conv: Conversation, fmt, max_len: int) -> tuple[list[Conversation], int]:
    """`conv` as conversations of at most max_len tokens, cut where training would cut it (`plan_pieces`),
    for `data clean`. Returns (pieces, how many are still longer than max_len: a single long exchange,
    which training truncates). A piece's id is the conversation's id and its first turn's index."""
    pieces = plan_pieces(conv, fmt, max_len)
    too_long = sum(len(ids) > max_len for _, _, (ids, _) in pieces)
    if len(pieces) == 1:
        return [conv], too_long
    system = [conv.messages[0]] if conv.system is not None else []
    exchanges = exchanges_of(conv)
    out = []
    for k, (start, end, _) in enumerate(pieces):
        turns = [m for exchange in exchanges[start:end] for m in exchange]
        out.append(Conversation(system + turns, source=f"{conv.source} (part {k + 1}/{len(pieces)})",
                                id=f"{conv.id}_{2 * start}" if conv.id else "", meta=dict(conv.meta)))
    return out, too_long


def split_conversation(conv: Conversation, fmt, max_len: int,
                       rendered: Rendered | None = None) -> tuple[list[Sample], int, int]:
    """Render `conv`; if longer than max_len, split between exchanges (user + assistant).

    Each piece keeps the system prompt; a piece still longer than max_len (one exchange is) is truncated, and
    one left with no trained token dropped. Returns (samples, truncated, dropped). `rendered` is the
    conversation's rendering when the caller already has it."""
    pieces = plan_pieces(conv, fmt, max_len, rendered)
    if len(pieces) == 1 and len(pieces[0][2][0]) <= max_len:
        ids, labels = pieces[0][2]
        return [to_sample(ids, labels, conv.source)], 0, 0
    samples, truncated, dropped = [], 0, 0
    for k, (_, _, (ids, labels)) in enumerate(pieces):
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            truncated += 1
        sample = to_sample(ids, labels, f"{conv.source} (part {k + 1}/{len(pieces)})")
        if sample.num_targets == 0:
            dropped += 1
            continue
        samples.append(sample)
    return samples, truncated, dropped


def conversations_to_samples(conversations: list[Conversation], fmt, max_len: int) -> tuple[list[Sample], SplitReport]:
    """Training samples of `conversations`. Raises DataError when conversations go in and no sample comes
    out, with the reason, rather than leaving an empty data set to fail later with a division by zero."""
    report = SplitReport(conversations=len(conversations))
    samples: list[Sample] = []
    for conv in conversations:
        pieces, truncated, dropped = split_conversation(conv, fmt, max_len)
        report.split += len(pieces) + dropped > 1
        report.truncated += truncated
        report.dropped += dropped
        if dropped:
            report.dropped_examples.append(conv.source)
        samples += pieces
    report.samples = len(samples)
    if conversations and not samples:
        from corral.data.formats import DataError

        raise DataError(f"0 samples left: {report.dropped} dropped because no trained token was left within "
                        f"max_len={max_len} tokens (the prompt alone is longer), e.g. "
                        f"{', '.join(report.dropped_examples[:3])}; raise max_len or shorten the prompts")
    return samples, report
