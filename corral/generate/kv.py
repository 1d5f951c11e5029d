"""The batching engine's KV cache: pre-allocated per-row slots, written in place.

With transformers' `DynamicCache` every decode step concatenates each layer's keys and values with
the new token's (a copy of the whole cache per step), and a request joining or leaving the batch
re-pads and re-stacks it. Here each layer owns two buffers of shape (rows, kv heads, capacity, head
dim), allocated once and grown by doubling when a longer row or more rows need room (a copy per
doubling, not per step). A decode step writes each row's new key and value at that row's own next
column and attends over a view of the buffers, so its cost does not grow with the steps taken.

Row r holds its cache in columns [start[r], end[r]): a prefill batch is copied in as it is, left
padding included (one copy per layer for the whole batch), so `start` skips a row's padding; the
next token goes to column end[r], at position end[r] - start[r] (real tokens before it). Running
rows always occupy rows 0..B-1 of the buffers: a finished row's place is taken by the last row
(moving one row, not the batch), so a decode step's view `buffer[:B, :, :width]` is never a copy,
and a new tenant of a row starts at column 0 with its own mask, so nothing of the previous
tenant's cache is visible to it.

The decode step hands the model a ready 4-D boolean mask (transformers uses a 4-D mask as it is),
so no cache method but `update` is ever called.
"""

from __future__ import annotations

import torch

_FIRST_CAPACITY = 256  # columns at first; doubled as rows grow longer


class SlotCache:
    """Per-row KV buffers for every layer, plus each row's [start, end) columns."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0
        self.start = torch.zeros(0, dtype=torch.long, device=device)
        self.end = torch.zeros(0, dtype=torch.long, device=device)
        self._index: torch.Tensor | None = None  # the rows (0..B-1) and columns written by the current step
        self._columns: torch.Tensor | None = None
        self.step_mask: torch.Tensor | None = None  # the current decode step's mask (its shape: the attended view)

    # ------------------------------------------------------------------ layout
    def capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def _reserve(self, rows: int, columns: int, like: list[torch.Tensor]) -> None:
        """Room for `rows` rows of `columns` columns; `like`: one prefill layer's keys per layer (shapes, dtype)."""
        have_rows, have_columns = self.capacity()
        if rows <= have_rows and columns <= have_columns:
            return
        new_rows = max(rows, have_rows, 1)
        new_rows = 1 << (new_rows - 1).bit_length()  # powers of two: few reallocations, fast row moves
        new_columns = max(_FIRST_CAPACITY, have_columns)
        while new_columns < columns:
            new_columns *= 2

        def grown(old: torch.Tensor | None, template: torch.Tensor) -> torch.Tensor:
            heads, dim = template.shape[1], template.shape[3]
            fresh = torch.zeros(new_rows, heads, new_columns, dim, dtype=template.dtype, device=self.device)
            if old is not None and self.rows:
                fresh[: self.rows, :, :have_columns] = old[: self.rows]
            return fresh

        olds_k = self.keys or [None] * len(like)
        olds_v = self.values or [None] * len(like)
        self.keys = [grown(o, t) for o, t in zip(olds_k, like)]
        self.values = [grown(o, t) for o, t in zip(olds_v, like)]

    def add(self, prefill_cache, mask: torch.Tensor) -> None:
        """Append a prefill batch's rows: its cache (a DynamicCache, left-padded) and its 2-D mask (rows, width)."""
        layers = prefill_cache.layers
        count, width = mask.shape
        self._reserve(self.rows + count, width + 1, [layer.keys for layer in layers])
        rows = slice(self.rows, self.rows + count)
        for buffer_k, buffer_v, layer in zip(self.keys, self.values, layers):
            buffer_k[rows, :, :width] = layer.keys
            buffer_v[rows, :, :width] = layer.values
        padding = (mask.cumsum(-1) == 0).sum(-1)  # left padding of each row
        self.start = torch.cat([self.start, padding.to(self.device)])
        self.end = torch.cat([self.end, torch.full((count,), width, dtype=torch.long, device=self.device)])
        self.rows += count

    def keep(self, kept: list[int]) -> list[int]:
        """Drop every row not in `kept`; returns the new order of the kept rows (old row indices).

        Kept rows at or past the new row count move into the places of dropped rows before it, one
        row copy each; the others stay where they are."""
        count = len(kept)
        holes = sorted(set(range(count)) - set(kept))
        movers = [r for r in kept if r >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if movers:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            columns = int(self.end[src].max())
            for buffer in (*self.keys, *self.values):
                buffer[dst, :, :columns] = buffer[src, :, :columns]
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self.start, self.end = self.start[index], self.end[index]
        self.rows = count
        return order

    def clear(self) -> None:
        """No rows; the buffers stay allocated for the next batch."""
        self.rows = 0
        self.start = self.start[:0]
        self.end = self.end[:0]

    # ------------------------------------------------------------------ one decode step
    def begin_step(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Before a decode step of all rows: (position ids (rows, 1), 4-D mask (rows, 1, 1, width)), where width
        is the longest row's columns and the new one.

        For a compiled step, whose row count should repeat, `rows` pads the step to that many rows (each padding
        row writes column 0 of a free row and sees only it). The attended view's rows and width are read from the
        mask's shape (`update`), so a compiled step that marks them dynamic serves every width with one graph."""
        rows = rows or self.rows
        width = int(self.end.max()) + 1
        # One row and one column more than the step uses: the attended view is never a whole buffer, so the guards
        # of a graph compiled over dynamic sizes hold at every size (a view equal to its buffer is a new graph).
        self._reserve(rows + 1, width + 1, self.keys)
        pad = torch.zeros(rows - self.rows, dtype=torch.long, device=self.device)
        start, end = torch.cat([self.start, pad]), torch.cat([self.end, pad])
        self._index = torch.arange(rows, device=self.device)
        self._columns = end
        column = torch.arange(width, device=self.device)[None, :]
        self.step_mask = ((column >= start[:, None]) & (column <= end[:, None]))[:, None, None, :]
        return (end - start)[:, None], self.step_mask

    def end_step(self) -> None:
        self.end = self.end + 1
        self._index = self._columns = self.step_mask = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns in use by the longest row (transformers asks it only where position ids are not given)."""
        return int(self.end.max()) if self.rows else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' Cache.update for one decode token per row: write it in place, return the attended view."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._index, :, self._columns] = key_states[:, :, 0]
        values[self._index, :, self._columns] = value_states[:, :, 0]
        rows, width = self.step_mask.shape[0], self.step_mask.shape[-1]
        return keys[:rows, :, :width], values[:rows, :, :width]
