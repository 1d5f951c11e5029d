"""Rewards, advantages and KL control of RLHF, as pure functions on (B, T) tensors over reply tokens.

Conventions: position t of a row is the t-th reply token; `mask` (B, T) is 1 on real reply tokens
(the end-of-turn token included) and 0 on padding after them. Prompt tokens never appear here, so
neither the KL penalty nor the advantage can land on them.
"""

from __future__ import annotations

import torch


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); padding is left at 0.
    `total(t)` sums a tensor over processes when each holds a share of the rows (data parallel)."""
    total = total or (lambda t: t)
    mask = mask.to(x.dtype)
    n = total(mask.sum())
    mean = total((x * mask).sum()) / n.clamp(min=1)
    var = total((((x - mean) ** 2) * mask).sum()) / (n.clamp(min=2) - 1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, clip: float | None = None) -> torch.Tensor:
    """Per-token rewards: -kl_coef * (log pi - log pi_ref) on every reply token, plus the sequence score
    (clipped to [-clip, clip] when given) on the last real token. Returns rewards (B, T)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al.) over reply tokens. The value after a row's
    last real token is 0 (the episode ends). Returns (advantages, returns) (B, T), 0 on padding."""
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, kind: str = "rloo", eps: float = 1e-6) -> torch.Tensor:
    """Critic-free baselines over k samples per prompt. scores (P, k) -> advantages (P, k).
    rloo: r_i minus the mean of the other k-1 (Ahmadian et al.); grpo: (r_i - mean) / (std + eps) (Shao et al.)."""
    k = scores.shape[1]
    if k < 2:
        raise ValueError(f"advantage={kind} needs at least 2 samples per prompt, got {k}")
    if kind == "rloo":
        return scores - (scores.sum(1, keepdim=True) - scores) / (k - 1)
    if kind == "grpo":
        return (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + eps)
    raise ValueError(f"advantage '{kind}': expected gae, rloo or grpo")


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019): after each batch,
    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target:
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
