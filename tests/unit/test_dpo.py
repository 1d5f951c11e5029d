"""DPO / IPO / SimPO: hand-computed losses, reply log-probs, the LoRA reference, and a tiny model that learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from corral.train.losses import preference_loss, sequence_logps
from tests.unit.test_reward import synthetic_preferences


def t(*values):
    return torch.tensor(values)


def test_losses_equal_hand_computed_values():
    # h = (pc - rc) - (pr - rr) = (-1 + 1.5) - (-2 + 1.5) = 1
    pc, pr, rc, rr = t(-1.0), t(-2.0), t(-1.5), t(-1.5)
    losses, chosen_r, rejected_r = preference_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-6)  # 0.644397
    assert chosen_r.item() == pytest.approx(0.05) and rejected_r.item() == pytest.approx(-0.05)
    smoothed, _, _ = preference_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1)), abs=1e-6)
    ipo, _, _ = preference_loss(pc, pr, rc, rr, beta=0.1, kind="ipo")
    assert ipo.item() == pytest.approx((1 - 1 / 0.2) ** 2)  # 16
    simpo, c, r = preference_loss(t(-0.5), t(-1.0), None, None, beta=2.0, kind="simpo", simpo_gamma=0.5)
    assert simpo.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert (c.item(), r.item()) == (pytest.approx(-1.0), pytest.approx(-2.0))
    with pytest.raises(ValueError, match="reference"):
        preference_loss(pc, pr, None, None, beta=0.1)


def test_sequence_logps_sum_only_the_trained_tokens(tiny_tokenizer):
    from tests.conftest import build_model

    model = build_model(len(tiny_tokenizer)).eval()
    ids = torch.tensor([[5, 9, 33, 41, 7, 8], [12, 80, 81, 82, 1, 1]])
    targets = torch.tensor([[-100, -100, 41, 7, 8, -100], [-100, 81, 82, -100, -100, -100]])
    out = model(ids, output_hidden_states=True)
    sums, counts = sequence_logps(out.hidden_states[-1], model.get_output_embeddings(), targets)
    full = out.logits.log_softmax(-1)
    expected = [full[0, 2, 41] + full[0, 3, 7] + full[0, 4, 8], full[1, 1, 81] + full[1, 2, 82]]
    torch.testing.assert_close(sums, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [3, 2]


def test_lora_reference_is_the_base_model(tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template
    from corral.data.preference import PreferencePair
    from corral.models.load import load_model
    from corral.recipes.dpo import collate_pairs, pairs_to_rows, reference_logps, reply_logps

    fmt = get_template("chatml", tiny_tokenizer)
    pairs = [PreferencePair(Conversation.from_pairs(("user", "Hi there")), "Hello! Thank you.", "Go away."),
             PreferencePair(Conversation.from_pairs(("user", "Who are you?")), "I am Corral's model.", "No.")]
    rows, _ = pairs_to_rows(pairs, fmt, 128)
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    base = load_model(str(tiny_model_dir))
    base_logps = reply_logps(base, batch)[0]
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.testing.assert_close(reference_logps(policy, batch), base_logps)
    # Otherwise the adapter is on: the policy computes what its adapter merged into the weights computes, and
    # that differs from the base on every reply.
    import copy

    policy_logps = reply_logps(policy, batch)[0]
    torch.testing.assert_close(policy_logps, reply_logps(copy.deepcopy(policy).merge_and_unload(), batch)[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    assert ((policy_logps - base_logps).abs() > 1e-3).all()


def run_dpo(tmp_path, tiny_model_dir, **overrides):
    from corral.config import DPOConfig
    from corral.recipes import dpo

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = synthetic_preferences(tmp_path / "prefs.jsonl", 60, seed=2)
    settings = {"model": str(tiny_model_dir), "template": "chatml", "output_dir": str(tmp_path / "dpo"),
                "data": {"path": str(data), "eval_fraction": 0.2}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "train": {"max_steps": 12, "batch_size": 8, "lr": 5e-3, "max_len": 128, "warmup_ratio": 0, "resume": "never"},
                **overrides}  # fmt: skip
    return dpo.run(DPOConfig(**settings))


def first_step_logps(tmp_path, tiny_model_dir):
    """The base model's summed reply log-probs and trained-token counts on run_dpo's step-1 pairs (chosen sides
    first), the pairs picked as the recipe picks them: 20% held out (seed 42), then the loop's seeded order."""
    from corral.chat.templates import get_template
    from corral.data.preference import read_preferences
    from corral.models.load import load_model, load_tokenizer
    from corral.recipes.dpo import collate_pairs, pairs_to_rows, reply_logps
    from corral.recipes.runs import split_eval
    from corral.train.loop import StepPlan

    tokenizer = load_tokenizer(str(tiny_model_dir))
    train_pairs, _ = split_eval(read_preferences(tmp_path / "prefs.jsonl")[0], 0.2, 42)
    rows, _ = pairs_to_rows(train_pairs, get_template("chatml", tokenizer), 128)
    step = [rows[i] for i in StepPlan(len(rows), 8, 1, 1, 42).step_rows(0)]
    with torch.no_grad():
        return reply_logps(load_model(str(tiny_model_dir)).eval(), collate_pairs(step, tokenizer.pad_token_id))


