"""Losses as pure functions on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from corral.chat.templates import IGNORE_INDEX


def token_nll_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over trained positions only.

    hidden (B, L, H) final hidden states; targets (B, L) the token predicted at each position, or
    IGNORE_INDEX. Returns (loss_sum (), num_targets ()). The output head runs only where a target
    exists: logits for untrained positions (the prompt, template text, padding) are never built,
    which saves most of the (B, L, vocab) memory and time.
    """
    trained = targets != IGNORE_INDEX
    logits = head(hidden[trained]).float()  # (N, vocab)
    return F.cross_entropy(logits, targets[trained], reduction="sum"), trained.sum()


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of a reward model. chosen, rejected (B,) scores. Returns (B,) -log sigmoid(rc - rr - margin)."""
    return -torch.nn.functional.logsigmoid(chosen.float() - rejected.float() - margin)
