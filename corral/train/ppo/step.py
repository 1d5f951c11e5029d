"""One RL step after a rollout: experience (old log-probs, reference log-probs, rewards, advantages)
and the clipped-PPO update over several epochs of mini-batches.

Advantages: `gae` (per-token rewards with the KL penalty, a critic's values, GAE), or the critic-free
`rloo` / `grpo` (the KL-penalised sequence reward against the other samples of the same prompt,
broadcast to every reply token).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from corral.train.losses import ppo_policy_loss, ppo_value_loss
from corral.train.ppo.advantages import KLController, gae, group_advantages, masked_whiten, token_rewards
from corral.train.ppo.rollout import Samples, batch_tensors, reply_logprobs


@dataclass(frozen=True)
class PPOSettings:
    advantage: str = "gae"  # gae | rloo | grpo
    epochs: int = 1  # PPO epochs over each rollout batch
    minibatch: int = 4  # samples per optimizer step
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    reward_clip: float | None = 10.0
    whiten: bool = True
    entropy_coef: float = 0.0


@dataclass
class Experience:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    reply_mask: torch.Tensor
    reply_start: torch.Tensor
    ref_logprobs: torch.Tensor
    scores: torch.Tensor
    k: int  # samples per prompt (rows i*k .. i*k+k-1 share a prompt)
    # None when on-policy (`on_policy`): then the update's own first forward is the sampling policy, and
    # these come from it instead of a separate pass.
    old_logprobs: torch.Tensor | None
    advantages: torch.Tensor | None
    returns: torch.Tensor | None
    old_values: torch.Tensor | None
    stats: dict


def on_policy(settings: PPOSettings, n: int) -> bool:
    """One epoch of one mini-batch: the update's forward runs the very weights that sampled, so the old
    log-probs (and old values) are that forward's, detached, and no pass of their own is needed (TRL's GRPO
    does the same when it generates and updates in step)."""
    return settings.epochs == 1 and settings.minibatch >= n


def reference_context(actor):
    """With a LoRA actor the reference is the same base with the adapter disabled."""
    return actor.disable_adapter() if hasattr(actor, "disable_adapter") else nullcontext()


def compute_advantages(rows: torch.Tensor, old_logp, ref_logp, scores, mask, n: int, k: int, settings: PPOSettings,
                       kl_coef: float, values=None, total=None):
    """Advantages (and GAE returns) of the rollout's rows `rows` (all n of them, or a process's share, with
    `total` summing a tensor over the processes). gae: per-token rewards with the KL penalty and the critic's
    values; rloo / grpo: the KL-penalised sequence reward against the other samples of the same prompt,
    broadcast to every reply token. Returns (advantages, returns or None, per-token KL), all (b, T)."""
    total = total or (lambda t: t)
    kl_tokens = (old_logp - ref_logp) * mask
    rows = rows.to(kl_tokens.device)  # a mini-batch's rows come from a CPU permutation; index_copy wants one device
    returns = None
    if settings.advantage == "gae":
        if values is None:
            raise ValueError("advantage=gae needs a critic")
        rewards = token_rewards(scores, old_logp, ref_logp, mask, kl_coef, settings.reward_clip)
        advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
    else:
        clipped = scores.clamp(-settings.reward_clip, settings.reward_clip) if settings.reward_clip else scores
        shaped = torch.zeros(n, dtype=kl_tokens.dtype, device=kl_tokens.device)
        shaped = total(shaped.index_copy(0, rows, clipped - kl_coef * kl_tokens.sum(-1)))  # every row, once
        advantages = group_advantages(shaped.view(-1, k), settings.advantage).view(-1)[rows, None] * mask
    if settings.whiten:
        advantages = masked_whiten(advantages, mask, total=total)
    return advantages, returns, kl_tokens


def in_chunks(fn: Callable[..., torch.Tensor], rows: int, size: int | None, *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors) computed `size` rows at a time (None: all at once), concatenated along the rows."""
    size = size or rows
    return torch.cat([fn(*(t[lo : lo + size] for t in tensors)) for lo in range(0, rows, size)])


