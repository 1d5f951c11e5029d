"""Readers for preference data: a prompt conversation and two replies, one preferred.

Formats, detected per record (or forced with `data_format`):
  pairs      `prompt` (text, or a list of OpenAI messages), `chosen`, `rejected` (texts). The arena
             vote file that `corral serve` writes is this format; its ties (`chosen` null, `vote`
             tie/both_bad) carry no preference and are counted and skipped.
  messages   `chosen` / `rejected` as full OpenAI message lists that share everything but the final
             assistant reply (the prompt).
  hh         Anthropic HH-RLHF: `chosen` / `rejected` transcripts with `\\n\\nHuman:` / `\\n\\nAssistant:`
             turns; the prompt is everything before the final assistant turn, and must be the same in both.

Errors name the file, line and field, as the SFT readers do. Records whose chosen and rejected
replies are identical teach nothing: they are always dropped and counted in the report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.chat.conversation import Conversation, Message
from corral.data.formats import (OPENAI_ROLES, DataError, ReadReport, error_reason, iter_counted, parse_turns,
                                 require_str)

PREFERENCE_FORMATS = ("auto", "pairs", "messages", "hh")
USED_FIELDS = {"pairs": {"id", "prompt", "chosen", "rejected", "vote"}, "messages": {"id", "prompt", "chosen", "rejected"},
               "hh": {"id", "chosen", "rejected"}}  # any other field is reported once, with a count
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferencePair:
    prompt: Conversation  # ends with a user message
    chosen: str
    rejected: str
    source: str = ""  # "file:line"


class NoPreference(Exception):
    """The record is well-formed but states no preference (an arena tie): skipped and counted."""


def detect_preference_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        missing = "chosen" if "chosen" not in record else "rejected"
        raise DataError(f"field '{missing}': missing (preference records have 'chosen' and 'rejected')")
    if isinstance(record["chosen"], list):
        return "messages"
    if "prompt" in record:
        return "pairs"
    if isinstance(record["chosen"], str) and HH_TURN.search("\n\n" + record["chosen"].lstrip("\n")):
        return "hh"
    raise DataError("field 'prompt': missing (and 'chosen' is neither a message list nor an HH transcript)")


def _prompt_conversation(value: Any) -> Conversation:
    if isinstance(value, str):
        return Conversation([Message("user", require_str(value, "prompt"))])
    messages = parse_turns(value, "prompt", "role", "content", OPENAI_ROLES)
    if messages[-1].role != "user":
        raise DataError(f"field 'prompt[{len(messages) - 1}].role': the prompt must end with a user message")
    return Conversation(messages)


def _parse_pairs(record: dict) -> tuple[Conversation, str, str]:
    if record.get("vote") in ("tie", "both_bad") or (record["chosen"] is None and record["rejected"] is None):
        raise NoPreference(f"no preference ({record.get('vote') or 'chosen/rejected null'})")
    prompt = _prompt_conversation(record["prompt"])
    return prompt, require_str(record["chosen"], "chosen"), require_str(record["rejected"], "rejected")


def _parse_message_lists(record: dict) -> tuple[Conversation, str, str]:
    chosen = parse_turns(record["chosen"], "chosen", "role", "content", OPENAI_ROLES)
    if not isinstance(record["rejected"], list):
        raise DataError(f"field 'rejected': expected a message list like 'chosen', got {type(record['rejected']).__name__}")
    rejected = parse_turns(record["rejected"], "rejected", "role", "content", OPENAI_ROLES)
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1].role != "assistant":
            raise DataError(f"field '{name}[{len(messages) - 1}].role': must end with the assistant reply")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)) if a != b),
                  min(len(chosen), len(rejected)) - 1)
        raise DataError(f"field 'rejected[{at}]': chosen and rejected must share every message before the final reply")
    if "prompt" in record and isinstance(record["prompt"], list):
        prompt = _prompt_conversation(record["prompt"])
        if prompt.messages != chosen[:-1]:
            raise DataError("field 'prompt': differs from the messages before the final reply of 'chosen'")
    return Conversation(chosen[:-1]), chosen[-1].content, rejected[-1].content


# A turn marker that lost its blank line ("...done.\nHuman: next"): 9 of the 2,312 transcripts in HH-RLHF's
# test set have one. Read strictly first; only a transcript that fails is read again with the blank lines put back.
HH_LOST_BLANK_LINE = re.compile(r"(?<=[^\n])\n(Human|Assistant): ")


def _parse_hh_transcript(text: Any, field: str) -> list[Message]:
    text = require_str(text, field)
    try:
        return _hh_turns(text, field)
    except DataError as strict_error:
        repaired = HH_LOST_BLANK_LINE.sub(r"\n\n\1: ", text)
        if repaired == text:
            raise
        try:
            return _hh_turns(repaired, field)
        except DataError:
            raise strict_error from None


def _hh_turns(text: str, field: str) -> list[Message]:
    parts = HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise DataError(f"field '{field}': text before the first '\\n\\nHuman:' turn")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"field '{field}': turn {len(messages)} is {speaker}, expected "
                            f"{'Human' if expected == 'user' else 'Assistant'} (turns must alternate): "
                            f"{speaker}: {content.strip()[:60]!r}")
        messages.append(Message(role, content.strip()))
    if not messages or messages[-1].role != "assistant":
        raise DataError(f"field '{field}': must end with an '\\n\\nAssistant:' turn")
    return messages


def _parse_hh(record: dict) -> tuple[Conversation, str, str]:
    chosen = _parse_hh_transcript(record["chosen"], "chosen")
    rejected = _parse_hh_transcript(record["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("field 'rejected': its turns before the final Assistant reply differ from 'chosen'")
    return Conversation(chosen[:-1]), chosen[-1].content, rejected[-1].content


PARSERS = {"pairs": _parse_pairs, "messages": _parse_message_lists, "hh": _parse_hh}


def parse_preference(record: Any, data_format: str = "auto") -> PreferencePair:
    if data_format not in PREFERENCE_FORMATS:
        raise DataError(f"unknown preference format '{data_format}' (expected one of {', '.join(PREFERENCE_FORMATS)})")
    detected = detect_preference_format(record)
    prompt, chosen, rejected = PARSERS[detected if data_format == "auto" else data_format](record)
    return PreferencePair(prompt, chosen, rejected)


def read_preferences(path: str | Path, data_format: str = "auto", skip_invalid: bool = False) -> tuple[list[PreferencePair], ReadReport]:
    """All preference pairs in a file; invalid records raise (or are counted, with `skip_invalid`)."""
    report = ReadReport(str(path))
    pairs: list[PreferencePair] = []
    for location, record in iter_counted(path, report, skip_invalid):
        try:
            pair = parse_preference(record, data_format)
        except NoPreference as e:
            report.skip("no preference (tie or both bad)", f"{location}: {e}")
            continue
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{location}: {e}") from None
            report.skip(error_reason(e), f"{location}: {e}")
            continue
        if pair.chosen.strip() == pair.rejected.strip():
            report.skip("chosen identical to rejected", location)
            continue
        used = USED_FIELDS[detect_preference_format(record) if data_format == "auto" else data_format]
        for key in record.keys() - used:
            report.unused[key] += 1
        pair.source = location
        pairs.append(pair)
        report.kept += 1
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs ({report.summary()})")
    return pairs, report


# One sequence per pair. The two renderings of a pair share their start (the prompt and the assistant header);
# running it once, then the chosen reply, then the rejected reply restarting at the same position, computes what
# the two separate sequences compute, provided the rejected tokens never see the chosen ones. Segments of a row:
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3


def _last_run_start(labels: list[int]) -> int:
    """Index of the first token of the final trained run (the reply being compared and its end-of-turn)."""
    from corral.chat.templates import IGNORE_INDEX

    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE_INDEX:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i if any(label != IGNORE_INDEX for label in labels) else len(labels) - 1


def shared_prompt_length(chosen_ids: list[int], chosen_labels: list[int], rejected_ids: list[int],
                         rejected_labels: list[int]) -> int:
    """How many leading tokens the two renderings of a pair share (labels unshifted, as `render_with_masks` gives them).

    The longest common start of ids and labels, cut at the start of either side's final reply: replies that begin
    alike ("I ...") still count those tokens on both sides, as the two sequences do. Each side keeps at least its
    last token, where the reward model reads its score."""
    n, limit = 0, min(_last_run_start(chosen_labels), _last_run_start(rejected_labels),
                      len(chosen_ids) - 1, len(rejected_ids) - 1)
    while n < limit and chosen_ids[n] == rejected_ids[n] and chosen_labels[n] == rejected_labels[n]:
        n += 1
    return n


def collate_shared(pairs: list[tuple[list[int], list[int], int]], pad_id: int,
                   targets: list[tuple[list[int], list[int]]] | None = None) -> dict:
    """Pairs `(chosen_ids, rejected_ids, shared)` as one right-padded row each: the shared prompt, the rest of
    the chosen side, the rest of the rejected side.

    position_ids restart at `shared` for the rejected reply, so it sits where it sits in its own sequence;
    `pair_segments` (PROMPT, CHOSEN, REJECTED, PADDING per token) is what `models.forward.pair_attention_mask`
    turns into the mask keeping the replies apart. `chosen_last` / `rejected_last` index each side's last token.
    `targets` (DPO): each side's shifted targets, placed as `chosen_targets` / `rejected_targets` (B, L). The
    last shared token predicts the first token of both replies, so it carries a target in both; targets of the
    shared part itself (earlier assistant turns of a multi-turn prompt) count for both sides, as they do when
    each side is its own sequence."""
    import torch

    from corral.chat.templates import IGNORE_INDEX

    width = max(len(c) + len(r) - s for c, r, s in pairs)
    shape = (len(pairs), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, PADDING, dtype=torch.long)
    chosen_last, rejected_last = [], []
    batch_targets = [torch.full(shape, IGNORE_INDEX, dtype=torch.long) for _ in range(2)] if targets else None
    for i, (chosen, rejected, shared) in enumerate(pairs):
        c, n = len(chosen), len(chosen) + len(rejected) - shared
        input_ids[i, :n] = torch.tensor(chosen + rejected[shared:])
        position_ids[i] = torch.tensor(list(range(c)) + list(range(shared, width - c + shared)))
        segments[i, :shared], segments[i, shared:c], segments[i, c:n] = PROMPT, CHOSEN, REJECTED
        chosen_last.append(c - 1)
        rejected_last.append(n - 1)
        if targets:
            chosen_targets, rejected_targets = targets[i]
            batch_targets[0][i, :c] = torch.tensor(chosen_targets)
            batch_targets[1][i, :shared] = torch.tensor(rejected_targets[:shared])
            batch_targets[1][i, c:n] = torch.tensor(rejected_targets[shared:])
    batch = {"input_ids": input_ids, "position_ids": position_ids, "pair_segments": segments,
             "chosen_last": torch.tensor(chosen_last), "rejected_last": torch.tensor(rejected_last)}
    if batch_targets:
        batch["chosen_targets"], batch["rejected_targets"] = batch_targets
    return batch
