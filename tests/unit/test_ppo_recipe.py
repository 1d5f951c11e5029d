"""`corral ppo` end to end on a tiny model with a reward function: rollouts, updates, metrics, samples,
the actor and its EMA saved as loadable folders."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

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
                        advantage=advantage, steps=3, update={"minibatch": 2}, actor={"lr": 1e-3, "ema_decay": 0.9},
                        rollout={"samples_per_prompt": k, "prompts_per_step": 2, "max_new_tokens": 6, "sample_every": 2},
                        ptx={"path": "builtin:corral_identity", "coef": 0.5}, kl={"target": 1.0},
                        train={"save_every": 1, "save_total_limit": 3},  # keep the actor of every step
                        data={"path": "builtin:corral_identity"})  # fmt: skip
        result = run(cfg)
        rows = read_jsonl(out / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3]
        for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "entropy", "clip_frac", "approx_kl", "ptx_loss",
                    "gen_tok_s", "train_tok_s", "reply_len"):
            assert key in rows[-1], key
        assert ("value_loss" in rows[-1]) == (advantage == "gae")
        # Adaptive KL (Ziegler et al.): each step runs with the coefficient the previous steps' logged KL gave,
        # coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * samples / horizon, from coef 0.05 (target 1, horizon 10000).
        coef = 0.05
        for row in rows:
            assert row["kl_coef"] == pytest.approx(coef, rel=1e-12, abs=0), row["step"]
            coef *= 1 + min(max(row["kl"] / 1.0 - 1, -0.2), 0.2) * (2 * k) / 10000
        samples = read_jsonl(out / "samples.jsonl")
        assert {s["step"] for s in samples} == {1, 2, 3} and all("reply" in s for s in samples)
        actor = load_model(str(out / "actor"))
        ema = load_model(str(out / "actor_ema"))
        lora = [n for n, _ in actor.named_parameters() if "lora_A" in n]
        assert len(lora) == 7 * 2  # all-linear: 7 linear layers in each of the 2 blocks
        # The EMA after 3 steps (decay 0.9, started from the initial actor, whose B is zero) is
        # 0.1 * (0.9^2 B_1 + 0.9 B_2 + B_3), with B_t the actor after step t (the kept checkpoints, and actor/).
        adapter = "adapter_model.safetensors"
        steps = [load_file(out / "checkpoints" / f"step-{t:06d}" / "model" / adapter) for t in (1, 2)]
        final, averaged = load_file(out / "actor" / adapter), load_file(out / "actor_ema" / adapter)
        assert final.keys() == averaged.keys() == steps[0].keys()
        lora_b = [key for key in final if ".lora_B." in key]
        assert len(lora_b) == 7 * 2
        for key in lora_b:
            expected = 0.1 * (0.81 * steps[0][key] + 0.9 * steps[1][key] + final[key])
            torch.testing.assert_close(averaged[key], expected, rtol=1e-5, atol=1e-8)
            assert not torch.equal(averaged[key], final[key])
        assert result.summary["last"]["step"] == 3


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
                    advantage="rloo", steps=2, rollout={"samples_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 6},
                    actor={"lr": 1e-2}, data={"path": "builtin:corral_identity"})  # fmt: skip
    run(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    assert abs(rows[0]["kl"]) < 1e-4 and rows[1]["kl"] != 0
    actor = load_model(str(out / "actor"))
    assert actor.peft_config["default"].lora_dropout == 0.3
    assert actor.peft_config["default"].base_model_name_or_path == load_model(str(tiny_lora_dir)).peft_config[
        "default"].base_model_name_or_path
    sft, trained = load_file(tiny_lora_dir / "adapter_model.safetensors"), load_file(out / "actor" / "adapter_model.safetensors")
    # Every adapter tensor (A and B of q_proj and v_proj in both blocks) is trained, none left as the SFT one.
    assert sft.keys() == trained.keys() and len(sft) == 2 * 2 * 2
    assert [k for k in sft if torch.equal(sft[k], trained[k])] == []


@pytest.fixture
def tiny_rm_adapter(tmp_path, tiny_model_dir):
    """A LoRA reward model of the tiny base (random, non-zero adapter and head), as `corral reward` saves one."""
    from corral.models.adapters import add_lora
    torch.manual_seed(3)
    rm = add_lora(load_model(str(tiny_model_dir), dtype="float32", head="score", pad_token_id=1), 4, 8, 0.0,
                  ["q_proj", "v_proj"], task_type="SEQ_CLS", modules_to_save=["score"])  # fmt: skip
    for name, p in rm.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            torch.nn.init.normal_(p, std=0.5)
    rm.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def test_all_four_roles_share_one_base(tmp_path, tiny_model_dir, tiny_rm_adapter):
    """Actor (LoRA), reference (adapter disabled), LoRA reward model and critic hold one copy of the base, and
    each role still computes what it computes when loaded on its own."""
    from corral.models.reward import sequence_scores
    from corral.models.shared import weight_bytes
    from corral.train.ppo.roles import LoraSettings, build_roles
    from corral.train.ppo.rollout import batch_tensors

    cfg = PPOConfig(model=str(tiny_model_dir), reward=str(tiny_rm_adapter), output_dir=str(tmp_path / "o"),
                    advantage="gae", data={"path": "builtin:corral_identity"},
                    lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
    roles = build_roles(cfg.model, cfg.reward, method=cfg.method, dtype=cfg.dtype, with_critic=True, pad_id=1,
                        lora=LoraSettings(**cfg.lora.model_dump()), log=print)
    alone = load_model(str(tiny_rm_adapter), dtype="float32", head="score", pad_token_id=1)
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
                    steps=2, rollout={"prompts_per_step": 2, "max_new_tokens": 6}, update={"minibatch": 2},
                    data={"path": "builtin:corral_identity"},
                    lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
    result = run(cfg)
    assert result.summary["memory"]["role_weights_vs_base"] < 1.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last"]["step"] == 2 and "value_loss" in summary["last"]
    assert (out / "loss.png").stat().st_size > 10_000


def test_ppo_under_bf16_autocast_samples_with_a_bf16_frozen_base(tmp_path, tiny_model_dir, monkeypatch):
    """`auto` on a CPU that computes bf16 (forced here): the LoRA actor's frozen base is stored in bf16 and its
    adapter in fp32, a mix that only autocast can multiply; the rollouts run under it as training does (they
    failed with a dtype mismatch in the engine before)."""
    monkeypatch.setenv("CORRAL_CPU_BF16", "1")
    out = tmp_path / "bf16"
    cfg = PPOConfig(model=str(tiny_model_dir), reward="tests.unit.test_ppo_recipe:vowel_share", output_dir=str(out),
                    steps=1, rollout={"prompts_per_step": 2, "max_new_tokens": 4}, update={"minibatch": 2},
                    data={"path": "builtin:corral_identity"}, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    run(cfg)
    first = read_jsonl(out / "metrics.jsonl")[0]
    precision = first["precision"]
    assert (precision["mixed_precision"], precision["frozen_weights"], precision["trained_weights"]) == (
        "bf16", "bfloat16", "float32"), precision
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "step" in r]
    assert rows[-1]["step"] == 1 and all(math.isfinite(rows[-1][k]) for k in ("policy_loss", "kl", "reward_mean"))


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


def test_ppo_optimizers_follow_their_schedules_with_warmup(tmp_path, tiny_model_dir):
    """The actor and the critic get the harness's optimizers and schedules: 2 steps x 2 mini-batches = 4 optimizer
    steps each, linear warmup over the first 2 (warmup_ratio 0.5), then linear decay to 0; Lion for the actor;
    max_grad_norm=0 means no clipping, as in SFT."""
    cfg = PPOConfig(model=str(tiny_model_dir), reward="tests.unit.test_ppo_recipe:vowel_share", output_dir=str(tmp_path),
                    advantage="gae", steps=2, rollout={"prompts_per_step": 2, "max_new_tokens": 4},
                    update={"minibatch": 1}, data={"path": "builtin:corral_identity"},
                    actor={"optimizer": "lion", "lr": 1e-3, "schedule": "linear", "warmup_ratio": 0.5,
                           "max_grad_norm": 0.0},
                    critic={"lr": 2e-3, "schedule": "constant", "warmup_ratio": 0.25})  # fmt: skip
    run(cfg)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    # logged after each RL step's two optimizer steps: linear warmup then decay reads 1e-3 x (2/2), x (4-4)/(4-2)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 0.0])
    # constant with warmup over round(0.25 x 4) = 1 step: full rate from then on
    assert [r["critic_lr"] for r in rows] == pytest.approx([2e-3, 2e-3])
    state = torch.load(tmp_path / "checkpoints" / "step-000002" / "trainer_state" / "optimizer.bin", weights_only=False)
    assert set(state["state"][0]) == {"exp_avg"}  # Lion's one state tensor per weight, not AdamW's two
    critic_state = torch.load(tmp_path / "checkpoints" / "step-000002" / "trainer_state" / "optimizer_1.bin",
                              weights_only=False)  # fmt: skip
    assert set(critic_state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # the critic kept AdamW
