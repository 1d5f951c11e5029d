"""`corral ppo` end to end on a tiny model with a reward function: rollouts, updates, metrics, samples,
the actor and its EMA saved as loadable folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from corral.atomic import read_jsonl
from corral.config import PPOConfig
from corral.models.load import load_model
from corral.recipes.ppo import prompt_of, run
from corral.train.ppo.rollout import Samples
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
    """The actor continues the SFT adapter and the reference is that adapter frozen: the first KL is zero (with
    the adapter's dropout too: on-policy, the update's forward is the sampler's, in eval mode), and the saved
    actor is an adapter of the same base that moved away from the SFT one."""
    from safetensors.torch import load_file

    sft_dir = tmp_path / "sft"
    shutil.copytree(tiny_lora_dir, sft_dir)
    config = json.loads((sft_dir / "adapter_config.json").read_text())
    (sft_dir / "adapter_config.json").write_text(json.dumps(config | {"lora_dropout": 0.3}))
    out = tmp_path / "from_adapter"
    cfg = PPOConfig(model=str(sft_dir), reward="tests.unit.test_ppo_recipe:vowel_share", output_dir=str(out),
                    advantage="rloo", samples_per_prompt=2, steps=2, prompts_per_step=2, max_new_tokens=6, lr=1e-2,
                    data={"path": "builtin:corral_identity"})  # fmt: skip
    run(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    assert abs(rows[0]["kl"]) < 1e-4 and rows[1]["kl"] != 0
    actor = load_model(str(out / "actor"))
    assert actor.peft_config["default"].lora_dropout == 0.3
    assert actor.peft_config["default"].base_model_name_or_path == load_model(str(tiny_lora_dir)).peft_config[
        "default"].base_model_name_or_path
    sft, trained = load_file(tiny_lora_dir / "adapter_model.safetensors"), load_file(out / "actor" / "adapter_model.safetensors")
    assert sft.keys() == trained.keys() and any(not torch.equal(sft[k], trained[k]) for k in sft)


@pytest.fixture
def tiny_rm_adapter(tmp_path, tiny_model_dir):
    """A LoRA reward model of the tiny base (random, non-zero adapter and head), as `corral reward` saves one."""
    from corral.models.adapters import add_lora
    from corral.models.reward import load_reward_model

    torch.manual_seed(3)
    rm = add_lora(load_reward_model(str(tiny_model_dir), dtype="float32", pad_token_id=1), 4, 8, 0.0,
                  ["q_proj", "v_proj"], task_type="SEQ_CLS", modules_to_save=["score"])  # fmt: skip
    for name, p in rm.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            torch.nn.init.normal_(p, std=0.5)
    rm.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_all_four_roles_share_one_base(tmp_path, tiny_model_dir, tiny_rm_adapter):
    """Actor (LoRA), reference (adapter disabled), LoRA reward model and critic hold one copy of the base, and
    each role still computes what it computes when loaded on its own."""
    from corral.models.reward import load_reward_model, sequence_scores
    from corral.models.shared import weight_bytes
    from corral.recipes.ppo import build_roles
    from corral.train.ppo.rollout import batch_tensors

    cfg = PPOConfig(model=str(tiny_model_dir), reward=str(tiny_rm_adapter), output_dir=str(tmp_path / "o"),
                    advantage="gae", data={"path": "builtin:corral_identity"},
                    lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
    roles = build_roles(cfg, pad_id=1, log=print)
    alone = load_reward_model(str(tiny_rm_adapter), dtype="float32", pad_token_id=1)
    separate = weight_bytes(roles.actor) + weight_bytes(alone) * 2  # actor + reward model + critic, each loaded alone
    shared = weight_bytes(*roles.models)
    assert shared < 1.1 * roles.base_bytes < separate / 2.5
    ids, attention, reply_mask, start = batch_tensors([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_id=1)
    expected = sequence_scores(alone, ids, attention)
    samples = Samples([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], ["", ""], ["stop", "stop"], k=1)
    assert torch.allclose(roles.scorer(samples), expected, atol=1e-5)
    # The critic starts as the reward model read at every reply position: V before the first reply token is
    # the reward model's score of the prompt alone.
    values = roles.critic(ids, attention, reply_mask, start)
    prompts, prompt_attention, _, _ = batch_tensors([[5, 6, 7], [8, 9]], [[], []], pad_id=1)
    assert torch.allclose(values[:, 0], sequence_scores(alone, prompts, prompt_attention), atol=1e-5)
    critic_trainable = [n for n, p in roles.critic.named_parameters() if p.requires_grad]
    assert critic_trainable and all("lora_" in n or "modules_to_save" in n for n in critic_trainable)
    assert not any(p.requires_grad for p in roles.scorer.model.parameters())


def test_ppo_with_a_lora_reward_model_and_critic(tmp_path, tiny_model_dir, tiny_rm_adapter):
    out = tmp_path / "rm"
    cfg = PPOConfig(model=str(tiny_model_dir), reward=str(tiny_rm_adapter), output_dir=str(out), advantage="gae",
                    steps=2, prompts_per_step=2, max_new_tokens=6, minibatch=2, data={"path": "builtin:corral_identity"},
                    lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
    result = run(cfg)
    assert result["memory"]["role_weights_vs_base"] < 1.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last"]["step"] == 2 and "value_loss" in summary["last"]
    assert (out / "loss.png").stat().st_size > 10_000


def test_prompt_only_files_are_rl_prompts(tmp_path):
    """RL prompts may be conversations ending with a user turn or Alpaca records without an output; SFT data may not."""
    from corral.chat.templates import get_template
    from corral.data.formats import DataError, read_conversations
    from corral.recipes.ppo import read_rl_prompts
    from tests.conftest import build_tokenizer

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Name a colour."}]}\n'
                    '{"instruction": "Count to three."}\n'
                    '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}\n')
    cfg = PPOConfig(model="x", reward="m:f", data={"path": str(path)})
    prompts = read_rl_prompts(cfg, get_template("chatml", build_tokenizer()), print)
    assert [[m.content for m in p.messages] for p in prompts] == [["Name a colour."], ["Count to three."], ["Hi"]]
    with pytest.raises(DataError, match="prompts.jsonl:1: the conversation ends with a user message"):
        read_conversations(path)
