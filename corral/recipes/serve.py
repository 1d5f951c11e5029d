"""`corral serve`: the OpenAI-compatible API, web chat and arena over one or more models."""

from __future__ import annotations

import os
import signal
import sys

from corral.config import EMBEDDED_MODEL, ChatConfig, ServeConfig
from corral.serve.api import build_app
from corral.serve.models import close_all, load_served_models
from corral.serve.serving import Limits


def serving_dtype(cfg: ServeConfig | ChatConfig) -> str:
    """`dtype=auto` for the transformers engine (`corral serve`, and `corral chat` on a local model) on a CPU that
    computes bf16 natively (`cpu_bf16_native`: AMX or AVX512-BF16, and a probe finding bf16 matmuls faster) is
    bfloat16: a decode step reads every weight once per token, and bf16 halves those bytes (measured in
    docs/serving.md, "The generation engine"). Elsewhere `auto` is `load_model`'s (float32 on CPU, bf16 / fp16 on
    GPU)."""
    from corral.models.load import cpu_bf16_native, default_device

    engine = getattr(cfg, "engine", "transformers")
    if cfg.dtype == "auto" and engine == "transformers" and default_device().type == "cpu" and cpu_bf16_native():
        return "bfloat16"
    return cfg.dtype


def precision_line(cfg: ServeConfig | ChatConfig, dtype: str) -> str:
    """What the server (or the chat's local model) computes in, and why, printed at start (as training prints its
    precision)."""
    from corral.models.load import default_device, resolve_dtype

    engine = getattr(cfg, "engine", "transformers")
    if engine != "transformers":
        return f"engine {engine}, dtype {dtype}"
    device = default_device()
    weights = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    line = f"engine transformers on {device.type}, weights in {weights}"
    if cfg.dtype == "auto" and device.type == "cpu":
        line += " (dtype auto: this CPU computes bf16 natively)" if dtype == "bfloat16" else \
            " (dtype auto: this CPU has no native bf16)"
    return line + (", decode steps of 1-2 rows compiled" if cfg.compile else "")


def run(cfg: ServeConfig) -> None:
    import uvicorn

    dtype = serving_dtype(cfg)
    print(precision_line(cfg, dtype), flush=True)
    served = load_served_models(cfg.models or [EMBEDDED_MODEL], template=cfg.template, dtype=dtype,
                                max_batch=cfg.max_batch, engine=cfg.engine, compile=cfg.compile,
                                pack_weights=cfg.pack_weights)
    api_key = cfg.api_key or os.environ.get("CORRAL_API_KEY") or None
    limits = Limits(default_max_tokens=cfg.max_tokens, max_tokens=cfg.max_tokens_limit, max_queue=cfg.max_queue,
                    request_timeout=cfg.request_timeout)
    app = build_app(served, api_key=api_key, votes_path=cfg.votes, limits=limits,
                    max_body_bytes=int(cfg.max_request_mb * 1_000_000))
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"serving {', '.join(served)}: web chat {url}/  OpenAI API {url}/v1"
          + ("  (API key required)" if api_key else "") + f"  arena votes -> {cfg.votes}", flush=True)
    # SIGTERM: uvicorn stops accepting, waits up to the timeout for open requests, then cancels them (their
    # engine rows with them) and re-raises the signal once it has stopped, which this handler turns into a
    # clean exit: the engines close below and the process exits 0, as a supervisor expects of a graceful stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning",
                    timeout_graceful_shutdown=cfg.shutdown_timeout)
    finally:
        close_all(served)
