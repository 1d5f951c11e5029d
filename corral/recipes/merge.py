"""`corral merge`: fold a LoRA (or QLoRA) adapter into its base model and write a plain HF folder."""

from __future__ import annotations

from corral.config import MergeConfig
from corral.models.adapters import merge_adapter


def run(cfg: MergeConfig):
    path = merge_adapter(cfg.adapter, cfg.output_dir, cfg.dtype)
    print(f"merged {cfg.adapter} into its base: {path} (loads with plain transformers)")
    return path
