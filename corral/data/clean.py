"""Fit conversations to the context: split long ones at turn boundaries (as Vicuna did)."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.chat.conversation import Conversation
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


def split_conversation(conv: Conversation, fmt, max_len: int) -> tuple[list[Sample], int, int]:
    """Render `conv`; if longer than max_len, split between exchanges (user + assistant).

    Each piece keeps the system prompt. Returns (samples, truncated, dropped).
    """
    ids, labels = fmt.render_with_masks(conv)
    if len(ids) <= max_len:
        return [to_sample(ids, labels, conv.source)], 0, 0
    system = [conv.messages[0]] if conv.system is not None else []
    turns = conv.turns
    exchanges = [turns[i : i + 2] for i in range(0, len(turns), 2)]
    pieces: list[list] = []
    current: list = []
    for exchange in exchanges:
        candidate = current + exchange
        if current and len(fmt.render_with_masks(Conversation(system + candidate))[0]) > max_len:
            pieces.append(current)
            current = list(exchange)
        else:
            current = candidate
    pieces.append(current)
    samples, truncated, dropped = [], 0, 0
    for k, piece in enumerate(pieces):
        ids, labels = fmt.render_with_masks(Conversation(system + piece, source=conv.source))
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
    return samples, report