def test_tiny_model_raises_the_held_out_margin_with_lora(tmp_path, tiny_model_dir):
    result = run_dpo(tmp_path, tiny_model_dir)
    model_dir, stats = result.model_dir, result.summary["eval"]
    before, after = stats["before"], stats["after"]
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert after["logp_margin"] > before["logp_margin"] + 1.0
    assert after["reward_accuracy"] >= 0.9
    rows = [json.loads(line) for line in Path(result.summary["metrics"]).read_text().splitlines()]
    logged = [r for r in rows if "reward_accuracy" in r]
    assert len(logged) == 12 and {"reward_margin", "reward_chosen", "reward_rejected", "kl_estimate"} <= set(logged[0])
    # Step 1 runs the starting policy, which is the reference (LoRA's B is zero): h = 0 for every pair, so the
    # loss is -log sigmoid(0) = log 2, every implicit reward and the KL are 0, and no pair counts as right.
    first = logged[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("reward_margin", "reward_chosen", "reward_rejected", "kl_estimate"):
        assert first[key] == pytest.approx(0.0, abs=1e-6), key
    assert first["reward_accuracy"] == 0.0
    # Held out, the reference is the starting policy, so the implicit reward margin is beta times the gain in
    # the policy's log-prob margin.
    assert after["reward_margin"] == pytest.approx(0.1 * (after["logp_margin"] - before["logp_margin"]), rel=1e-4)
    assert (model_dir / "adapter_config.json").is_file()


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_other_losses_train(tmp_path, tiny_model_dir, loss):
    beta = 0.5 if loss == "ipo" else 2.0
    result = run_dpo(tmp_path, tiny_model_dir, loss=loss, beta=beta,
                     train={"max_steps": 8, "batch_size": 8, "lr": 5e-3, "max_len": 128, "warmup_ratio": 0,
                            "resume": "never"})  # fmt: skip
    stats = result.summary["eval"]
    assert stats["after"]["logp_margin"] > stats["before"]["logp_margin"]  # the same held-out pairs, before/after
    first = json.loads(Path(result.summary["metrics"]).read_text().splitlines()[0])
    assert first["step"] == 1
    if loss == "ipo":
        # The policy starts as the reference: h = 0, so each pair's loss is (0 - 1/(2 beta))^2 = 1.
        assert first["loss"] == pytest.approx((1 / (2 * beta)) ** 2, abs=1e-6)
        assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    else:
        # No reference: from the base model's length-averaged log-probs of step 1's pairs, by hand.
        logps, counts = first_step_logps(tmp_path, tiny_model_dir)
        average = (logps / counts).tolist()
        margins = [beta * (c - r) for c, r in zip(average[:8], average[8:])]
        assert first["loss"] == pytest.approx(sum(math.log1p(math.exp(-(m - 0.5))) for m in margins) / 8, rel=1e-4)
        assert first["reward_margin"] == pytest.approx(sum(margins) / 8, rel=1e-4, abs=1e-6)
        assert first["kl_estimate"] == 0.0  # SimPO has no reference to measure against


def test_full_finetuning_precomputed_reference_equals_frozen_copy(tmp_path, tiny_model_dir):
    short = {"max_steps": 2, "batch_size": 8, "lr": 1e-4, "max_len": 128, "warmup_ratio": 0, "resume": "never", "seed": 3}
    frozen = run_dpo(tmp_path / "a", tiny_model_dir, method="full", train=short)
    pre = run_dpo(tmp_path / "b", tiny_model_dir, method="full", precompute_ref=True, train=short)
    losses = lambda r: [json.loads(x)["loss"] for x in Path(r.summary["metrics"]).read_text().splitlines() if '"loss"' in x]  # noqa: E731
    assert losses(frozen) == pytest.approx(losses(pre), rel=1e-4)
