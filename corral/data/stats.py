"""What a conversation file holds, before training on it: counts, tokens, lengths, duplicates, and what
`train.max_len` would do to it. `corral data stats` prints this and writes it as Markdown with a PNG.

Tokens are counted the way training counts them: each conversation rendered with the model's template
(`render_with_masks`), "trained" being the reply tokens that get a loss. The split figures come from
the SFT splitter itself, handed the same renderings, so they are what `corral sft` will report.
"""

from __future__ import annotations

import io
import statistics
from collections import Counter
from dataclasses import dataclass, field

from corral.chat.conversation import Conversation
from corral.chat.templates import IGNORE_INDEX
from corral.data.clean import SplitReport, split_conversation
from corral.data.dedup import NearDuplicates, conversation_text, first_exchange_key, signature


@dataclass
class DataStats:
    path: str
    max_len: int
    conversations: int = 0
    with_system: int = 0
    roles: Counter = field(default_factory=Counter)  # messages per role
    turns: list[int] = field(default_factory=list)  # user + assistant turns per conversation
    tokens: list[int] = field(default_factory=list)  # per conversation, rendered whole
    trained: list[int] = field(default_factory=list)  # reply tokens with a loss, per conversation
    split: SplitReport = field(default_factory=SplitReport)
    sample_tokens: int = 0  # tokens after splitting (headers repeat, truncated parts go)
    same_first_exchange: int = 0
    near_checked: int = 0
    near_duplicates: int = 0


def collect(conversations: list[Conversation], fmt, max_len: int, path: str = "", near: NearDuplicates | None = None,
            near_sample: int = 0, near_settings: dict | None = None) -> DataStats:
    """Figures of `conversations` rendered with `fmt`; near-duplicates among the first `near_sample`."""
    stats = DataStats(path, max_len, conversations=len(conversations))
    stats.split.conversations = len(conversations)
    firsts: set[bytes] = set()
    for k, conv in enumerate(conversations):
        stats.with_system += conv.system is not None
        stats.roles.update(m.role for m in conv.messages)
        stats.turns.append(len(conv.turns))
        ids, labels = fmt.render_with_masks(conv)
        stats.tokens.append(len(ids))
        stats.trained.append(sum(label != IGNORE_INDEX for label in labels))
        samples, truncated, dropped = split_conversation(conv, fmt, max_len, rendered=(ids, labels))
        stats.split.split += len(samples) + dropped > 1
        stats.split.truncated += truncated
        stats.split.dropped += dropped
        stats.split.samples += len(samples)
        stats.sample_tokens += sum(len(s.input_ids) for s in samples)
        key = first_exchange_key(conv)
        stats.same_first_exchange += key in firsts
        firsts.add(key)
        if near is not None and k < near_sample:
            stats.near_checked += 1
            sig = signature(conversation_text(conv), **(near_settings or {}))
            stats.near_duplicates += near.check(conv.source, sig) is not None
    return stats


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def to_markdown(stats: DataStats, histogram_name: str = "") -> str:
    tokens, trained = stats.tokens, stats.trained
    n = stats.conversations
    lines = [f"# Data statistics: {stats.path}", "", "| | |", "|---|---|",
             f"| conversations | {n} |", f"| with a system prompt | {stats.with_system} |",
             f"| messages by role | {', '.join(f'{role} {count}' for role, count in sorted(stats.roles.items()))} |",
             f"| turns per conversation | mean {statistics.fmean(stats.turns) if n else 0:.1f}, "
             f"median {_percentile(stats.turns, 0.5)}, max {max(stats.turns, default=0)} |",
             f"| multi-turn (more than one exchange) | {sum(t > 2 for t in stats.turns)} |",
             "", "## Tokens", "", "| | |", "|---|---|",
             f"| total | {sum(tokens)} |", f"| trained (replies) | {sum(trained)} ({_share(sum(trained), sum(tokens))}) |",
             f"| per conversation | mean {statistics.fmean(tokens) if n else 0:.0f}, median {_percentile(tokens, 0.5)}, "
             f"p90 {_percentile(tokens, 0.9)}, p99 {_percentile(tokens, 0.99)}, max {max(tokens, default=0)} |",
             f"| trained per conversation | mean {statistics.fmean(trained) if n else 0:.0f}, "
             f"max {max(trained, default=0)} |",
             "", f"## With train.max_len = {stats.max_len}", "", "| | |", "|---|---|",
             f"| conversations longer than max_len | {sum(t > stats.max_len for t in tokens)} |",
             f"| split at turn boundaries | {stats.split.split} |",
             f"| samples | {stats.split.samples} ({stats.sample_tokens} tokens) |",
             f"| truncated inside a reply | {stats.split.truncated} |",
             f"| dropped (no trained token left) | {stats.split.dropped} |",
             "", "## Duplicates", "", "| | |", "|---|---|",
             f"| same first exchange as an earlier one | {stats.same_first_exchange} ({_share(stats.same_first_exchange, n)}) |"]  # fmt: skip
    if stats.near_checked:
        lines.append(f"| near-duplicate of an earlier one (MinHash, first {stats.near_checked}) | "
                     f"{stats.near_duplicates} ({_share(stats.near_duplicates, stats.near_checked)}) |")
    if histogram_name:
        lines += ["", "## Length histogram", "", f"![tokens per conversation]({histogram_name})"]
    return "\n".join(lines) + "\n"


def histogram_png(stats: DataStats) -> bytes:
    """Tokens per conversation, with max_len marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.hist(stats.tokens, bins=min(60, max(5, len(set(stats.tokens)))), color="#4477aa")
    ax.axvline(stats.max_len, color="#cc3311", linestyle="--", label=f"max_len {stats.max_len}")
    ax.set_xlabel("tokens per conversation")
    ax.set_ylabel("conversations")
    ax.set_title(stats.path, fontsize=9)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
