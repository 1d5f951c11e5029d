"""Reward model: scores read at the last real token, the pairwise loss, and a tiny model that learns a preference."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from corral.train.losses import pairwise_reward_loss


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tiny_tokenizer):
    from corral.models.load import load_model

    return load_model(str(tiny_model_dir), head="score", pad_token_id=tiny_tokenizer.pad_token_id)


def test_score_is_read_at_the_last_real_token_for_both_padding_sides(reward_model, tiny_tokenizer):
    from corral.models.reward import last_token_index, sequence_scores

    eos = tiny_tokenizer.eos_token_id  # pad == eos here, and sequences end with it: transformers' own pooling would misread
    seqs = [[5, 9, 33, 41, eos], [7, 8, eos], [12, 80, 81, 82, 83, 84, eos]]
    alone = torch.cat([sequence_scores(reward_model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    width = max(map(len, seqs))
    right = torch.tensor([s + [eos] * (width - len(s)) for s in seqs])
    right_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    left = torch.tensor([[eos] * (width - len(s)) + s for s in seqs])
    left_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    assert last_token_index(right_mask).tolist() == [4, 2, 6]
    assert last_token_index(left_mask).tolist() == [6, 6, 6]
    torch.testing.assert_close(sequence_scores(reward_model, right, right_mask), alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sequence_scores(reward_model, left, left_mask), alone, rtol=1e-4, atol=1e-5)


def test_pairwise_loss_values():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = torch.log1p(torch.exp(-(chosen - rejected)))
    torch.testing.assert_close(pairwise_reward_loss(chosen, rejected), expected)
    torch.testing.assert_close(pairwise_reward_loss(chosen, rejected, margin=1.0), torch.log1p(torch.exp(-(chosen - rejected - 1.0))))


def synthetic_preferences(path, n: int, seed: int):
    """The chosen reply is polite (says thank you), the rejected one is not; otherwise alike."""
    rng = random.Random(seed)
    topics = ["the weather", "a horse", "Corral", "training", "the model", "data", "a question", "the answer"]
    records = []
    for _ in range(n):
        topic = rng.choice(topics)
        body = f"I can tell you about {topic}."
        records.append({"prompt": f"Tell me about {topic}, please.", "chosen": f"Thank you for asking! {body}",
                        "rejected": f"{body} Go away."})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tiny_reward_model_learns_a_preference_and_scores(tmp_path, tiny_model_dir, capsys):
    from corral.config import RewardConfig, RewardScoreConfig
    from corral.recipes import reward

    data = synthetic_preferences(tmp_path / "prefs.jsonl", 200, seed=0)
    cfg = RewardConfig(
        model=str(tiny_model_dir), template="chatml", method="full", output_dir=str(tmp_path / "rm"),
        data={"path": str(data), "eval_fraction": 0.2},
        train={"max_steps": 30, "batch_size": 8, "lr": 1e-3, "max_len": 128, "warmup_ratio": 0, "resume": "never"},
    )  # fmt: skip
    result = reward.run(cfg)
    model_dir, stats = result.model_dir, result.summary["eval"]
    rows = [json.loads(line) for line in Path(result.summary["metrics"]).read_text().splitlines()]
    assert rows[-1]["eval_accuracy"] == stats["accuracy"]
    assert json.loads((tmp_path / "rm" / "eval.json").read_text())["accuracy"] == stats["accuracy"]

    # The held-out figures, recomputed apart: the saved model, reloaded, scores each held-out pair on its own
    # (no batch, no padding). The held-out pairs are the 20% that the recipe's seeded split (seed 42) keeps.
    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template
    from corral.models.load import load_model, load_tokenizer
    from corral.models.reward import sequence_scores
    from corral.recipes.runs import split_eval

    file_records = [json.loads(line) for line in data.read_text().splitlines()]
    _, held_out = split_eval(file_records, 0.2, 42)
    tokenizer = load_tokenizer(str(model_dir))
    fmt = get_template("chatml", tokenizer)
    model = load_model(str(model_dir), head="score", pad_token_id=tokenizer.pad_token_id).eval()

    @torch.no_grad()
    def alone(prompt: str, reply: str) -> float:
        ids, _ = fmt.render_with_masks(Conversation.from_pairs(("user", prompt), ("assistant", reply)))
        return sequence_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()

    chosen = [alone(r["prompt"], r["chosen"]) for r in held_out]
    rejected = [alone(r["prompt"], r["rejected"]) for r in held_out]
    assert stats["pairs"] == len(held_out) == 40
    assert stats["accuracy"] == sum(c > r for c, r in zip(chosen, rejected)) / 40
    assert stats["mean_margin"] == pytest.approx(sum(chosen) / 40 - sum(rejected) / 40, rel=1e-4, abs=1e-5)
    assert stats["mean_chosen"] == pytest.approx(sum(chosen) / 40, rel=1e-4, abs=1e-5)
    assert stats["accuracy"] >= 0.9  # and it learned the preference

    # `corral reward score` prints those same scores (rounded to 4 places) for every pair of the file.
    records = reward.score(RewardScoreConfig(model=str(model_dir), data=str(data), template="chatml"))
    expected = [(alone(r["prompt"], r["chosen"]), alone(r["prompt"], r["rejected"])) for r in file_records]
    assert [(r["chosen"], r["rejected"]) for r in records] == [
        (pytest.approx(c, abs=2e-4), pytest.approx(r, abs=2e-4)) for c, r in expected]


def test_lora_reward_model_saves_and_reloads_its_head(tmp_path, tiny_model_dir):
    from corral.config import RewardConfig
    from corral.models.load import load_model
    from corral.models.reward import sequence_scores
    from corral.recipes import reward

    data = synthetic_preferences(tmp_path / "prefs.jsonl", 40, seed=1)
    cfg = RewardConfig(
        model=str(tiny_model_dir), template="chatml", method="lora", output_dir=str(tmp_path / "rm"),
        data={"path": str(data), "eval_fraction": 0.25}, lora={"r": 4, "alpha": 8, "dropout": 0.0},
        train={"max_steps": 3, "batch_size": 4, "lr": 1e-3, "max_len": 128, "resume": "never"},
    )  # fmt: skip
    result = reward.run(cfg)
    model_dir = result.model_dir
    assert (model_dir / "adapter_config.json").is_file()
    reloaded = load_model(str(model_dir), head="score")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    again = load_model(str(model_dir), head="score")
    torch.testing.assert_close(sequence_scores(reloaded, ids, mask), sequence_scores(again, ids, mask))
    # The saved adapter is LoRA's A and B of every linear layer (7 a layer, 2 layers) and the trained score head,
    # and the reloaded model uses exactly that head.
    from safetensors.torch import load_file

    saved = load_file(model_dir / "adapter_model.safetensors")
    head = saved.pop("base_model.model.score.weight")
    assert len(saved) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in saved)
    params = dict(reloaded.named_parameters())
    assert torch.equal(params["base_model.model.score.modules_to_save.default.weight"], head)
    for key, value in saved.items():
        assert torch.equal(params[key.replace(".weight", ".default.weight")], value), key
    fresh = load_model(str(tiny_model_dir), head="score")  # a base model gets a new random head, not the trained one
    assert not torch.equal(fresh.score.weight, head)


def test_reward_score_skips_invalid_records_when_asked(tmp_path, tiny_model_dir):
    """`reward score` takes `skip_invalid` like every reader: a broken line is an error naming it, or, asked to
    skip, is counted and left out while every other pair is scored."""
    from corral.config import RewardScoreConfig
    from corral.data.formats import DataError
    from corral.recipes import reward

    data = synthetic_preferences(tmp_path / "prefs.jsonl", 6, seed=2)
    lines = data.read_text().splitlines()
    lines[3] = '{"prompt": "no replies here"}'
    data.write_text("\n".join(lines) + "\n")
    cfg = RewardScoreConfig(model=str(tiny_model_dir), data=str(data), template="chatml")
    with pytest.raises(DataError, match=r"prefs.jsonl:4"):
        reward.score(cfg)
    records = reward.score(cfg.model_copy(update={"skip_invalid": True}))
    assert len(records) == 5 and all({"chosen", "rejected"} <= r.keys() for r in records)
    assert [r["source"] for r in records] == [f"{data}:{i}" for i in (1, 2, 3, 5, 6)]
