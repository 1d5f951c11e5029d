"""`corral data inspect`: render samples as training sees them, trained tokens highlighted."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.text import Text

from corral.chat.templates import IGNORE_INDEX, get_template
from corral.config import InspectConfig
from corral.data.clean import conversations_to_samples
from corral.data.formats import read_conversations
from corral.models.load import load_tokenizer


def highlight(tokenizer, input_ids: list[int], targets: list[int]) -> Text:
    """Trained tokens (those some position predicts) in bold green; the rest dim."""
    trained = [False] + [t != IGNORE_INDEX for t in targets[:-1]]  # targets[t] is token t+1
    text = Text()
    for token_id, is_trained in zip(input_ids, trained):
        piece = tokenizer.decode([token_id])
        text.append(piece, style="bold green" if is_trained else "dim")
    return text


def run(cfg: InspectConfig):
    console = Console(highlight=False)
    tokenizer = load_tokenizer(cfg.model)
    fmt = get_template(cfg.template, tokenizer)
    conversations, report = read_conversations(cfg.data.path, cfg.data.format, cfg.data.skip_invalid)
    samples, split = conversations_to_samples(conversations, fmt, cfg.max_len)
    console.print(report.summary())
    console.print(f"template {fmt.name}: {split.summary()}")
    for sample in samples[: cfg.num_samples]:
        console.rule(f"{sample.source}: {len(sample.input_ids)} tokens, {sample.num_targets} trained")
        console.print(highlight(tokenizer, sample.input_ids, sample.targets))
    lengths = [len(s.input_ids) for s in samples]
    targets = sum(s.num_targets for s in samples)
    buckets = Counter(min(n // 128, 8) for n in lengths)
    console.rule("token counts")
    console.print(f"samples {len(samples)}, tokens {sum(lengths)}, trained {targets} "
                  f"({100 * targets / max(sum(lengths), 1):.1f}%), mean length {sum(lengths) / max(len(lengths), 1):.0f}, "
                  f"max {max(lengths, default=0)}")
    console.print("length histogram: " + ", ".join(
        f"{b * 128}-{b * 128 + 127 if b < 8 else 'up'}: {buckets[b]}" for b in sorted(buckets)))
    return samples
