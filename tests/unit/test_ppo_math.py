"""PPO's math against hand-computed values: GAE, token rewards and where the KL lands, clipped policy
and value losses, adaptive KL control, EMA, and the rloo / grpo baselines."""

from __future__ import annotations

import math

import pytest
import torch

from corral.train.losses import entropy_from_logprobs, ppo_policy_loss, ppo_value_loss
from corral.train.ppo.advantages import KLController, gae, group_advantages, masked_whiten, token_rewards
from corral.train.ppo.ema import EMA


def test_gae_by_hand():
    # one row of 3 reply tokens, then padding
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])  # the padding value must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 + 0 - 0.7  # the value after the last real token is 0
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0])


def test_token_rewards_put_kl_on_reply_tokens_and_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after 2 tokens
    scores = torch.tensor([2.0, -7.0])
    rewards = token_rewards(scores, logprobs, ref, mask, kl_coef=0.1, clip=5.0)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 0.0 + 2.0])
    assert rewards[1].tolist() == pytest.approx([-0.1, -0.2 - 5.0, 0.0])  # clipped score on its last real token


def test_ppo_policy_loss_clipping():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); 0.5 -> max(-0.5, -0.8) = -0.5;
    # 1.1 with A=-2 -> max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert stats["approx_kl"] == pytest.approx(expected_kl)
    # padding does not count
    loss_pad, _ = ppo_policy_loss(torch.cat([new, torch.tensor([[5.0]])], 1), torch.zeros(1, 4),
                                  torch.cat([adv, torch.tensor([[3.0]])], 1), torch.tensor([[1.0, 1, 1, 0]]))
    assert loss_pad.item() == pytest.approx(loss.item())


def test_ppo_value_loss_clipping():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped v = 0.7 -> 1.69 -> 1.69; token 1: (0-1)^2 = 1 both
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert stats["value_clip_frac"] == pytest.approx(0.5)


def test_adaptive_kl_controller():
    fixed = KLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    ctl = KLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 100)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped at +0.2
    ctl.update(5.4, 100)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.01) * (1 - 0.1 * 0.01))
    other = KLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value and other.target == 6.0


def test_group_baselines():
    scores = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    rloo = group_advantages(scores, "rloo")
    assert rloo[0].tolist() == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5])
    assert rloo[1].tolist() == pytest.approx([-1.5, -1.5, 3.0])
    grpo = group_advantages(scores, "grpo")
    mean, std = 3.0, torch.tensor([1.0, 2.0, 6.0]).std().item()
    assert grpo[0].tolist() == pytest.approx([(1 - mean) / std, (2 - mean) / std, (6 - mean) / std], rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(scores[:, :1], "rloo")


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = masked_whiten(x, mask)
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_ema_update():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert ema.shadow["weight"][0].tolist() == pytest.approx([1.2, 1.2])  # 0.9 * 1 + 0.1 * 3
    ema.update(model)
    assert ema.shadow["weight"][0].tolist() == pytest.approx([0.9 * 1.2 + 0.3] * 2)
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.equal(target.weight.detach(), ema.shadow["weight"])


def test_entropy():
    uniform = torch.zeros(4)
    assert entropy_from_logprobs(uniform.log_softmax(-1)).item() == pytest.approx(math.log(4))
