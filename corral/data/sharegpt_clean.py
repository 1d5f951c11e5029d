"""Cleaning raw chat exports (ShareGPT's HTML dumps, OpenAI message files): the steps and their chaining.

Each step is a function of one conversation that returns it changed (with counts of what changed) or
raises `Rejected` with the reason; `corral data clean` (recipes/data.py) builds them from its config:

  read        records as (role, text) turns: unreadable lines and malformed records are rejected
  roles       aliases mapped; a leading reply and a trailing user turn dropped; same-role turns merged;
              a conversation that still does not alternate is rejected
  html        HTML to Markdown, ChatGPT-export debris removed (text.py)
  unicode     ftfy; whitespace: line ends, odd spaces, blank lines (text.py)
  pii         e-mail addresses and phone numbers replaced (text.py; off by default)
  filters     error replies, empty or short replies, blocklisted phrases, restarting list numbers
              (filters.py): the exchanges before the first bad turn are kept, or the conversation dropped
  language    keep / skip lists (filters.py, py3langid)
  dedup       the same id, the same first exchange, near-duplicates by MinHash (dedup.py)
  split       long conversations cut at turn boundaries by tokens, as SFT cuts them (clean.py)
  test        a seeded train / test split by conversation

The steps up to `language` see one record at a time, so records stream through them in chunks (in a
pool of processes, one per core by default, which parse the JSONL lines, split the kept conversations
and send back JSON text) and memory holds a chunk, not the file; `dedup` keeps only digests and
signatures of what it has seen, in the one process that reads and writes the records in order. Every
dropped record goes to the rejects file with its step and reason (a cut conversation's dropped turns
too), and every change is counted: nothing is lost silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter, deque
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from corral.atomic import atomic_write_text
from corral.chat.conversation import Conversation, Message
from corral.chat.templates import TemplateError
from corral.data import text as textfix
from corral.data.clean import split_long
from corral.data.dedup import NearDuplicates, conversation_text, first_exchange_key, signature
from corral.data.filters import detect_language, first_bad_turn
from corral.data.formats import (OPENAI_ROLES, SHAREGPT_ROLES, UNPARSED, DataError, detect_format, error_reason,
                                 iter_raw_records, line_error_reason, parse_line, parse_record, read_turn)

LOCAL_STEPS = ("read", "roles", "html", "unicode", "whitespace", "pii", "filters", "language")
STEPS = (*LOCAL_STEPS, "dedup", "split", "test")
PLAIN_ROLE_NAMES = {"human", "gpt", "user", "assistant", "system"}  # anything else was an alias
Turn = tuple[str, str, str]  # (role, role name in the file, text)


class Rejected(Exception):
    """A step drops the conversation: `reason` is what it is counted under, `detail` the particulars."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class StepCount:
    seen: int = 0
    changed: int = 0  # conversations the step changed
    dropped: int = 0
    changes: Counter = field(default_factory=Counter)  # what changed -> how many (messages, turns, ...)
    reasons: Counter = field(default_factory=Counter)  # why dropped -> how many
    seconds: float = 0.0

    def add(self, other: StepCount) -> None:
        self.seen += other.seen
        self.changed += other.changed
        self.dropped += other.dropped
        self.changes.update(other.changes)
        self.reasons.update(other.reasons)
        self.seconds += other.seconds

    def as_dict(self) -> dict:
        return {"seen": self.seen, "changed": self.changed, "dropped": self.dropped, "changes": dict(self.changes),
                "reasons": dict(self.reasons), "seconds": round(self.seconds, 3)}


# ---------------------------------------------------------------------------------------------------------
# The steps


