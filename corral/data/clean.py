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
piece never renders shorter (checked against that rule in tests/unit/test_clean_pack.py).

`data clean` needs the cuts, not the renderings: `split_long` measures candidate pieces by UnitLengths
(each distinct unit of text tokenized once, in batches; pieces share their units with the whole) and
skips tokenizing altogether when the rendering has no more bytes than max_len and the tokenizer cannot
make more tokens than bytes. The cuts are the same `_plan` makes from renderings (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from corral.chat.conversation import Conversation, Message
from corral.chat.templates import IGNORE_INDEX, check_conversation, merge_segments
from corral.data.tokencount import PieceCounts


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
    """The turns in exchanges: [user, assistant], ... (a trailing user turn is an exchange of its own). With
    tool use an exchange runs from a user message to the next: [user, assistant with calls, tool, ...,
    assistant], so a cut never separates a call from its results."""
    exchanges: list[list[Message]] = []
    for message in conv.turns:
        if message.role == "user" or not exchanges:
            exchanges.append([message])
        else:
            exchanges[-1].append(message)
    return exchanges


def _replies(exchanges: list[list[Message]]) -> int:
    return sum(m.role == "assistant" for exchange in exchanges for m in exchange)


def _exchange_ends(reply_ends: list[int] | None, exchanges: list[list[Message]]) -> list[int] | None:
    """The token index past each exchange's last reply, from the index past each reply (`_reply_ends`)."""
    if reply_ends is None:
        return None
    ends, k = [], 0
    for exchange in exchanges:
        replies = sum(m.role == "assistant" for m in exchange)
        if not replies:  # a trailing user turn
            break
        k += replies
        ends.append(reply_ends[k - 1])
    return ends


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


def _plan(n: int, full_length: int, ends: list[int] | None, max_len: int,
          length: Callable[[int, int], int]) -> list[tuple[int, int]]:
    """Exchange ranges [start, end) of the pieces, given the whole rendering's length, the token index past
    each exchange in it (`ends`, or None when unknown) and `length(start, end)`, a piece's rendered length
    (the caller caches it: a piece's end is probed about twice)."""
    if full_length <= max_len:
        return [(0, n)]

    def span(start: int, end: int) -> int:  # tokens of exchanges [start, end) in the full rendering
        return ends[end - 1] - (ends[start - 1] if start else 0)

    # A piece renders `offset` tokens more than its span: the template's closing text for the first piece,
    # plus the header (start, system prompt) for the others. Measured once, then on every piece made.
    pieces: list[tuple[int, int]] = []
    start, offset = 0, 0
    while start < n:
        def fits(end: int, start: int = start) -> bool:
            return length(start, end) <= max_len

        guess = start + 1
        if ends is not None:
            if len(pieces) == 1:  # the second piece: the first with a header of its own
                offset = length(start, start + 1) - span(start, start + 1)
            while guess < n and span(start, guess + 1) + offset <= max_len:
                guess += 1
        end = _last_fitting(start + 1, n, guess, fits)
        if ends is not None:
            offset = length(start, end) - span(start, end)
        pieces.append((start, end))
        start = end
    return pieces


def _piece(conv: Conversation, exchanges: list[list[Message]], start: int, end: int, **fields) -> Conversation:
    system = [conv.messages[0]] if conv.system is not None else []
    turns = [m for exchange in exchanges[start:end] for m in exchange]
    return Conversation(system + turns, **({"source": conv.source, "tools": conv.tools} | fields))


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
    renders: dict[tuple[int, int], Rendered] = {(0, n): (ids, labels)}

    def render(start: int, end: int) -> Rendered:
        if (start, end) not in renders:
            renders[start, end] = fmt.render_with_masks(_piece(conv, exchanges, start, end))
        return renders[start, end]

    ends = _exchange_ends(_reply_ends(labels, _replies(exchanges)), exchanges)
    if ends is not None and len(ends) < n:  # a trailing user turn: its span runs to the end
        ends.append(len(ids))
    cuts = _plan(n, len(ids), ends, max_len, lambda start, end: len(render(start, end)[0]))
    return [(start, end, render(start, end)) for start, end in cuts]


class UnitLengths:
    """Token counts of a template's renderings without building them. A rendering tokenizes each of its
    units (a run of segments with the same trained flag, templates.merge_segments) on its own, so its length
    is the sum of its units' lengths; and the pieces of a conversation share nearly all their units with it
    (every exchange of a piece but its first renders the same text as in the whole). So each distinct unit is
    tokenized once, in one batch per rendering, through the tokenizer's own batch call (the fast tokenizer's
    Rust loop) rather than once per unit per candidate piece."""

    def __init__(self, fmt):
        self.fmt = fmt
        self.counts: dict[str, int] = {}

    @staticmethod
    def supports(fmt) -> bool:
        return hasattr(fmt, "segments") and hasattr(fmt, "tokenizer")

    def texts(self, conv: Conversation) -> list[tuple[str, bool]]:
        check_conversation(conv, for_training=True)
        return merge_segments(self.fmt.segments(conv, add_generation_prompt=False))

    def units(self, conv: Conversation, texts: list[tuple[str, bool]] | None = None) -> list[tuple[int, bool]]:
        """(tokens, trained) of each unit of conv's training rendering."""
        texts = self.texts(conv) if texts is None else texts
        new = [text for text in dict.fromkeys(text for text, _ in texts) if text not in self.counts]
        if new:
            self.counts.update(zip(new, token_counts(self.fmt.tokenizer, new)))
        return [(self.counts[text], trained) for text, trained in texts]


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """How many tokens each text tokenizes to, with no special tokens added. A byte-level BPE tokenizer's counts
    come from its pre-tokens, each tokenized once (`data/tokencount.py`: about 3x faster). Else a fast
    tokenizer's Rust backend is called directly (`encode_batch_fast`: no offsets), which gives the ids the
    tokenizer's own call gives (it calls the same backend, unless it is told to split special tokens) without
    building a BatchEncoding: 1.56 s against 2.33 s for 6.7 MB of cleaned chat text with SmolLM2's tokenizer (2
    Zen 4 cores). Anything else goes through the tokenizer's own call."""
    counter = PieceCounts.of(tokenizer)
    if counter is not None:
        return counter(texts)
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [len(encoding.ids) for encoding in encode(texts, add_special_tokens=False)]


def tokens_at_most_bytes(tokenizer) -> bool:
    """Whether no text can tokenize to more tokens than its UTF-8 bytes: true of a byte-level BPE tokenizer
    (GPT-2's, SmolLM2's) with no normalizer and no added prefix space, since each of its tokens
    covers at least one byte (an added token, several). Then a rendering of at most max_len bytes fits
    without being tokenized. Anything else (a normalizer may lengthen text, SentencePiece adds a prefix
    space, a slow tokenizer cannot be looked into) is false, and every rendering is counted."""
    from tokenizers import models, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.normalizer is not None or not isinstance(backend.model, models.BPE):
        return False
    pre = backend.pre_tokenizer
    return isinstance(pre, pre_tokenizers.ByteLevel) and not pre.add_prefix_space


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _unit_reply_ends(units: list[tuple[int, bool]], replies: int) -> list[int] | None:
    """`_reply_ends` of the labels these units make, from their lengths alone."""
    ends, position, inside = [], 0, False
    for tokens, trained in units:
        if not tokens:
            continue
        if inside and not trained:
            ends.append(position)
        inside = trained
        position += tokens
    if inside:
        ends.append(position)
    return ends if len(ends) == replies else None


def split_long(conv: Conversation, fmt, max_len: int) -> tuple[list[Conversation], int]:
    """`conv` as conversations of at most max_len tokens, cut where training would cut it (`plan_pieces`'s
    cuts, from lengths counted by UnitLengths when the template allows), for `data clean`. Returns (pieces,
    how many are still longer than max_len: a single long exchange, which training truncates). A piece's id
    is the conversation's id and its first turn's index."""
    exchanges = exchanges_of(conv)
    n = len(exchanges)
    if UnitLengths.supports(fmt):
        measure = UnitLengths(fmt)
        texts = measure.texts(conv)
        if tokens_at_most_bytes(fmt.tokenizer) and sum(_utf8_length(text) for text, _ in texts) <= max_len:
            return [conv], 0  # fewer bytes than max_len: fewer tokens too, no need to count them
        units = measure.units(conv, texts)
        full = sum(tokens for tokens, _ in units)
        lengths: dict[tuple[int, int], int] = {(0, n): full}

        def length(start: int, end: int) -> int:
            if (start, end) not in lengths:
                lengths[start, end] = sum(t for t, _ in measure.units(_piece(conv, exchanges, start, end)))
            return lengths[start, end]

        ends = _exchange_ends(_unit_reply_ends(units, _replies(exchanges)), exchanges) if full > max_len else None
        if ends is not None and len(ends) < n:
            ends.append(full)
        cuts = _plan(n, full, ends, max_len, length)
        sizes = [length(start, end) for start, end in cuts]
    else:
        planned = plan_pieces(conv, fmt, max_len)
        cuts = [(start, end) for start, end, _ in planned]
        sizes = [len(ids) for _, _, (ids, _) in planned]
    too_long = sum(size > max_len for size in sizes)
    if len(cuts) == 1:
        return [conv], too_long
    out = [_piece(conv, exchanges, start, end, source=f"{conv.source} (part {k + 1}/{len(cuts)})",
                  id=f"{conv.id}_{sum(len(e) for e in exchanges[:start])}" if conv.id else "", meta=dict(conv.meta))
           for k, (start, end) in enumerate(cuts)]  # fmt: skip
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