@torch.no_grad()
def make_experience(actor, samples: Samples, scores: torch.Tensor, kl: KLController, settings: PPOSettings,
                    pad_id: int, ref_model=None, critic=None, fuse: bool | None = None,
                    rows_per_forward: int | None = None) -> Experience:
    """scores (N,) one reward per sample. ref_model None: the actor with its adapter disabled.
    `fuse` (default `on_policy`): leave the old log-probs, values and advantages to the update's forward.
    `rows_per_forward`: the reference, old-policy and critic passes run that many rows at a time (None: the whole
    rollout at once); each builds (rows, reply length, vocabulary) float32 log-probs, which for a whole rollout
    of a real vocabulary does not fit on a GPU."""
    from corral.models.forward import unwrap

    actor, critic = unwrap(actor), unwrap(critic) if critic is not None else None
    if settings.advantage == "gae" and critic is None:
        raise ValueError("advantage=gae needs a critic")
    device = next(actor.parameters()).device
    ids, attention, reply_mask, start = batch_tensors(samples.prompt_ids, samples.reply_ids, pad_id, device)
    n = len(samples)
    fuse = on_policy(settings, n) if fuse is None else fuse
    was_training = actor.training
    actor.eval()
    tensors = (ids, attention, reply_mask, start)
    if ref_model is None:
        with reference_context(actor):
            ref_logp = in_chunks(lambda *t: reply_logprobs(actor, *t), n, rows_per_forward, *tensors)
    else:
        ref_logp = in_chunks(lambda *t: reply_logprobs(ref_model, *t), n, rows_per_forward, *tensors)
    old_logp = None if fuse else in_chunks(lambda *t: reply_logprobs(actor, *t), n, rows_per_forward, *tensors)
    actor.train(was_training)
    scores = scores.to(device).float()
    stats = {"reward_mean": scores.mean().item(), "reward_std": scores.std().item() if n > 1 else 0.0,
             "kl_coef": kl.value, "reply_len": reply_mask.sum(-1).float().mean().item()}  # fmt: skip
    values = advantages = returns = None
    if not fuse:
        values = in_chunks(critic, n, rows_per_forward, *tensors) if settings.advantage == "gae" else None
        advantages, returns, kl_tokens = compute_advantages(torch.arange(n, device=device), old_logp, ref_logp,
                                                            scores, reply_mask, n, samples.k, settings, kl.value,
                                                            values)  # fmt: skip
        stats["kl"] = kl_tokens.sum(-1).mean().item()
    return Experience(ids, attention, reply_mask, start, ref_logp, scores, samples.k, old_logp, advantages, returns,
                      values, stats)  # fmt: skip


