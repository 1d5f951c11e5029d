"""Golden-loss cases: each recipe run for a few steps on the tiny test model, its logged figures pinned.

`scripts/make_golden_losses.py` runs every case and writes `tests/golden/losses.json`; the test
(`tests/unit/test_golden_losses.py`) runs them again and compares every figure to 1e-5. Regenerate only
when a change is meant to change the numbers, and say why in the commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from corral.atomic import read_jsonl

DATA = "builtin:corral_identity"
PAIRS = "builtin:corral_preferences"
STEPS = 3
# No dropout and no eval split: the figures depend on the weights, the data order and the seeds only.
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
# fp32 compute, whatever `auto` picks on the machine (bf16 autocast where the CPU computes bf16 natively).
TRAIN = {"max_steps": STEPS, "batch_size": 2, "max_len": 96, "lr": 1e-3, "warmup_ratio": 0.0, "resume": "never",
         "mixed_precision": "no"}


def _sft(method: str) -> Callable[[Path, Path], list[dict]]:
    def case(model_dir: Path, out: Path) -> list[dict]:
        from corral.config import SFTConfig
        from corral.recipes import sft

        sft.run(SFTConfig(model=str(model_dir), template="chatml", method=method, output_dir=str(out),
                          data={"path": DATA}, train=TRAIN, lora=LORA))  # fmt: skip
        return read_jsonl(out / "metrics.jsonl")

    return case


def _reward(model_dir: Path, out: Path) -> list[dict]:
    from corral.config import RewardConfig
    from corral.recipes import reward

    reward.run(RewardConfig(model=str(model_dir), template="chatml", method="lora", output_dir=str(out),
                            data={"path": PAIRS, "eval_fraction": 0.0}, train=TRAIN, lora=LORA))  # fmt: skip
    return read_jsonl(out / "metrics.jsonl")


def _dpo(model_dir: Path, out: Path) -> list[dict]:
    from corral.config import DPOConfig
    from corral.recipes import dpo

    dpo.run(DPOConfig(model=str(model_dir), template="chatml", method="lora", output_dir=str(out),
                      data={"path": PAIRS, "eval_fraction": 0.0}, train=TRAIN, lora=LORA))  # fmt: skip
    return read_jsonl(out / "metrics.jsonl")


def vowel_share(prompt: str, reply: str) -> float:
    """The rule-based reward of the PPO cases: the share of vowels in the reply."""
    return sum(c in "aeiou" for c in reply) / max(1, len(reply))


def _ppo(advantage: str, k: int, **settings) -> Callable[[Path, Path], list[dict]]:
    def case(model_dir: Path, out: Path) -> list[dict]:
        from corral.config import PPOConfig
        from corral.recipes import ppo

        ppo.run(PPOConfig(model=str(model_dir), template="chatml", reward="tests.golden.cases:vowel_share",
                          output_dir=str(out), advantage=advantage, steps=STEPS, data={"path": DATA}, lora=LORA,
                          rollout={"prompts_per_step": 2, "samples_per_prompt": k, "max_new_tokens": 6},
                          actor={"lr": 1e-3}, critic={"lr": 1e-3}, train={"mixed_precision": "no"},
                          **settings))  # fmt: skip
        return read_jsonl(out / "metrics.jsonl")

    return case


CASES: dict[str, Callable[[Path, Path], list[dict]]] = {
    "sft-full": _sft("full"),
    "sft-lora": _sft("lora"),
    "reward-lora": _reward,
    "dpo-lora": _dpo,
    # gae off-policy (two epochs of one-sample mini-batches: old log-probs from their own pass), adaptive KL;
    # rloo on-policy (one epoch of one mini-batch: the update's forward gives the old log-probs).
    "ppo-gae": _ppo("gae", 1, update={"minibatch": 1, "epochs": 2}, kl={"target": 1.0}),
    "ppo-rloo": _ppo("rloo", 2, update={"minibatch": 4}),
}

# The figures pinned per case: losses, and what the loss is made of.
KEYS = {
    "sft-full": ["loss", "grad_norm"],
    "sft-lora": ["loss", "grad_norm"],
    "reward-lora": ["loss", "accuracy", "grad_norm"],
    "dpo-lora": ["loss", "grad_norm"],
    "ppo-gae": ["reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "approx_kl", "entropy", "reply_len"],
    "ppo-rloo": ["reward_mean", "kl", "policy_loss", "entropy", "reply_len"],
}


def figures(case: str, rows: list[dict]) -> list[dict]:
    """The pinned figures of each logged training step."""
    keys = KEYS[case]
    return [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in rows if keys[0] in r]
