"""Instruction pools: the seed pool read with the data readers, the train and cache pools of each iteration.

Lion's pools: the first train pool is (a sample of) the seed instructions and the first cache pool is the same
instructions; after each iteration the next train pool is the instructions just generated, and the cache pool
keeps growing with them (here optionally capped, the oldest leaving first). Each pool is one JSONL file per
iteration, written atomically, so a run resumes with exactly the pools it had.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.atomic import atomic_write_text
from corral.data.formats import DataError, read_conversations, resolve_data_path


@dataclass(frozen=True)
class Instruction:
    id: str  # digest of `prompt`: one instruction, one id, in every file
    prompt: str  # the full instruction as the teacher is sent it (Alpaca's input after a blank line)
    origin: str = "seed"  # "seed", or "hard" / "easy": which kind of instruction it was generated from
    iteration: int = 0  # the iteration that generated it (0: a seed)
    source: str = ""  # seed: FILE:LINE; generated: the id of the instruction it was made from

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def instruction_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


@dataclass
class SeedReport:
    read: str  # the data reader's summary (records read, kept, skipped by reason)
    instructions: int = 0
    duplicates: int = 0  # records whose instruction an earlier record already had: counted, kept once
    multi_turn: int = 0  # conversations with more than one user turn: the first one is the instruction

    def summary(self) -> str:
        text = f"{self.read}; {self.instructions} instructions"
        if self.duplicates:
            text += f", {self.duplicates} duplicate instructions left out"
        if self.multi_turn:
            text += f", {self.multi_turn} multi-turn conversations (their first user turn is the instruction)"
        return text


def read_seed_pool(path: str, data_format: str = "auto", skip_invalid: bool = False) -> tuple[list[Instruction], SeedReport]:
    """The seed instructions of a conversation file, in file order. Any format the data readers take; a record
    needs no reply (Alpaca without `output`, a conversation ending with a user turn). Errors name file:line:field."""
    resolved = resolve_data_path(path)  # builtin:distill_seeds is shipped with the other data sets
    conversations, read = read_conversations(resolved, data_format, skip_invalid, need_reply=False)
    report = SeedReport(read.summary())
    instructions, seen = [], set()
    for conv in conversations:
        users = [m for m in conv.messages if m.role == "user"]
        if not users:
            raise DataError(f"{conv.source}: field 'messages': no user turn to take the instruction from")
        if len(users) > 1:
            report.multi_turn += 1
        prompt = users[0].content
        if not prompt.strip():
            raise DataError(f"{conv.source}: the instruction (first user turn) is empty")
        key = instruction_id(prompt)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        instructions.append(Instruction(key, prompt, "seed", 0, conv.source))
    report.instructions = len(instructions)
    return instructions, report


def write_pool(path: Path, instructions: list[Instruction]) -> Path:
    return atomic_write_text(path, "".join(i.to_json() + "\n" for i in instructions))


def read_pool(path: Path) -> list[Instruction]:
    """A pool file this command wrote (atomically: whole or absent)."""
    pool = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            pool.append(Instruction(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise DataError(f"{path}:{number}: not a pool record ({e}); delete the iteration's folder to rebuild it") from None
    return pool


def sample(instructions: list[Instruction], n: int, seed: str) -> list[Instruction]:
    """`n` of them, drawn with a seeded generator, kept in their pool order; all of them when n is 0 or larger."""
    if n <= 0 or n >= len(instructions):
        return list(instructions)
    chosen = set(random.Random(seed).sample(range(len(instructions)), n))
    return [x for i, x in enumerate(instructions) if i in chosen]


def next_pools(cache: list[Instruction], new: list[Instruction], cache_max: int = 0) -> tuple[list[Instruction], list[Instruction]]:
    """(train pool, cache pool) of the next iteration: the train pool is the new instructions; the cache pool is
    the old one with them appended (an instruction already there is not added twice), and with `cache_max`
    only its newest `cache_max` entries."""
    known = {i.id for i in cache}
    grown = list(cache) + [i for i in new if i.id not in known]
    if cache_max and len(grown) > cache_max:
        grown = grown[-cache_max:]
    return list(new), grown
