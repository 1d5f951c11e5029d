"""`corral data inspect | clean | stats`: look at a data file as training will see it, clean a raw export,
and measure a file before training on it."""

from __future__ import annotations

import os
from collections import Counter
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.text import Text

from corral.atomic import atomic_write_bytes, atomic_write_text
from corral.chat.templates import IGNORE_INDEX, get_template
from corral.config import DataCleanConfig, DataStatsConfig, InspectConfig
from corral.data.clean import conversations_to_samples
from corral.data.formats import DataError, file_kind, parse_hub_id, read_conversations, resolve_data_path
from corral.models.load import load_tokenizer


def highlight(tokenizer, input_ids: list[int], targets: list[int]) -> Text:
    """Trained tokens (those some position predicts) in bold green; the rest dim. Each run of tokens alike is
    decoded at once, so a character split across tokens (byte-level BPE, `°`) shows whole."""
    trained = [False] + [t != IGNORE_INDEX for t in targets[:-1]]  # targets[t] is token t+1
    text = Text()
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or trained[end] != trained[start]:
            text.append(tokenizer.decode(input_ids[start:end]), style="bold green" if trained[start] else "dim")
            start = end
    return text


def tool_summary(conversations) -> str | None:
    """One line on the data's tool use (None without any): how many conversations carry tool definitions,
    which functions, how many calls and results."""
    from corral.chat.tools import tool_names

    using = [conv for conv in conversations if conv.uses_tools]
    if not using:
        return None
    names = Counter(name for conv in using for name in tool_names(conv.tools))
    calls = Counter(call.name for conv in using for m in conv.messages for call in m.tool_calls)
    results = sum(m.role == "tool" for conv in using for m in conv.messages)
    parallel = sum(len(m.tool_calls) > 1 for conv in using for m in conv.messages)
    shown = ", ".join(f"{name} ({calls[name]} calls)" for name, _ in names.most_common(8))
    return (f"tool use: {len(using)} of {len(conversations)} conversations, {sum(calls.values())} calls "
            f"({parallel} turns with parallel calls), {results} results; functions defined: {shown or 'none'}"
            f"{', ...' if len(names) > 8 else ''}. Calls are trained like replies; definitions and results are not")


def run(cfg: InspectConfig):
    console = Console(highlight=False)
    tokenizer = load_tokenizer(cfg.model)
    fmt = get_template(cfg.template, tokenizer)
    conversations, report = read_conversations(cfg.data.path, cfg.data.format, cfg.data.skip_invalid)
    console.print(report.summary())
    tools = tool_summary(conversations)
    if tools:
        console.print(tools)
    samples, split = conversations_to_samples(conversations, fmt, cfg.max_len)
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


def _beside(output: str, suffix: str) -> str:
    """OUT.jsonl -> OUT.SUFFIX (the report, the rejects, the test part)."""
    path = Path(output)
    return str(path.with_name(path.name[: -len(path.suffix)] if path.suffix else path.name)) + suffix


