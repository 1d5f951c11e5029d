"""The output head of the batching engine's forward passes, run by us on CPU where that is faster.

On CPU, MKL's float32 matmul is slow for a few rows against a large output head (a decode step's
shape): head @ hidden.T is 2-4x faster than hidden @ head.T at 2-16 rows on SmolLM2's 49k x 576 head
(measured on 2 AVX2 cores: 8 rows 12 ms against 43 ms). So a model whose output head is a plain
bias-free Linear has its logits computed here, after checking once, on the first batch, that they
equal the model's own (a model that scales or caps its logits keeps its own head).
"""

from __future__ import annotations

import torch

_NO_POSITIONS = torch.empty(0, dtype=torch.long)  # logits_to_keep: the model builds no logits (we do)


class LastLogits:
    """Each row's last-position logits from a model output, by the cheaper of two equal ways.

    `weight`: the output head's weight once checked (we run the head); None: not checked yet (the
    next batch checks); False: the model's own logits (off CPU, or the check failed)."""

    def __init__(self, model, device: torch.device):
        self.model = model
        self.weight: torch.Tensor | bool | None = None if device.type == "cpu" else False
        self.linear = None  # F.linear's equal that `project` runs the head with (packed weights), None: our matmul

    def forward_kwargs(self) -> dict:
        """What the model's forward needs: no logits of its own once we run the head, hidden states unless never."""
        return {"logits_to_keep": _NO_POSITIONS if isinstance(self.weight, torch.Tensor) else 1,
                "output_hidden_states": self.weight is not False}

    def __call__(self, out) -> torch.Tensor:
        """(B, vocab) float logits of each row's last position."""
        if self.weight is False:
            return out.logits[:, -1, :].float()
        hidden = out.hidden_states[-1][:, -1, :]
        if self.weight is None:
            own = out.logits[:, -1, :].float()
            head = self.model.get_output_embeddings()
            plain = type(head) is torch.nn.Linear and head.bias is None
            ours = (head.weight @ hidden.T).T.float() if plain else None
            self.weight = head.weight if plain and torch.allclose(ours, own, rtol=1e-4, atol=1e-4) else False
            return own
        return self.project(hidden)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, vocab) float logits of last-position hidden states (B, hidden), once the head is ours to run."""
        if self.linear is not None:
            return self.linear(hidden, self.weight).float()
        return (self.weight @ hidden.T).T.float()
