"""Data mixtures (Koala mixed ShareGPT, HC3, OIG, Alpaca, HH, ...) and stage splits (DeepSpeed-Chat).

Both are reproducible functions of their inputs and a seed, and both report what they took.

`stage_split(records, "2,4,4", stage, seed)` cuts one data set into disjoint parts, one per stage
(SFT / reward / RL), by a seeded permutation of the record positions: the same file, weights and
seed give every stage the same part on every run, and no record is in two parts.

`mix(sources, seed)` takes from each named source either `count` records or `weight` times its size
(weight 0.5 = a random half, 2.0 = every record twice), then shuffles the union.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def parse_split(text: str) -> list[float]:
    """`"2,4,4"` -> [0.2, 0.4, 0.4]."""
    try:
        weights = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ValueError(f"split '{text}': expected comma-separated numbers like 2,4,4") from None
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split '{text}': weights must be non-negative and not all zero")
    total = sum(weights)
    return [w / total for w in weights]


def stage_split(records: Sequence[T], split: str, stage: int, seed: int = 1234) -> list[T]:
    """The records of part `stage` (0-based) of `split`; parts are disjoint and cover every record."""
    fractions = parse_split(split)
    if not 0 <= stage < len(fractions):
        raise ValueError(f"split stage {stage}: '{split}' has {len(fractions)} parts (0..{len(fractions) - 1})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    bounds = [round(sum(fractions[:i]) * len(records)) for i in range(len(fractions) + 1)]
    return [records[i] for i in sorted(order[bounds[stage] : bounds[stage + 1]])]


@dataclass
class Source:
    name: str
    records: Sequence
    weight: float = 1.0  # multiple of the source's size to take; ignored when count > 0
    count: int = 0  # exact number of records to take


@dataclass
class MixReport:
    taken: dict  # source name -> (available, taken)

    def summary(self) -> str:
        parts = [f"{name}: {taken} of {available}" for name, (available, taken) in self.taken.items()]
        return f"mixture of {sum(t for _, t in self.taken.values())} records (" + "; ".join(parts) + ")"


def _take(records: Sequence[T], wanted: int, rng: random.Random) -> list[T]:
    """`wanted` records: whole copies of the source, then a random sample without replacement."""
    whole, rest = divmod(wanted, len(records)) if records else (0, 0)
    taken = list(records) * whole
    taken += rng.sample(list(records), rest)
    return taken


def mix(sources: list[Source], seed: int = 1234) -> tuple[list, MixReport]:
    rng = random.Random(seed)
    mixed: list = []
    taken: dict = {}
    for source in sources:
        if source.weight < 0 or source.count < 0:
            raise ValueError(f"source '{source.name}': weight and count must be non-negative")
        wanted = source.count if source.count > 0 else round(source.weight * len(source.records))
        if wanted and not source.records:
            raise ValueError(f"source '{source.name}': no records to take {wanted} from")
        part = _take(source.records, wanted, rng)
        taken[source.name] = (len(source.records), len(part))
        mixed += part
    rng.shuffle(mixed)
    return mixed, MixReport(taken)


def load_records(reader, path: str, sources: list, mix_seed: int, split: str, split_stage: int, split_seed: int,
                 log=print) -> list:
    """A recipe's data: one file, or a mixture of `sources` (SourceConfig-like: path, name, weight,
    count), then this stage's part of a stage split. `reader(path)` returns (records, ReadReport).
    Every stage of a pipeline must pass the same sources, seeds and split to get disjoint parts."""
    if sources:
        parts = []
        for source in sources:
            records, report = reader(source.path)
            log(report.summary())
            parts.append(Source(source.name or source.path, records, source.weight, source.count))
        records, mix_report = mix(parts, mix_seed)
        log(mix_report.summary())
    else:
        records, report = reader(path)
        log(report.summary())
    if split:
        total = len(records)
        records = stage_split(records, split, split_stage, split_seed)
        log(f"stage split {split}: part {split_stage} has {len(records)} of {total} records")
    return records

