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
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
    kind: str = "dpo",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO / IPO / SimPO on summed reply log-probs (B,) (SimPO: length-averaged, no reference).

    dpo:   -(1-ls) log s(b h) - ls log s(-b h),   h = (pc - rc) - (pr - rr)      (Rafailov et al.; cDPO smoothing)
    ipo:   (h - 1/(2b))^2                                                         (Azar et al.)
    simpo: -(1-ls) log s(b (pc - pr) - g) - ls log s(-(b (pc - pr) - g))          (Meng et al.)
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are b * (policy - ref)
    (SimPO: b * policy), detached.
    """
    logsigmoid = F.logsigmoid
    if kind == "simpo":
        logits = beta * (chosen_logps - rejected_logps) - simpo_gamma
        losses = -(1 - label_smoothing) * logsigmoid(logits) - label_smoothing * logsigmoid(-logits)
        return losses, (beta * chosen_logps).detach(), (beta * rejected_logps).detach()
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"{kind} needs reference log-probs")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if kind == "dpo":
        losses = -(1 - label_smoothing) * logsigmoid(beta * h) - label_smoothing * logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss '{kind}': expected dpo, ipo or simpo")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def sequence_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's trained targets, and their count. hidden (B, L, H), targets (B, L)
    with IGNORE_INDEX where untrained. Returns (B,) sums and (B,) counts. The head runs on trained
    positions only, so no (B, L, vocab) tensor is ever built."""
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    logits = head(hidden[mask]).float()
    token_logps = logits.log_softmax(-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(targets.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    return sums, mask.sum(-1)