def clean(cfg: DataCleanConfig):
    """Chain the cleaning steps of corral/data/sharegpt_clean.py as the config sets them; write the output,
    the rejects, the report (JSON, and a table on the terminal)."""
    from corral.data import sharegpt_clean as sc
    from corral.data.dedup import NearDuplicates

    if not cfg.inputs:
        raise DataError("no input files given (corral data clean INPUT... --output OUT.jsonl)")
    if Path(cfg.output).suffix != ".jsonl":
        raise DataError(f"output {cfg.output}: data clean writes JSONL, one record a line; name it *.jsonl")
    for path in cfg.inputs:  # before any work: a misspelt third input should not fail after the first two
        if not resolve_data_path(path).exists():
            raise DataError(f"{path}: no such file or folder")
    roles, filters, text, near = cfg.roles, cfg.filters, cfg.text, cfg.dedup.near
    language_on = bool(cfg.language.keep or cfg.language.skip)
    steps = [("roles", partial(sc.repair_roles, drop_leading_assistant=roles.drop_leading_assistant,
                               drop_trailing_user=roles.drop_trailing_user, merge_consecutive=roles.merge_consecutive))]
    filters_on = bool(filters.error_replies or filters.min_reply_chars or filters.blocklist or filters.wrong_list_numbering)
    enabled = {"html": cfg.html.enabled, "filters": filters_on, "unicode": text.unicode, "whitespace": text.whitespace,
               "pii": text.scrub_emails or text.scrub_phones, "language": language_on,
               "dedup": cfg.dedup.by_id or cfg.dedup.by_first_exchange or near.enabled,
               "split": cfg.split_max_len > 0, "test": cfg.test_fraction > 0}  # fmt: skip
    optional = [
        ("html", partial(sc.convert_html, roles=tuple(cfg.html.roles), debris=cfg.html.debris)),
        ("unicode", sc.repair_unicode),
        ("whitespace", sc.normalise_whitespace),
        ("pii", partial(sc.scrub, emails=text.scrub_emails, phones=text.scrub_phones,
                        email_placeholder=text.email_placeholder, phone_placeholder=text.phone_placeholder)),
        ("filters", partial(sc.apply_filters, cut=filters.cut, error_phrases=tuple(filters.error_replies),
                            min_reply_chars=filters.min_reply_chars, blocklist=tuple(filters.blocklist),
                            wrong_list_numbering=filters.wrong_list_numbering)),
        ("language", partial(sc.check_language, keep=tuple(cfg.language.keep), skip=tuple(cfg.language.skip),
                             max_chars=cfg.language.max_chars, min_confidence=cfg.language.min_confidence)),
    ]  # fmt: skip
    steps += [(name, fn) for name, fn in optional if enabled.get(name, True)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cfg.workers or cores
    splitter = None
    if cfg.split_max_len:
        if workers > 1:  # the worker processes are the parallelism: each tokenizes on one thread
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        fmt = get_template(cfg.template, load_tokenizer(cfg.model))
        splitter = partial(sc.split_step, fmt=fmt, max_len=cfg.split_max_len)
    dedup = sc.Deduplicator(cfg.dedup.by_id, cfg.dedup.by_first_exchange,
                            NearDuplicates(near.threshold, near.num_perm) if near.enabled else None)  # fmt: skip
    report = sc.run_clean(
        cfg.inputs, cfg.output, read=partial(sc.read_chat, data_format=cfg.format, roles=sc.role_names(roles.aliases)),
        steps=steps, near_signature=sc.near_signer(near.num_perm, near.shingle_words, near.max_words) if near.enabled
        else None, dedup=dedup if enabled["dedup"] else None, splitter=splitter, layout=cfg.layout,
        rejects=_beside(cfg.output, ".rejects.jsonl"), test_output=cfg.test_output or _beside(cfg.output, ".test.jsonl"),
        test_fraction=cfg.test_fraction, seed=cfg.seed, workers=workers, chunk_size=cfg.chunk_size,
        enabled=enabled, report_path=_beside(cfg.output, ".report.json"),
    )  # fmt: skip
    console = Console(highlight=False)
    console.print(report.table())
    console.print(report.summary())
    console.print(f"wrote {', '.join([cfg.output] + ([report.test_output] if report.test_output else []))}, "
                  f"{report.rejects}, {_beside(cfg.output, '.report.json')}")
    return report


def _stats_name(data_path: str) -> str:
    """chats.jsonl.gz -> chats; builtin:corral_identity -> corral_identity; org/chats?subset=en&split=test (a
    data set on the Hub) -> chats-en-test."""
    hub = parse_hub_id(str(data_path)) if not Path(str(data_path)).exists() else None
    if hub is not None:
        return "-".join(part for part in (hub.repo.split("/")[1], hub.subset, hub.split) if part).replace("/", "_")
    path = Path(str(data_path).removeprefix("builtin:"))
    kind, compression = file_kind(path)
    name = path.name
    for suffix in (compression, kind):
        if suffix and name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or "data"


def stats(cfg: DataStatsConfig):
    """Count, tokenize and measure a conversation file; print the Markdown report and write it with its PNG."""
    from corral.data import stats as data_stats
    from corral.data.dedup import NearDuplicates

    tokenizer = load_tokenizer(cfg.model)
    fmt = get_template(cfg.template, tokenizer)
    conversations, report = read_conversations(cfg.data.path, cfg.data.format, cfg.data.skip_invalid)
    near = cfg.near
    found = data_stats.collect(
        conversations, fmt, cfg.max_len, path=cfg.data.path,
        near=NearDuplicates(near.threshold, near.num_perm) if near.enabled and cfg.near_sample else None,
        near_sample=cfg.near_sample,
        near_settings={"num_perm": near.num_perm, "shingle": near.shingle_words, "max_words": near.max_words},
    )  # fmt: skip
    output = Path(cfg.output or f"{_stats_name(cfg.data.path)}.stats.md")
    png = output.with_suffix(".png")
    markdown = data_stats.to_markdown(found, png.name)
    atomic_write_bytes(png, data_stats.histogram_png(found))
    atomic_write_text(output, markdown)
    console = Console(highlight=False)
    console.print(report.summary())
    console.print(markdown)
    console.print(f"wrote {output} and {png}")
    return found
