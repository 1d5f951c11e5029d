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