def role_names(aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Every role name a raw file may use (ShareGPT's, OpenAI's, and `aliases`), lower-case, to its role."""
    return {**SHAREGPT_ROLES, **OPENAI_ROLES, **{k.lower(): v for k, v in (aliases or {}).items()}}


def read_chat(record: Any, data_format: str = "auto", roles: dict[str, str] | None = None) -> list[list[Turn]]:
    """A raw record's turns, leniently: roles need not alternate and messages may be empty (later steps
    repair or count that). Alpaca records and self-instruct seed tasks are read as the readers read them
    (a seed task gives one conversation per instance). Raises DataError naming the field."""
    roles = roles or role_names()
    data_format = detect_format(record) if data_format == "auto" else data_format
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if data_format in ("alpaca", "self_instruct"):
        return [[(m.role, m.role, m.content) for m in conv.messages] for conv in parse_record(record, data_format)]
    list_field, role_key, text_key = {"sharegpt": ("conversations", "from", "value"),
                                      "openai": ("messages", "role", "content")}[data_format]  # fmt: skip
    items = record.get(list_field)
    if not isinstance(items, list) or not items:
        raise DataError(f"field '{list_field}': expected a non-empty list")
    turns = [read_turn(item, f"{list_field}[{i}]", role_key, text_key, roles, allow_empty=True)
             for i, item in enumerate(items)]  # fmt: skip
    system = record.get("system")
    if isinstance(system, str) and system.strip() and turns[0][0] != "system":
        turns.insert(0, ("system", "system", system))
    return [turns]


def repair_roles(turns: list[Turn], drop_leading_assistant: bool = True, drop_trailing_user: bool = True,
                 merge_consecutive: bool = True) -> tuple[list[Message], Counter]:
    """Turns as messages that alternate user / assistant from the user (after an optional system prompt),
    and what was repaired to get there. Raises Rejected when they still do not alternate."""
    changes: Counter = Counter()
    changes["role aliases mapped"] = sum(name.lower() not in PLAIN_ROLE_NAMES for _, name, _ in turns)
    system: list[str] = []
    rest: list[list[str]] = []
    for i, (role, name, text) in enumerate(turns):
        if role != "system":
            rest.append([role, text])
        elif rest:
            raise Rejected("system message after the first turn", f"turn {i} ('{name}')")
        else:
            system.append(text)
    if len(system) > 1:
        changes["system messages merged"] += len(system) - 1
    if merge_consecutive:
        merged: list[list[str]] = []
        for role, text in rest:
            if merged and merged[-1][0] == role:
                merged[-1][1] = f"{merged[-1][1]}\n\n{text}" if merged[-1][1] and text else merged[-1][1] + text
                changes["same-role turns merged"] += 1
            else:
                merged.append([role, text])
        rest = merged
    while drop_leading_assistant and rest and rest[0][0] == "assistant":
        rest.pop(0)
        changes["leading assistant turns dropped"] += 1
    while drop_trailing_user and rest and rest[-1][0] == "user":
        rest.pop()
        changes["trailing user turns dropped"] += 1
    if not rest:
        raise Rejected("no exchange left after role repair")
    for i, (role, _) in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise Rejected("roles do not alternate", f"turn {i}: expected {expected}, got {role}")
    if rest[-1][0] != "assistant":
        raise Rejected("ends with a user turn")
    messages = [Message("system", "\n\n".join(system))] if system else []
    return messages + [Message(role, text) for role, text in rest], +changes  # type: ignore[arg-type]


def _map_messages(conv: Conversation, fn: Callable[[str], str], roles=None) -> tuple[Conversation, int]:
    changed, messages = 0, []
    for message in conv.messages:
        if roles is None or message.role in roles:
            new = fn(message.content)
            if new != message.content:
                changed += 1
                message = Message(message.role, new)
        messages.append(message)
    return (replace(conv, messages=messages) if changed else conv), changed


def convert_html(conv: Conversation, roles=("assistant",), debris: bool = True) -> tuple[Conversation, Counter]:
    """HTML messages of `roles` to Markdown; then (with `debris`) the ChatGPT page's debris removed."""
    changes: Counter = Counter()

    def fix(text: str) -> str:
        if textfix.looks_like_html(text):
            blocks = text.count("<pre")
            try:
                text = textfix.html_to_markdown(text)
            except Exception as e:  # markup the parser refuses: say which message, drop the conversation
                raise Rejected("HTML the parser refuses", f"{type(e).__name__}: {e}") from None
            changes["messages converted from HTML"] += 1
            if blocks:
                changes["code blocks fenced with their language"] += blocks
        if debris:
            text, found = textfix.remove_export_debris(text)
            changes.update(found)
        return text

    conv, _ = _map_messages(conv, fix, roles)
    return conv, changes


def repair_unicode(conv: Conversation) -> tuple[Conversation, Counter]:
    conv, n = _map_messages(conv, textfix.fix_unicode)
    return conv, Counter({"messages repaired": n} if n else {})


def normalise_whitespace(conv: Conversation) -> tuple[Conversation, Counter]:
    conv, n = _map_messages(conv, textfix.normalise_whitespace)
    return conv, Counter({"messages normalised": n} if n else {})


