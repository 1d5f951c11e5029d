"""The vLLM backend behind the engine interface. Needs CUDA and vllm: skipped elsewhere, with the reason."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingParams

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM backend needs a CUDA GPU (none on this machine)"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (GPU machines only)"),
]


def test_vllm_greedy_matches_the_transformers_engine(tiny_model_dir, tiny_tokenizer):
    from corral.generate.vllm import VLLMEngine
    from corral.models.load import load_model

    prompts = [tiny_tokenizer("Who are you?")["input_ids"], tiny_tokenizer("Tell me a story about a horse")["input_ids"]]
    params = SamplingParams(max_new_tokens=16)
    reference = TransformersEngine(load_model(str(tiny_model_dir), dtype="float32"), tiny_tokenizer).generate(prompts, params)
    engine = VLLMEngine(str(tiny_model_dir), dtype="float32")
    try:
        got = engine.generate(prompts, params)
        assert [c[0].token_ids for c in got] == [c[0].token_ids for c in reference]
        streamed = engine.submit(prompts[0], params)
        assert "".join(e.text for e in streamed) == reference[0][0].text
    finally:
        engine.close()


def test_ppo_rollouts_through_vllm_follow_the_actor(tiny_model_dir, tmp_path):
    """rollout_backend=vllm: the actor's adapter is synced into vLLM before every rollout and PPO runs."""
    import json

    from corral.config import PPOConfig
    from corral.recipes.ppo import run

    out = tmp_path / "ppo-vllm"
    cfg = PPOConfig(model=str(tiny_model_dir), reward="tests.unit.test_ppo_recipe:vowel_share", output_dir=str(out),
                    advantage="grpo", samples_per_prompt=2, steps=3, prompts_per_step=2, max_new_tokens=8, lr=1e-2,
                    rollout_backend="vllm", dtype="float32", data={"path": "builtin:corral_identity"})  # fmt: skip
    run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["kl"] > 0  # the actor moved from its reference, and the rollouts came from the moved actor
    assert sorted(p.name for p in (out / "rollout_adapter").iterdir()) == ["step-000002", "step-000003"]
