"""`corral ppo` end to end on a tiny model with a reward function: rollouts, updates, metrics, samples,
the actor and its EMA saved as loadable folders."""

from __future__ import annotations


import torch

from corral.atomic import read_jsonl
from corral.config import PPOConfig
from corral.models.load import load_model
from corral.recipes.ppo import prompt_of, run
from corral.chat.conversation import Conversation


def vowel_share(prompt: str, reply: str) -> float:
    """A rule-based reward for the test: the share of vowels in the reply."""
    return sum(c in "aeiou" for c in reply) / max(1, len(reply))


def test_prompt_is_everything_before_the_last_reply():
    conv = Conversation.from_pairs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), system="s")
    assert [m.content for m in prompt_of(conv).messages] == ["s", "a", "b", "c"]
    assert prompt_of(Conversation.from_pairs(("assistant", "x"))) is None


def test_ppo_recipe_runs_and_saves(tmp_path, tiny_model_dir):
    for advantage, k in (("gae", 1), ("grpo", 2)):
        out = tmp_path / advantage
        cfg = PPOConfig(model=str(tiny_model_dir), reward="tests.unit.test_ppo_recipe:vowel_share", output_dir=str(out),
                        advantage=advantage, samples_per_prompt=k, steps=3, prompts_per_step=2, max_new_tokens=6,
                        minibatch=2, lr=1e-3, ema_decay=0.9, sample_every=2, ptx_path="builtin:corral_identity",
                        ptx_coef=0.5, kl_target=1.0, data={"path": "builtin:corral_identity"})  # fmt: skip
        result = run(cfg)
        rows = read_jsonl(out / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3]
        for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "entropy", "clip_frac", "approx_kl", "ptx_loss",
                    "gen_tok_s", "train_tok_s", "reply_len"):
            assert key in rows[-1], key
        assert ("value_loss" in rows[-1]) == (advantage == "gae")
        assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # adaptive KL moved
        samples = read_jsonl(out / "samples.jsonl")
        assert {s["step"] for s in samples} == {1, 2, 3} and all("reply" in s for s in samples)
        actor = load_model(str(out / "actor"))
        ema = load_model(str(out / "actor_ema"))
        lora = [n for n, _ in actor.named_parameters() if "lora_A" in n]
        assert lora
        a = dict(actor.named_parameters())[lora[0]]
        e = dict(ema.named_parameters())[lora[0]]
        assert not torch.equal(a, e)  # the EMA is its own weights
        assert result["last"]["step"] == 3


def test_ppo_from_an_sft_adapter_starts_at_its_reference(tmp_path, tiny_lora_dir):
    """The reference is the SFT model (adapter merged), so the first rollout's KL is zero."""
    out = tmp_path / "from_adapter"
    cfg = PPOConfig(model=str(tiny_lora_dir), reward="tests.unit.test_ppo_recipe:vowel_share", output_dir=str(out),
                    advantage="rloo", samples_per_prompt=2, steps=2, prompts_per_step=2, max_new_tokens=6,
                    data={"path": "builtin:corral_identity"})  # fmt: skip
    run(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    assert abs(rows[0]["kl"]) < 1e-4
    actor = load_model(str(out / "actor"))  # a full model: the SFT adapter and the new LoRA folded in
    assert not hasattr(actor, "peft_config")