def scrub(conv: Conversation, emails: bool = True, phones: bool = True, email_placeholder: str = "[EMAIL]",
          phone_placeholder: str = "[PHONE]") -> tuple[Conversation, Counter]:
    changes: Counter = Counter()

    def fix(text: str) -> str:
        text, found = textfix.scrub_pii(text, emails, phones, email_placeholder, phone_placeholder)
        changes.update(found)
        return text

    conv, _ = _map_messages(conv, fix)
    return conv, changes


def apply_filters(conv: Conversation, cut: bool = True, **filters) -> tuple[Conversation, Counter]:
    """Keep the exchanges before the first bad turn (`first_bad_turn(conv, **filters)`), or, without `cut`
    or with nothing before it, reject the conversation. A cut's dropped turns are put in conv.meta["cut"]
    for the rejects file."""
    bad = first_bad_turn(conv, **filters)
    if bad is None:
        return conv, Counter()
    index, reason, detail = bad
    keep = index // 2 * 2  # whole exchanges only
    if not cut or keep == 0:
        raise Rejected(reason, f"{detail} (turn {index})".strip())
    turns = conv.turns
    system = conv.messages[: len(conv.messages) - len(turns)]
    kept = replace(conv, messages=system + turns[:keep], meta={**conv.meta, "cut": {
        "reason": reason, "detail": detail, "kept_turns": keep,
        "dropped": [{"role": m.role, "content": m.content} for m in turns[keep:]]}})
    return kept, Counter({f"cut at: {reason}": 1})


def check_language(conv: Conversation, keep=(), skip=(), max_chars: int = 1000,
                   min_confidence: float = 0.5) -> tuple[Conversation, Counter]:
    language, probability = detect_language(conv, max_chars, min_confidence)
    if keep and language not in keep:
        raise Rejected(f"language {language} not kept", f"p={probability:.2f}")
    if language in skip:
        raise Rejected(f"language {language} skipped", f"p={probability:.2f}")
    return conv, Counter()


# ---------------------------------------------------------------------------------------------------------
# Running the record-local steps over a chunk (possibly in another process)


@dataclass
class Item:
    """One conversation out of the record-local steps: kept or not, with its rejects-file lines. A kept one
    comes as JSON already (`record_json`, its output record), so a worker process sends text back, not
    objects; `conv` is there until the split (precomputed in the worker when there is one: `split`)."""

    location: str
    kept: bool
    rejects: list[dict]
    conv: Conversation | None = None
    id: str = ""
    first_key: bytes = b""
    sig: Any = None
    record_json: str = ""
    split: Split | None = None


class Split(NamedTuple):
    """A kept conversation's split: its output lines and what changed, or why the split rejected it."""

    lines: list[str]
    changes: Counter
    seconds: float
    rejected: Rejected | None = None


def reject_line(location: str, step: str, reason: str, detail: str = "", **more) -> dict:
    return {"location": location, "step": step, "reason": reason, "detail": detail, **more}


def _field_reason(error: DataError) -> str:
    """A read error's reason without its particulars, so they group: "field 'conversations[].from': unknown
    role" for "field 'conversations[3].from': unknown role 'robot' (expected one of ...)"."""
    match = re.match(r"field '([^']*)': ([^'(]*)", str(error))
    if not match:
        return error_reason(error)
    folded = re.sub(r"\[\d+\]", "[]", match.group(1))
    return f"field '{folded}': {match.group(2).strip()}"


