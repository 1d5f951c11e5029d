"""The models a server offers: `name=PATH` specs loaded so that LoRA adapters of one base share it.

Specs whose paths resolve to the same base model are loaded once: the base, plus each adapter as a
named peft adapter on it; one engine serves them all and a batch mixes rows of different adapters.
A spec naming the base itself is served as the bare base ("no adapter") in that same batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from corral.chat.templates import get_template
from corral.generate.chat import ChatTemplate
from corral.generate.engine import TransformersEngine
from corral.generate.types import BASE_ADAPTER, Engine
from corral.models.load import ModelLoadError, load_model, load_tokenizer, resolve_model


@dataclass
class ServedModel:
    name: str
    engine: Engine  # shared by every model of one base
    template: ChatTemplate  # the chat template it was trained with
    adapter: str | None  # internal peft adapter name in its engine, None for the base
    created: int


def parse_spec(spec: str) -> tuple[str, str]:
    """`name=PATH` or just `PATH` (named after the folder, or the embedded model's name)."""
    name, eq, path = spec.partition("=")
    if not eq:
        path = spec
        name = Path(spec.rstrip("/")).name if Path(spec).exists() else spec
    if not name or not path:
        raise ModelLoadError(f"--model '{spec}': expected NAME=PATH or PATH")
    return name, path


def _is_lora(adapter_dir: str) -> bool:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return config.get("peft_type", "LORA") == "LORA"


def started(engine: TransformersEngine, name: str) -> TransformersEngine:
    """The engine's background loop started and its compiled graphs (if any) built, in that loop's thread, with a
    word on each."""
    if engine.packs:
        print(f"{name}: linear weights packed for oneDNN (+{engine.packed_mb:.0f} MB)", flush=True)
    engine.start()
    if engine.compiles:
        print(f"compiling the decode step of {name} (1- and 2-row graphs; inductor caches them on disk)", flush=True)
        try:
            print(f"compiled in {engine.warm_up():.0f} s", flush=True)
        except ValueError:
            engine.close()
            raise
    return engine


def load_served_models(specs: list[str], template: str = "auto", dtype: str = "auto", max_batch: int = 32,
                       engine: str = "transformers", compile: bool = False,
                       pack_weights: bool | str = "auto") -> dict[str, ServedModel]:
    parsed = [parse_spec(s) for s in specs]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"--model: duplicate model names {sorted({n for n in names if names.count(n) > 1})}")
    groups: dict[str, list[tuple[str, str, str | None]]] = {}
    for name, path in parsed:
        resolved = resolve_model(path)
        if resolved.adapter and not _is_lora(resolved.adapter):
            raise ModelLoadError(f"--model {name}={path}: only LoRA adapters can be served (merge others first)")
        groups.setdefault(resolved.path, []).append((name, path, resolved.adapter))

    served: dict[str, ServedModel] = {}
    for base_path, members in groups.items():
        adapters = [(f"adapter{i}", a) for i, (_, _, a) in enumerate(members) if a]
        if engine == "vllm":
            from corral.generate.vllm import VLLMEngine

            eng: Engine = VLLMEngine(base_path, adapters, dtype=dtype, max_batch=max_batch)
        else:
            model = load_model(base_path, dtype=dtype)
            if adapters:
                from peft import PeftModel

                first_name, first_dir = adapters[0]
                model = PeftModel.from_pretrained(model, first_dir, adapter_name=first_name)
                for adapter_name, adapter_dir in adapters[1:]:
                    model.load_adapter(adapter_dir, adapter_name=adapter_name)
                model.eval()
            eng = started(TransformersEngine(model, load_tokenizer(base_path), max_batch=max_batch, compile=compile,
                                             pack_weights=pack_weights), base_path)
        for i, (name, path, adapter_dir) in enumerate(members):
            adapter = f"adapter{i}" if adapter_dir else (BASE_ADAPTER if adapters else None)
            trained = get_template(template, load_tokenizer(path))  # an adapter folder carries its trained template
            served[name] = ServedModel(name, eng, trained, adapter, int(time.time()))
    return served


def close_all(served: dict[str, ServedModel]) -> None:
    for engine in {id(m.engine): m.engine for m in served.values()}.values():
        engine.close()
