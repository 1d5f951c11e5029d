"""An exponential moving average of the trainable weights (DeepSpeed-Chat's `actor_ema`):
shadow = decay * shadow + (1 - decay) * weight after each optimizer step, kept in float32."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay: expected 0 < decay < 1, got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(param.detach().float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model with the EMA weights in place of its own, restored (exactly) on leaving."""
        live = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in live:
                        param.copy_(live[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """Each average back on its weight's device: accelerate's loader reads custom state onto the CPU."""
        self.decay = state["decay"]
        self.shadow = {n: t.to(self.shadow[n].device if n in self.shadow else t.device, torch.float32)
                       for n, t in state["shadow"].items()}  # fmt: skip