def _timed(count: StepCount, fn, *args):
    count.seen += 1
    started = time.perf_counter()
    try:
        return fn(*args)
    except Rejected as e:
        count.dropped += 1
        count.reasons[e.reason] += 1
        raise
    finally:
        count.seconds += time.perf_counter() - started


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def clean_chunk(chunk: list, read: Callable, steps: list[tuple[str, Callable]], near_signature: Callable | None,
                layout: str = "sharegpt", splitter: Callable | None = None,
                in_worker: bool = False) -> tuple[list[Item], dict[str, StepCount]]:
    """Run `read` and the record-local `steps` ((name, fn(conv) -> (conv, changes))) over raw records
    ((location, record, error, raw) from formats.iter_raw_records, a JSONL line's record possibly UNPARSED).
    `in_worker` (a process of the pool): split each kept conversation here too, with `splitter` (whether it
    is a duplicate is only known later, in the one process that sees every record), and send back its lines
    rather than the Conversation. A module-level function, so a process pool can run it."""
    counts = {name: StepCount() for name in (*LOCAL_STEPS, "dedup")}  # dedup: the time of its signatures
    items = []
    for location, record, error, raw in chunk:
        if record is UNPARSED:
            record, error = parse_line(location, raw)
        if error is not None:
            counts["read"].seen += 1
            counts["read"].dropped += 1
            reason = line_error_reason(location, error)
            counts["read"].reasons[reason] += 1
            items.append(Item(location, False, [reject_line(location, "read", reason, str(error), line=raw)]))
            continue
        try:
            found = _timed(counts["read"], read, record)
        except DataError as e:
            counts["read"].dropped += 1
            counts["read"].reasons[_field_reason(e)] += 1
            items.append(Item(location, False, [reject_line(location, "read", _field_reason(e), str(e),
                                                            record=record)]))  # fmt: skip
            continue
        for k, turns in enumerate(found):
            where = location if len(found) == 1 else f"{location} (instance {k})"
            item = _clean_one(where, record, turns, steps, counts, near_signature, layout)
            if item.kept and in_worker:
                if splitter is not None:
                    item.split = _split_lines(item.conv, splitter, layout, item.record_json)
                item.conv = None  # not sent back: its lines say it all
            items.append(item)
    return items, counts


def _clean_one(location, record, turns, steps, counts, near_signature, layout) -> Item:
    rejects: list[dict] = []
    step = "roles"
    try:
        messages, changes = _timed(counts["roles"], steps[0][1], turns)
        _count_changes(counts["roles"], changes)
        conv = Conversation(messages, source=location, id=str(record.get("id", "")) if isinstance(record, dict) else "")
        for step, fn in steps[1:]:
            conv, changes = _timed(counts[step], fn, conv)
            _count_changes(counts[step], changes)
            if "cut" in conv.meta:
                rejects.append(reject_line(location, step, conv.meta["cut"]["reason"], conv.meta["cut"]["detail"],
                                           cut=conv.meta["cut"]))
                conv.meta = {k: v for k, v in conv.meta.items() if k != "cut"}
    except Rejected as e:
        rejects.append(reject_line(location, step, e.reason, e.detail, record=record))
        return Item(location, False, rejects)
    started = time.perf_counter()
    sig = near_signature(conversation_text(conv)) if near_signature else None
    counts["dedup"].seconds += time.perf_counter() - started
    return Item(location, True, rejects, conv, conv.id, first_exchange_key(conv), sig,
                _json_line(output_record(conv, layout)))


def _split_lines(conv: Conversation, splitter: Callable, layout: str, record_json: str) -> Split:
    started = time.perf_counter()
    try:
        pieces, changes = splitter(conv)
    except Rejected as e:
        return Split([], Counter(), time.perf_counter() - started, e)
    if len(pieces) == 1 and pieces[0] is conv:
        lines = [record_json]
    else:
        lines = [_json_line(output_record(piece, layout)) for piece in pieces]
    return Split(lines, changes, time.perf_counter() - started)


def _count_changes(count: StepCount, changes: Counter) -> None:
    if changes:
        count.changed += 1
        count.changes.update(changes)


def near_signer(num_perm: int, shingle: int, max_words: int) -> Callable:
    """signature() with these settings, as a picklable callable."""
    return partial(signature, num_perm=num_perm, shingle=shingle, max_words=max_words)


