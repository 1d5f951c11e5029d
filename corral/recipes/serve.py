"""`corral serve`: the OpenAI-compatible API, web chat and arena over one or more models."""

from __future__ import annotations

import os

from corral.config import EMBEDDED_MODEL, ServeConfig
from corral.serve.api import build_app
from corral.serve.models import close_all, load_served_models


def run(cfg: ServeConfig) -> None:
    import uvicorn

    served = load_served_models(cfg.models or [EMBEDDED_MODEL], template=cfg.template, dtype=cfg.dtype,
                                max_batch=cfg.max_batch, engine=cfg.engine)
    api_key = cfg.api_key or os.environ.get("CORRAL_API_KEY") or None
    app = build_app(served, api_key=api_key, votes_path=cfg.votes, default_max_tokens=cfg.max_tokens)
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"serving {', '.join(served)}: web chat {url}/  OpenAI API {url}/v1"
          + ("  (API key required)" if api_key else "") + f"  arena votes -> {cfg.votes}", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        close_all(served)
