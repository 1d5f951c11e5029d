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


def _token_mean(values: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor | float | None) -> torch.Tensor:
    """Sum of `values` over `mask`, divided by `normalizer` (default: the mask's own count). A data-parallel
    shard passes the whole mini-batch's token count, so the shards' losses add up to the mini-batch's."""
    total = (values * mask).sum()
    return total / (mask.sum().clamp(min=1) if normalizer is None else max(float(normalizer), 1.0))


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (Schulman et al.): mean over reply tokens of max(-A r, -A clip(r, 1-e, 1+e)),
    r = exp(logp - logp_old). All (B, T). Returns (loss, {clip_frac, approx_kl}) with approx_kl the
    k3 estimator (r - 1) - log r of the new policy from the one that sampled. `normalizer`: the token
    count to divide by (default mask.sum()); the stats are divided by it too."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = _token_mean(torch.maximum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        stats = {"clip_frac": _token_mean((clipped > unclipped).float(), mask, normalizer).item(),
                 "approx_kl": _token_mean((ratio - 1) - log_ratio, mask, normalizer).item()}  # fmt: skip
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2, normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * mean over reply tokens of max((v - R)^2, (clip(v, v_old +- e) - R)^2)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(unclipped_err, clipped_err), mask, normalizer)
    with torch.no_grad():
        stats = {"value_clip_frac": _token_mean((clipped_err > unclipped_err).float(), mask, normalizer).item()}
    return loss, stats


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution, from its log-softmax: (..., vocab) -> (...)."""
    return -(logprobs.exp() * logprobs).sum(-1)
