"""Rows of training tokens: samples packed (or not) into sequences, and their collation to tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corral.chat.templates import IGNORE_INDEX
from corral.data.clean import Sample


@dataclass
class Row:
    """One sequence of a batch. Position ids restart at each packed sample's start."""

    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def single_rows(samples: list[Sample]) -> list[Row]:
    return [Row(s.input_ids, s.targets, list(range(len(s.input_ids)))) for s in samples]


def pack_rows(samples: list[Sample], max_len: int) -> list[Row]:
    """First-fit decreasing: fill rows of at most max_len tokens with whole samples (deterministic)."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        for b, space in enumerate(free):
            if n <= space:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(max_len - n)
    rows = []
    for members in bins:
        ids, targets, positions = [], [], []
        for i in sorted(members):
            ids += samples[i].input_ids
            targets += samples[i].targets
            positions += range(len(samples[i].input_ids))
        rows.append(Row(ids, targets, positions))
    return rows


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. No attention mask is needed: padding only follows real tokens,
    which a causal model never lets them see, and padding has no targets. Padding positions continue
    the last sample's, so they do not start a new packed segment."""
    length = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        targets[i, :n] = torch.tensor(r.targets)
        last = r.position_ids[-1] if n else -1
        position_ids[i] = torch.tensor(r.position_ids + list(range(last + 1, last + 1 + length - n)))
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids}
