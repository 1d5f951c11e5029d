"""RL on a tiny model with a rule-based reward (the share of reply tokens from a chosen set):
the mean reward rises clearly, with the critic-free rloo baseline and with PPO's critic + GAE."""

from __future__ import annotations

import copy

import pytest
import torch

from corral.chat.conversation import Conversation
from corral.chat.templates import get_template
from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingParams
from corral.models.load import load_model, load_tokenizer
from corral.train.ppo.advantages import KLController
from corral.train.ppo.critic import Critic
from corral.train.ppo.rollout import sample_replies
from corral.train.ppo.step import PPOSettings, make_experience, ppo_update

PROMPTS = [Conversation.from_pairs(("user", text)) for text in ("Who are you?", "Hello", "What can you do?", "Hi")]


def rollout_rewards(samples, wanted: set[int]) -> torch.Tensor:
    return torch.tensor([sum(t in wanted for t in r) / len(r) for r in samples.reply_ids])


@pytest.mark.parametrize("advantage", ["rloo", "gae"])
def test_rl_raises_a_rule_based_reward(tiny_model_dir, advantage):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    fmt = get_template("auto", tokenizer)
    actor = load_model(str(tiny_model_dir))
    ref = copy.deepcopy(actor).eval().requires_grad_(False)
    engine = TransformersEngine(actor, tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    # The random-init policy is near uniform over its vocabulary: reward the share of reply tokens from
    # one half of it (about 0.5 at the start, 1.0 at best), a dense signal a few steps can move.
    wanted = set(range(len(tokenizer) // 2))
    settings = PPOSettings(advantage=advantage, epochs=2, minibatch=8, whiten=True)
    critic = critic_opt = None
    if advantage == "gae":
        critic = Critic(load_model(str(tiny_model_dir), head="score", pad_token_id=engine.pad_id))
        critic.train()
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    optimizer = torch.optim.AdamW(actor.parameters(), lr=1e-2)
    kl = KLController(0.01)
    means = []
    for step in range(14):
        samples = sample_replies(engine, fmt, PROMPTS, params, k=4, seeds=[step * 100 + i for i in range(len(PROMPTS))])
        scores = rollout_rewards(samples, wanted)
        means.append(scores.mean().item())
        exp = make_experience(actor, samples, scores, kl, settings, engine.pad_id, ref_model=ref, critic=critic)
        stats = ppo_update(actor, stepper(optimizer), exp, settings, critic=critic, critic_step=stepper(critic_opt),
                           generator=torch.Generator().manual_seed(step))  # fmt: skip
        assert {"policy_loss", "clip_frac", "approx_kl", "entropy", "grad_norm"} <= set(stats)
        if advantage == "gae":
            assert "value_loss" in stats
    print(advantage, [round(m, 2) for m in means])
    assert sum(means[-3:]) / 3 > sum(means[:3]) / 3 + 0.15


def stepper(optimizer, max_grad_norm: float = 1.0):
    """What the harness's `Trained.step` does, for an optimizer outside a harness (None: no critic)."""
    if optimizer is None:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step() -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    return step


@pytest.mark.parametrize("advantage", ["rloo", "grpo", "gae"])
def test_on_policy_update_without_the_old_logprob_pass_is_the_same_update(tiny_model_dir, advantage):
    """One epoch of one mini-batch takes the old log-probs, old values and advantages from the update's own
    forward: the same step as computing them in a pass of their own first."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    fmt = get_template("auto", tokenizer)
    start = load_model(str(tiny_model_dir))
    engine = TransformersEngine(start, tokenizer)
    samples = sample_replies(engine, fmt, PROMPTS[:2], SamplingParams(max_new_tokens=6, temperature=1.0), k=3,
                             seeds=[1, 2])  # fmt: skip
    scores = rollout_rewards(samples, set(range(len(tokenizer) // 2)))
    settings = PPOSettings(advantage=advantage, epochs=1, minibatch=len(samples))
    results = {}
    for fuse in (False, True):
        torch.manual_seed(0)
        actor = copy.deepcopy(start).train()
        ref = copy.deepcopy(start).eval().requires_grad_(False)
        with torch.no_grad():  # move the actor off the reference, so the KL penalty is not zero
            for p in actor.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        critic = critic_opt = None
        if advantage == "gae":
            critic = Critic(load_model(str(tiny_model_dir), head="score", pad_token_id=engine.pad_id)).train()
            critic_opt = torch.optim.SGD(critic.parameters(), lr=0.1)
        optimizer = torch.optim.SGD(actor.parameters(), lr=0.1)
        perturbed = {n: p.detach().clone() for n, p in actor.named_parameters()}  # the weights the update starts at
        exp = make_experience(actor, samples, scores, KLController(0.1), settings, engine.pad_id, ref_model=ref,
                              critic=critic, fuse=fuse)  # fmt: skip
        assert (exp.old_logprobs is None) == fuse and (exp.advantages is None) == fuse
        stats = {**exp.stats, **ppo_update(actor, stepper(optimizer), exp, settings, critic=critic,
                                           critic_step=stepper(critic_opt), generator=torch.Generator().manual_seed(0))}  # fmt: skip
        results[fuse] = stats, [p.detach().clone() for p in [*actor.parameters(), *(critic or actor).parameters()]]
        # It did train: full fine-tuning with SGD moves every actor weight tensor off where the update started.
        assert [n for n, p in actor.named_parameters() if torch.equal(p, perturbed[n])] == []
    (separate, weights_a), (fused, weights_b) = results[False], results[True]
    assert separate.keys() == fused.keys() and abs(separate["kl"]) > 1e-3
    for key in separate:
        assert fused[key] == pytest.approx(separate[key], rel=1e-4, abs=1e-6), key
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights_a, weights_b))