def ppo_update(actor, actor_step: Callable[[], torch.Tensor], exp: Experience, settings: PPOSettings, critic=None,
               critic_step: Callable[[], torch.Tensor] | None = None, ptx_fn=None, ptx_coef: float = 0.0,
               generator: torch.Generator | None = None, accelerator=None) -> dict:
    """`settings.epochs` passes over the experience in shuffled mini-batches; one optimizer step each.

    `actor_step()` / `critic_step()` clip, step the optimizer and its schedule, zero the gradients and return the
    gradient norm (the harness's `Trained.step`): the update owns the losses and backward passes, not the
    optimizers.

    Data parallel: every process holds the whole experience and takes every world-th row of each
    mini-batch; losses are divided by the whole mini-batch's token count, so the processes' gradients
    add up to exactly the one-process gradient. On-policy experience (no old log-probs) takes them, the
    critic's old values and the advantages from the update's own forward. `ptx_fn(key, rank, world)` ->
    (loss_sum, count) adds `ptx_coef` x a language-modelling loss on pretraining/SFT data (count over all
    processes)."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    backward = accelerator.backward if accelerator else torch.Tensor.backward
    no_sync = accelerator.no_sync if accelerator and world > 1 else (lambda model: nullcontext())
    n = exp.input_ids.shape[0]
    if exp.old_logprobs is None and not on_policy(settings, n):
        raise ValueError("the experience left its old log-probs to the update, which takes more than one step")
    total = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
    totals: dict[str, float] = {}
    steps = 0
    # On-policy, the update's forward stands for the sampling policy, which ran in eval mode: dropout stays
    # off (as RLHF trainers commonly run it), so the old log-probs and the KL penalty are the sampler's own.
    fused = exp.old_logprobs is None
    was_training = actor.training, critic.training if critic is not None else False
    actor.train(not fused)
    if critic is not None:
        critic.train(not fused)
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        for lo in range(0, n, settings.minibatch):
            batch = order[lo : lo + settings.minibatch]
            tokens = float(exp.reply_mask[batch].sum())  # the whole mini-batch's, on every process
            idx = batch[rank::world].to(exp.input_ids.device)  # the permutation is drawn on the CPU
            mask = exp.reply_mask[idx]
            logp, entropy = reply_logprobs(actor, exp.input_ids[idx], exp.attention_mask[idx], mask,
                                           exp.reply_start[idx], with_entropy=True,
                                           entropy_grad=bool(settings.entropy_coef))  # fmt: skip
            with_critic = critic is not None and settings.advantage == "gae"
            values = None
            stats = {}
            if fused:  # on-policy: this forward is the policy that sampled
                if with_critic:  # the advantages need the values now: both graphs are held until the backwards
                    values = critic(exp.input_ids[idx], exp.attention_mask[idx], mask, exp.reply_start[idx])
                old_logp, old_values = logp.detach(), values.detach() if values is not None else None
                advantages, returns, kl_tokens = compute_advantages(idx, old_logp, exp.ref_logprobs[idx],
                                                                    exp.scores[idx], mask, n, exp.k, settings,
                                                                    exp.stats["kl_coef"], old_values, total)  # fmt: skip
                stats["kl"] = kl_tokens.sum().item() / n  # this process's share of the mean sequence KL
            else:
                old_logp, advantages = exp.old_logprobs[idx], exp.advantages[idx]
                old_values = exp.old_values[idx] if exp.old_values is not None else None
                returns = exp.returns[idx] if exp.returns is not None else None
            loss, policy_stats = ppo_policy_loss(logp, old_logp, advantages, mask, settings.clip, tokens)
            stats |= policy_stats
            mean_entropy = (entropy * mask).sum() / max(tokens, 1.0)
            stats["policy_loss"] = loss.item()
            stats["entropy"] = mean_entropy.item()
            if settings.entropy_coef:
                loss = loss - settings.entropy_coef * mean_entropy
            # DDP averages gradients over processes; each process's loss is its share of the sum: scale back.
            if ptx_fn is not None and ptx_coef:
                with no_sync(actor):  # the gradients are reduced once, after the ptx backward below
                    backward(loss * world)
                ptx_sum, ptx_count = ptx_fn(steps, rank, world)
                ptx_loss = ptx_sum / max(float(ptx_count), 1.0)
                backward(ptx_coef * ptx_loss * world)
                stats["ptx_loss"] = ptx_loss.item()
            else:
                backward(loss * world)
            stats["grad_norm"] = float(actor_step()) / world  # the same on every process: the sum over them is right
            if with_critic:
                if values is None:
                    values = critic(exp.input_ids[idx], exp.attention_mask[idx], mask, exp.reply_start[idx])
                vloss, vstats = ppo_value_loss(values, old_values, returns, mask, settings.value_clip, tokens)
                backward(vloss * world)
                critic_step()
                stats |= {"value_loss": vloss.item(), **vstats}
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
    actor.train(was_training[0])
    if critic is not None:
        critic.train(was_training[1])
    if world > 1:  # each process holds its share of every figure: add them up
        summed = accelerator.reduce(torch.tensor(list(totals.values()), dtype=torch.float64,
                                                 device=accelerator.device), reduction="sum")  # fmt: skip
        totals = dict(zip(totals, summed.tolist()))
    return {key: value / steps for key, value in totals.items()}
