"""The vLLM backend behind the engine interface. Needs CUDA and vllm: skipped elsewhere, with the reason.
scripts/gpu_check.sh runs this file on a GPU machine; the parts that are plain Python are in test_gpu_paths.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingParams

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM backend needs a CUDA GPU (none on this machine)"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (GPU machines only)"),
]

MEMORY = 0.25  # of the GPU, per engine: two of them would not fit in one process unless close() frees the first


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama with a head size vLLM's attention kernels take (64; the unit tests' model has 16)."""
    from tests.conftest import build_model

    folder = tmp_path_factory.mktemp("tiny-llama-vllm")
    build_model(len(tiny_tokenizer), hidden=256).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def long_prompts(tokenizer) -> list[list[int]]:
    """Prompts of several 16-token KV blocks: vLLM's prefix cache holds full blocks only."""
    text = "Tell me a story about a horse who lives by the sea and the lighthouse keeper who feeds it every day."
    return [tokenizer(text * 3)["input_ids"], tokenizer("Who are you? " * 12)["input_ids"]]


def test_vllm_greedy_matches_the_transformers_engine(vllm_model_dir, tiny_tokenizer):
    from corral.generate.vllm import VLLMEngine
    from corral.models.load import load_model

    prompts = [tiny_tokenizer(text)["input_ids"] for text in ("Who are you?", "Tell me a story about a horse")]
    params = SamplingParams(max_new_tokens=16)
    reference_engine = TransformersEngine(load_model(str(vllm_model_dir), dtype="float32"), tiny_tokenizer)
    reference = reference_engine.generate(prompts, params)
    engine = VLLMEngine(str(vllm_model_dir), dtype="float32", gpu_memory_utilization=MEMORY, max_len=256)
    try:
        got = engine.generate(prompts, params)
        assert [c[0].token_ids for c in got] == [c[0].token_ids for c in reference]
        streamed = engine.submit(prompts[0], params)
        assert "".join(e.text for e in streamed) == reference[0][0].text
    finally:
        engine.close()


def test_a_second_engine_starts_after_close_and_serves_rank_24_adapters(vllm_model_dir, tiny_tokenizer, tmp_path):
    """close() shuts vLLM down (AsyncLLM.shutdown), so the next engine of this process finds the memory; an adapter
    of rank 24 (above vLLM's default max_lora_rank 16, and not one of its allowed ranks) is served."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from corral.generate.vllm import VLLMEngine

    adapter = tmp_path / "r24"
    get_peft_model(AutoModelForCausalLM.from_pretrained(vllm_model_dir),
                   LoraConfig(r=24, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                              task_type="CAUSAL_LM")).save_pretrained(adapter)  # fmt: skip
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 24
    params = SamplingParams(max_new_tokens=8)
    for _ in range(2):  # 2 x 0.6 of the GPU: the second fails unless the first gave its memory back
        engine = VLLMEngine(str(vllm_model_dir), adapters=[("r24", str(adapter))], dtype="bfloat16",
                            gpu_memory_utilization=0.6, max_len=256)  # fmt: skip
        try:
            out = engine.generate(long_prompts(tiny_tokenizer), params, "r24")
            assert all(len(c[0].token_ids) > 0 for c in out)
        finally:
            engine.close()


def test_a_synced_adapter_is_served_with_its_new_weights(vllm_model_dir, tiny_tokenizer, tmp_path):
    """PPO's sync: the same prompts after the actor changed are answered by the new weights, not from KV blocks
    cached under the old ones (vLLM keys its prefix cache by the adapter's name: each sync has its own)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from corral.generate.vllm import VLLMEngine
    from corral.recipes.ppo import AdapterSync

    actor = get_peft_model(AutoModelForCausalLM.from_pretrained(vllm_model_dir),
                           LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                      task_type="CAUSAL_LM"))  # fmt: skip
    engine = VLLMEngine(str(vllm_model_dir), dtype="bfloat16", enable_lora=True, max_lora_rank=8,
                        gpu_memory_utilization=MEMORY, max_len=256)  # fmt: skip
    try:
        sync = AdapterSync(engine, actor, tmp_path / "rollout_adapter")
        prompts, params = long_prompts(tiny_tokenizer), SamplingParams(max_new_tokens=12)
        before = [c[0].token_ids for c in engine.generate(prompts, params, sync(1))]
        torch.manual_seed(1)
        with torch.no_grad():  # a large update of the adapter
            for name, param in actor.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn_like(param) * 2)
        after = [c[0].token_ids for c in engine.generate(prompts, params, sync(2))]
        engine.load_adapter("fresh", str(tmp_path / "rollout_adapter" / "step-000002"))  # nothing cached under it
        fresh = [c[0].token_ids for c in engine.generate(prompts, params, "fresh")]
        assert after == fresh
        assert after != before  # the new weights do change the replies: the comparison above means something
    finally:
        engine.close()


def test_ppo_rollouts_through_vllm_follow_the_actor(vllm_model_dir, tmp_path):
    """rollout.backend=vllm: the actor's adapter is synced into vLLM before every rollout and PPO runs."""
    from corral.config import PPOConfig
    from corral.recipes.ppo import run

    out = tmp_path / "ppo-vllm"
    cfg = PPOConfig(model=str(vllm_model_dir), reward="tests.unit.test_ppo_recipe:vowel_share", output_dir=str(out),
                    advantage="grpo", steps=3, dtype="bfloat16", data={"path": "builtin:corral_identity"},
                    rollout={"backend": "vllm", "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8,
                             "vllm_gpu_memory": MEMORY},
                    update={"minibatch": 4}, actor={"lr": 1e-2})  # fmt: skip
    run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["kl"] > 0  # the actor moved from its reference, and the rollouts came from the moved actor
    assert sorted(p.name for p in (out / "rollout_adapter").iterdir()) == ["step-000002", "step-000003"]
    assert "peak_gpu_mib" in json.loads((out / "summary.json").read_text())["memory"]