def chunks(records: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER_FN: Callable | None = None


def _set_worker_fn(fn: Callable) -> None:
    global _WORKER_FN
    _WORKER_FN = fn
    # A forked worker must not use the tokenizers library's thread pool: with TOKENIZERS_PARALLELISM=true exported
    # (which turns off the library's own after-fork guard) a worker's first batch call hung for good. The pool is
    # the parallelism here.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _call_worker_fn(job):
    return _WORKER_FN(job)


def map_ordered(fn: Callable, jobs: Iterable, workers: int) -> Iterator:
    """fn over jobs, results in order; with workers > 1 in a process pool, at most 2 x workers jobs in
    flight (Pool.imap would read the whole input ahead). `fn` reaches each worker once, when it starts (a
    forked worker inherits it: a tokenizer inside is not pickled with every chunk)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing

    with multiprocessing.get_context().Pool(workers, initializer=_set_worker_fn, initargs=(fn,)) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(_call_worker_fn, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def iter_inputs(paths: list[str], parse: bool = True) -> Iterator[tuple]:
    for path in paths:
        yield from iter_raw_records(path, parse=parse)


# ---------------------------------------------------------------------------------------------------------
# The whole-file steps: duplicates, splitting, the test split


class Deduplicator:
    """First occurrence kept; a later one with the same id, the same first exchange or (with `near`) a
    near-duplicate signature is dropped, naming the one it repeats."""

    def __init__(self, by_id: bool = True, by_first_exchange: bool = True, near: NearDuplicates | None = None):
        self.by_id, self.by_first_exchange, self.near = by_id, by_first_exchange, near
        self.ids: dict[str, str] = {}
        self.firsts: dict[bytes, str] = {}

    def check(self, item: Item) -> None:
        if self.by_id and item.id in self.ids:
            raise Rejected("same id", f"as {self.ids[item.id]}")
        if self.by_first_exchange and item.first_key in self.firsts:
            raise Rejected("same first exchange", f"as {self.firsts[item.first_key]}")
        if self.near is not None and item.sig is not None:
            earlier = self.near.check(item.location, item.sig)
            if earlier is not None:
                raise Rejected("near-duplicate", f"of {earlier}")
        if self.by_id and item.id:
            self.ids[item.id] = item.location
        if self.by_first_exchange:
            self.firsts[item.first_key] = item.location


def split_step(conv: Conversation, fmt, max_len: int) -> tuple[list[Conversation], Counter]:
    """`clean.split_long` as a step: the pieces, and how many pieces were made and stayed too long."""
    try:
        pieces, too_long = split_long(conv, fmt, max_len)
    except TemplateError as e:
        raise Rejected("the template cannot render it", str(e)) from None
    changes = Counter({"pieces made": len(pieces)} if len(pieces) > 1 else {})
    if too_long:
        changes["pieces still longer than max_len (one long exchange)"] = too_long
    return pieces, changes


def in_test_split(key: bytes, fraction: float, seed: int) -> bool:
    """Whether a conversation (by its first-exchange digest) is in the test part: a seeded hash, so the
    same conversation lands on the same side on every run, whatever else the files hold."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------------------
# Output


class AtomicLines:
    """A JSONL file written line by line to NAME.tmp-PID, then fsynced and renamed over NAME on success (the
    streaming form of corral.atomic's whole-file writes); on an error the temporary file is removed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.count = 0

    def __enter__(self) -> AtomicLines:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "w", encoding="utf-8")
        return self

    def write(self, record: dict) -> None:
        self.write_line(_json_line(record))

    def write_line(self, line: str) -> None:
        self.file.write(line + "\n")
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)


def output_record(conv: Conversation, layout: str) -> dict:
    if layout == "openai":
        return ({"id": conv.id} if conv.id else {}) | {"messages": conv.to_openai()}
    return conv.to_sharegpt()


@dataclass
class CleanReport:
    inputs: list[str]
    output: str
    rejects: str
    test_output: str = ""
    records: int = 0  # records read
    kept: int = 0  # conversations that passed every step
    written: int = 0  # records written to the output (pieces of split conversations count one each)
    test: int = 0  # records written to the test file
    rejected: int = 0  # records and conversations dropped (each has a line in the rejects file)
    cut: int = 0  # conversations kept without their later turns (also in the rejects file)
    enabled: dict = field(default_factory=dict)
    steps: dict = field(default_factory=lambda: {name: StepCount() for name in STEPS})
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "output": self.output, "test_output": self.test_output,
                "rejects": self.rejects, "records": self.records, "kept": self.kept, "written": self.written,
                "test": self.test, "rejected": self.rejected, "cut": self.cut, "seconds": round(self.seconds, 3),
                "steps": {name: {"enabled": self.enabled.get(name, True), **count.as_dict()}
                          for name, count in self.steps.items()}}  # fmt: skip

    def summary(self) -> str:
        test = f" + {self.test} test" if self.test_output else ""
        return (f"data clean: {self.records} records -> {self.kept} conversations kept, {self.written} records "
                f"written{test}; {self.rejected} rejected, {self.cut} cut short (every one in {self.rejects})")

    def table(self):
        from rich.table import Table

        table = Table()
        for column in ("step", "seen", "changed", "dropped", "what changed / why dropped", "conv/s"):
            table.add_column(column, justify="left" if column in ("step", "what changed / why dropped") else "right")
        for name, count in self.steps.items():
            if not self.enabled.get(name, True):
                table.add_row(name, "off", "", "", "", "")
                continue
            details = [f"{n} {what}" for what, n in count.changes.most_common(4)]
            details += [f"{n} x {why}" for why, n in count.reasons.most_common(4)]
            rate = f"{count.seen / count.seconds:,.0f}" if count.seconds > 0 else ""
            table.add_row(name, str(count.seen), str(count.changed), str(count.dropped), "; ".join(details), rate)
        return table


def _with_conversation(line: dict, conversation_json: str) -> str:
    """json.dumps(line | {"conversation": ...}) for a conversation already written as JSON."""
    return _json_line(line)[:-1] + ', "conversation": ' + conversation_json + "}"


def run_clean(inputs: list[str], output: str, *, read: Callable, steps: list[tuple[str, Callable]],
              near_signature: Callable | None = None, dedup: Deduplicator | None = None,
              splitter: Callable | None = None, layout: str = "sharegpt", rejects: str = "", test_output: str = "",
              test_fraction: float = 0.0, seed: int = 1234, workers: int = 1, chunk_size: int = 1000,
              enabled: dict | None = None, report_path: str = "") -> CleanReport:
    """Every step over `inputs`, in order: kept conversations to `output` (or `test_output`), dropped ones
    to `rejects`, counts to the returned report (and `report_path` as JSON). `steps` are the record-local
    steps from `roles` on (`read` parses a record); `splitter(conv)` returns (pieces, changes). The files
    appear only when everything has been read: each is written beside its name and renamed.

    With workers > 1 the record-local steps run in a process pool, chunk by chunk, and so does the split
    (of every conversation, duplicates too: only this process, which sees the records in order, can tell
    a duplicate); this process reads, deduplicates and writes, in input order, so the files are the same
    for any number of workers."""
    rejects = rejects or str(Path(output).with_suffix("")) + ".rejects.jsonl"
    report = CleanReport([str(p) for p in inputs], str(output), rejects, test_output if test_fraction > 0 else "",
                         enabled=dict(enabled or {}))
    started = time.perf_counter()
    parallel = workers > 1
    worker = partial(clean_chunk, read=read, steps=steps, near_signature=near_signature, layout=layout,
                     splitter=splitter, in_worker=parallel)
    split_count = report.steps["split"]
    with ExitStack() as stack:
        out = stack.enter_context(AtomicLines(output))
        test = stack.enter_context(AtomicLines(test_output)) if report.test_output else None
        rejected = stack.enter_context(AtomicLines(rejects))
        for items, counts in map_ordered(worker, chunks(iter_inputs(inputs, parse=not parallel), chunk_size),
                                         workers):
            for name, count in counts.items():
                report.steps[name].add(count)
            for item in items:
                for line in item.rejects:
                    rejected.write(line)
                if not item.kept:
                    report.rejected += 1
                    continue
                step, lines = "dedup", [item.record_json]
                try:
                    if dedup is not None:
                        _timed(report.steps["dedup"], dedup.check, item)
                    if splitter is not None:
                        step = "split"
                        split = item.split or _split_lines(item.conv, splitter, layout, item.record_json)
                        split_count.seen += 1
                        split_count.seconds += split.seconds
                        if split.rejected is not None:
                            split_count.dropped += 1
                            split_count.reasons[split.rejected.reason] += 1
                            raise split.rejected
                        lines = split.lines
                        _count_changes(split_count, split.changes)
                except Rejected as e:
                    rejected.write_line(_with_conversation(reject_line(item.location, step, e.reason, e.detail),
                                                           item.record_json))
                    report.rejected += 1
                    continue
                report.kept += 1
                report.cut += bool(item.rejects)  # kept without its later turns (they are in the rejects)
                to_test = test is not None and in_test_split(item.first_key, test_fraction, seed)
                report.steps["test"].seen += 1
                if to_test:
                    report.steps["test"].changes["conversations to the test file"] += 1
                for line in lines:
                    (test if to_test else out).write_line(line)
        report.written, report.test = out.count, test.count if test else 0
    report.records = report.steps["read"].seen
    report.seconds = time.perf_counter() - started
    if report_path:
        atomic_write_text(report_path, json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n")
    return report
