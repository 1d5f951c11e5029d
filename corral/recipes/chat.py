"""`corral chat MODEL`: chat in the terminal with a local model, or with a server through --api URL."""

from __future__ import annotations

import os
from dataclasses import replace

from corral.config import ChatConfig
from corral.generate.sampling import SamplingParams
from corral.serve.backends import APIBackend, LocalBackend
from corral.serve.terminal import chat_loop


def run(cfg: ChatConfig):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    params = SamplingParams(
        max_new_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        repetition_penalty=cfg.repetition_penalty if cfg.repetition_penalty is not None else 1.0, seed=cfg.seed,
    )  # fmt: skip
    if cfg.api:
        from openai import OpenAI

        client = OpenAI(base_url=cfg.api, api_key=os.environ.get(cfg.api_key_env) or "none")
        backend = APIBackend(client, cfg.model, send_extensions=cfg.repetition_penalty is not None or cfg.top_k > 0)
        return chat_loop(backend, params, cfg.system, banner=f"chatting with {cfg.model} at {cfg.api}")

    from corral.chat.templates import get_template
    from corral.generate.engine import TransformersEngine
    from corral.models.load import load_model, load_tokenizer
    from corral.recipes.serve import precision_line, serving_dtype
    from corral.serve.models import started

    print(f"loading {cfg.model} ...", flush=True)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.template, tokenizer)
    # Small models loop without a repetition penalty; 1.1 unless the user chose.
    if cfg.repetition_penalty is None:
        params = replace(params, repetition_penalty=1.1)
    dtype = serving_dtype(cfg)  # bf16 where this CPU computes it natively, as `corral serve` picks
    print(precision_line(cfg, dtype), flush=True)
    engine = started(TransformersEngine(load_model(cfg.model, dtype=dtype), tokenizer, compile=cfg.compile,
                                        pack_weights=cfg.pack_weights), cfg.model)
    try:
        return chat_loop(LocalBackend(engine, template), params, cfg.system, banner=f"chatting with {cfg.model}")
    finally:
        engine.close()
