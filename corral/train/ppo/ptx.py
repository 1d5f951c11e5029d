"""The pretraining mix (InstructGPT's ptx): a language-modelling loss on SFT conversations added to each
actor step, so RL does not wear away what SFT taught."""

from __future__ import annotations

import random

import torch


class PtxBatches:
    """`ptx(key, rank, world)` -> (this process's summed LM loss, target count of the whole batch) on `batch`
    conversations drawn with `key` (seeded: a resumed run draws the same); each process takes every world-th."""

    def __init__(self, path: str, *, data_format: str, skip_invalid: bool, template, max_len: int, batch: int,
                 seed: int, pad_id: int, log):
        from corral.data.clean import conversations_to_samples
        from corral.data.formats import read_conversations
        from corral.data.pack import single_rows

        conversations, report = read_conversations(path, data_format, skip_invalid)
        log(f"ptx: {report.summary()}")
        samples, split = conversations_to_samples(conversations, template, max_len)
        log(f"ptx: {split.summary()}")
        self.rows = single_rows(samples)
        if not self.rows:
            raise ValueError(f"ptx.path={path}: no conversations with a trained reply")
        self.batch, self.seed, self.pad_id = batch, seed, pad_id

    def __call__(self, model, key: int, rank: int, world: int) -> tuple[torch.Tensor, int]:
        from corral.data.pack import collate
        from corral.models.forward import final_hidden, output_head
        from corral.train.losses import token_nll_sum

        chosen = random.Random(self.seed * 31 + key).sample(self.rows, min(self.batch, len(self.rows)))
        count = sum(row.num_targets for row in chosen)
        device = next(model.parameters()).device
        batch = {k: v.to(device) if hasattr(v, "to") else v
                 for k, v in collate(chosen[rank::world], pad_id=self.pad_id).items()}  # fmt: skip
        hidden = final_hidden(model, batch["input_ids"], batch["position_ids"])
        loss_sum, _ = token_nll_sum(hidden, output_head(model), batch["targets"])
        return loss_sum, count
