"""Model I/O, once: `load_model` and `load_tokenizer` read what a user names (hub id | local HF folder | peft
adapter folder | .gguf file | embedded name), as a causal LM or with a scalar score head (reward models,
critics); `save_model` writes every model folder Corral produces (atomic, chat template set, model card).

GGUF files (the embedded model among them) are de-quantized once by transformers and saved as a
safetensors HF folder in Corral's cache, written atomically, so later loads take under a second
and a second process racing the first never sees a half-written folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from corral.atomic import atomic_dir
from corral.models.embedded import EMBEDDED, cache_dir, embedded_folder, embedded_for, embedded_gguf, is_installed

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was tried."""


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # local folder or hub id
    adapter: str | None = None  # peft adapter folder on top of `path`


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def native_bf16() -> bool:
    """A CUDA GPU that computes in bf16 natively (Ampere and later). `is_bf16_supported()` alone also says yes on
    V100 / T4, where bf16 is emulated through fp32 and several times slower than fp16."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # the /proc/cpuinfo flags of CPUs with bf16 dot-product instructions


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster one core multiplies a bf16 matrix than an fp32 one, at a shape of a small model's MLP
    (128 tokens x 576 x 1536), best of three each, interleaved: about 30 ms with oneDNN's first call, once per
    process.

    On one thread: `corral serve` calls this from its main thread before its engine thread starts, and one
    multi-threaded matmul run first in another thread slowed every batch-1 decode step of the engine thread by
    about 40% (SmolLM2-135M bf16, 2 Zen 4 cores: 12 against 20 tokens/s, measured with and without it; likely
    a second OpenMP team whose threads outnumber the cores, so libgomp's workers sleep between parallel
    regions rather than spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(128, 576), torch.randn(576, 1536)
        pairs = ((a, b), (a.bfloat16(), b.bfloat16()))
        best = [float("inf"), float("inf")]
        for x, y in pairs:  # warm-up: oneDNN builds its kernels on the first call
            x @ y
        for _ in range(3):
            for i, (x, y) in enumerate(pairs):
                t = time.perf_counter()
                x @ y
                best[i] = min(best[i], time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return best[0] / max(best[1], 1e-9)


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 matmuls natively, so bf16 runs faster than fp32 (the `auto` choice of bf16
    autocast for training, and of bf16 inference where a caller wants it). `CORRAL_CPU_BF16=1` / `0` forces it.

    Measured (torch 2.13 CPU, oneDNN, 2 cores, bf16 vs fp32 matmul, GFLOP/s): Intel Sapphire Rapids (amx_bf16)
    233 vs 54; AMD EPYC Zen 4 (avx512_bf16, no AMX) 390 vs 172 at 2048x576x1536, 2.1-2.7x over a 135M model's
    training shapes (a linear layer's forward and backward at 2048 tokens under autocast: 35 vs 95 ms), 1.8x at
    64 rows and none at one row (a decode step's matrix-vector product is bound by memory, not arithmetic); AMD
    EPYC without either flag: bf16 slower than fp32 (converted through fp32). So the rule is a flag (amx_bf16 or
    avx512_bf16) AND the probe (`cpu_bf16_speedup`) finding bf16 at least 1.2x faster, which guards against a
    torch built without oneDNN's bf16 kernels or a VM that hides the instructions it reports. Detection runs once
    per process; the variable is read at every call. ARM's bf16 (`bf16` in Features) is not detected: unmeasured.
    """
    forced = os.environ.get("CORRAL_CPU_BF16", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced:
        raise ValueError(f"CORRAL_CPU_BF16={forced!r}: expected 1 or 0 (unset: detect)")
    return _cpu_bf16_detected()


@functools.cache
def _cpu_bf16_detected() -> bool:
    if not any(flag in cpu_flags() for flag in CPU_BF16_FLAGS) or not torch.backends.mkldnn.is_available():
        return False
    return cpu_bf16_speedup() > 1.2


def resolve_dtype(dtype: str, device: torch.device | None = None) -> torch.dtype:
    """`auto`: float32 on CPU (bf16 matmuls are slow there), bf16 on GPUs that compute in it natively, else fp16."""
    if dtype != "auto":
        return getattr(torch, dtype)
    device = device or default_device()
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.float32


def master_dtype(dtype: str) -> str:
    """The `dtype` to load weights in that an optimizer updates (full fine-tuning, a full critic): float32 master
    weights, with train.mixed_precision's autocast doing the bf16 / fp16 compute. AdamW on bf16 weights drops updates
    smaller than 1/256 of a weight (most of them at a learning rate of 1e-5), and the fp16 loss scaler refuses to
    unscale fp16 gradients. bf16 weights (and optimizer state) only when asked for with dtype=bfloat16."""
    return "bfloat16" if dtype == "bfloat16" else "float32"


def frozen_dtype(dtype: str, mixed_precision: str, device: torch.device | str | None = None) -> str:
    """The `dtype` to load weights in that training reads but never updates: a LoRA / QLoRA base, PPO's reward
    model, the views the reward model and critic take over the actor's base. `auto` on a CPU under bf16 autocast
    (`auto_mixed_precision` picks it where `cpu_bf16_native`) is bfloat16: autocast computes their matmuls in bf16
    anyway, so storing them in bf16 loses nothing more and halves their memory; the adapters trained over them
    stay float32 (peft keeps them so). On a GPU `auto` already means bf16 / fp16 (`resolve_dtype`); elsewhere, and
    under mixed_precision=no (where bf16 weights would meet fp32 activations), `dtype` as it is."""
    device = torch.device(device) if device is not None else default_device()
    if dtype == "auto" and device.type == "cpu" and mixed_precision == "bf16":
        return "bfloat16"
    return dtype


def attention_implementation(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """flash-attention 2 where it runs: installed, a CUDA GPU of compute capability 8.0 or later (it has no kernels
    for older ones), fp16 / bf16 weights (it refuses fp32 activations: fp32 weights run outside autocast in
    rollouts and evaluation). SDPA everywhere else. `dtype` None: what `dtype=auto` gives on `device`."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa"
    dtype = dtype or resolve_dtype("auto", device)
    if dtype not in (torch.float16, torch.bfloat16) or torch.cuda.get_device_capability(device) < (8, 0):
        return "sdpa"
    with contextlib.suppress(ImportError):
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    return "sdpa"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF file to a float32 safetensors HF folder at `out_dir` (once; atomic; locked)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    with _file_lock(out_dir.with_name(out_dir.name + ".lock")):
        if (out_dir / "config.json").is_file():  # another process finished while we waited
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning("converting %s to safetensors in %s (once; about 30 s)", gguf_path, out_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        except Exception as e:
            raise ModelLoadError(f"could not read GGUF file {gguf_path}: {e}") from e
        # The weights are de-quantized already; transformers refuses to save while it thinks otherwise.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "corral_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    return out_dir


def _gguf_cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"


def hub_name(name_or_path: str | Path) -> str:
    """The name another machine can load: the embedded model, by any of its names (its cache folder among
    them), is its hub id; anything else is returned as it is. Saved adapters and model cards use it."""
    known = embedded_for(name_or_path)
    return known.hub_id if known else str(name_or_path)


def resolve_model(name: str) -> ResolvedModel:
    """Turn what the user wrote into a loadable folder or hub id, converting GGUF files on the way.

    The embedded model's hub id resolves to its local conversion when its package is installed (never to the
    hub): adapters Corral saves name their base by that hub id, and must load here as they did before."""
    path = Path(name).expanduser()
    known = embedded_for(name)
    if known is not None and name == known.hub_id and not path.is_dir() and is_installed(known.name):
        name = known.name
    if name in EMBEDDED:
        try:
            gguf = embedded_gguf(name)
        except FileNotFoundError as e:
            raise ModelLoadError(str(e)) from None
        return ResolvedModel(str(convert_gguf(gguf, embedded_folder(name))))
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name} does not exist")
        return ResolvedModel(str(convert_gguf(path, _gguf_cache_folder(path))))
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(f"{path}/adapter_config.json names no base_model_name_or_path")
            return ResolvedModel(resolve_model(base).path, adapter=str(path))
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"could not load model '{name}': the folder exists but has no config.json "
                "(not a transformers model folder) nor adapter_config.json (not a peft adapter)"
            )
        return ResolvedModel(str(path))
    if path.exists():
        raise ModelLoadError(f"could not load model '{name}': it is a file, not a model folder or .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ResolvedModel(name)  # a hub id; transformers resolves it (and its cache)
    raise ModelLoadError(
        f"could not load model '{name}': tried the embedded models ({', '.join(EMBEDDED)}), "
        "a local folder (none there), a .gguf file (not one), and a hub id (expected 'org/name')"
    )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    resolved = resolve_model(name)
    source = resolved.adapter if resolved.adapter and _has_tokenizer(resolved.adapter) else resolved.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer of '{name}' from {source}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_model(
    name: str,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    quant_bits: int | None = None,
    trainable_adapter: bool = False,
    head: Literal["lm", "score"] = "lm",
    pad_token_id: int | None = None,
):
    """Load a causal LM, or with `head="score"` the same backbone with a one-label score head (a new random head
    on a base LM; a saved reward model's own), and a peft adapter on top when `name` is an adapter folder.

    `quant_bits` 4 or 8 loads the base through bitsandbytes (QLoRA). `pad_token_id` goes into the score head's
    config (its own pooling looks for it). Returns the model, in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = torch.device(device) if device is not None else default_device()
    resolved = resolve_model(name)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": attention_implementation(device, torch_dtype)}
    if head == "score":
        kwargs["num_labels"] = 1
        if pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
        if resolved.adapter:
            task = json.loads((Path(resolved.adapter) / "adapter_config.json").read_text()).get("task_type")
            if task != "SEQ_CLS":
                raise ModelLoadError(f"{name} is a {task} adapter, not a reward model (SEQ_CLS) adapter")
    if quant_bits:
        kwargs["quantization_config"] = quantization_config(quant_bits, torch_dtype)
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(resolved.path, **kwargs)
    except Exception as e:
        what = "a reward model" if head == "score" else "model"
        raise ModelLoadError(f"could not load {what} '{name}' from {resolved.path}: {e}") from e
    if not quant_bits:
        model.to(device)
    if resolved.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.adapter, is_trainable=trainable_adapter)
    model.eval()
    return model


def save_model(model, tokenizer, template, folder: str | Path, card: dict | None = None,
               state_dict: dict | None = None) -> Path:
    """Write `model` as a standard folder, atomically: a peft adapter or a full safetensors HF model, the
    tokenizer with `template`'s Jinja as its chat_template (so plain transformers and vLLM prompt as Corral
    trained; None keeps the tokenizer's), and a model card (README.md) from `card` (what made it, see
    `model_card`). An adapter names its base by `hub_name`, so the folder still finds it on another machine.
    `state_dict`: the model's full weights gathered from every process (FSDP, ZeRO-3), whose own parameters are
    only this process's shard; peft picks the adapter's out of it."""
    from corral.models.forward import unwrap

    model = unwrap(model)
    saved_template = tokenizer.chat_template
    with atomic_dir(folder) as tmp:
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        _name_bases_portably(tmp)
        if template is not None and getattr(template, "chat_template_jinja", None):
            tokenizer.chat_template = template.chat_template_jinja
        try:
            tokenizer.save_pretrained(tmp)
        finally:
            tokenizer.chat_template = saved_template
        (tmp / "README.md").write_text(model_card(model, template, card or {}), encoding="utf-8")
    return Path(folder)


def _name_bases_portably(folder: Path) -> None:
    """peft writes the base as it was loaded: for the embedded model, a path in this machine's cache."""
    for config_path in folder.rglob("adapter_config.json"):  # one per adapter (a second one sits in a subfolder)
        config = json.loads(config_path.read_text())
        base = config.get("base_model_name_or_path")
        if base and hub_name(base) != base:
            config["base_model_name_or_path"] = hub_name(base)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


_COMMAND: list[str] = []  # the corral command line now running, set by the CLI


@contextlib.contextmanager
def running_command(argv: list[str]):
    """While the CLI runs a recipe, model cards record its command line (`corral sft --data ...`; not argv[0],
    a path on this machine)."""
    _COMMAND.append(" ".join(argv))
    try:
        yield
    finally:
        _COMMAND.pop()


def model_card(model, template, card: dict) -> str:
    """The model card of a saved model or adapter (`card_text`), its base, library and loading code taken from
    `model` itself."""
    from corral.models.adapters import is_adapter

    adapter = is_adapter(model)
    config = model.peft_config["default"] if adapter else None
    base = getattr(config, "base_model_name_or_path", None) or getattr(model.config, "_name_or_path", "") or ""
    inner = model.get_base_model() if adapter else model
    kind = "SequenceClassification" if type(inner).__name__.endswith("ForSequenceClassification") else "CausalLM"
    usage = loading_code(kind, getattr(config, "peft_type", "") if adapter else None, base)
    if template is not None:
        card = {**card, "chat template": f"`{template.name}` (saved as the tokenizer's chat_template)"}
    return card_text(card, base, "peft" if adapter else "transformers", usage)


def loading_code(kind: str, peft_type: str | None = None, base: str = "") -> list[str]:
    """The card's how-to-load lines: a full model (`peft_type` None) or a peft adapter over `base`."""
    if peft_type is not None:
        return [f"A peft adapter ({getattr(peft_type, 'value', peft_type)}) over `{hub_name(base)}`:", "", "```python",
                f"from peft import AutoPeftModelFor{kind}", f"model = AutoPeftModelFor{kind}.from_pretrained(PATH)",
                "```"]
    return ["A full model:", "", "```python", f"from transformers import AutoModelFor{kind}",
            f"model = AutoModelFor{kind}.from_pretrained(PATH)", "```"]  # fmt: skip


def card_text(card: dict, base: str, library: str | None, usage: list[str]) -> str:
    """A Hugging Face model card: the hub's YAML front matter (license when known, base_model by its hub id,
    library_name, tags, datasets), then what made the folder, then `usage` (how to load it).

    `card` keys: `title`, `tags`, `license` (default: the base's, see `base_license`), `datasets` (hub dataset
    ids), `method`, `data` (what it was trained on: files, `builtin:NAME`), `metrics` (a dict), `command` (default:
    the corral command line running, if any); any other key is listed as it is."""
    card = dict(card)
    command = card.pop("command", None) or (_COMMAND[-1] if _COMMAND else None)
    metrics = {k: v for k, v in (card.pop("metrics", None) or {}).items() if v is not None}
    base = hub_name(base) if base else ""
    meta = {"license": card.pop("license", None) or (base_license(base) if base else None), "base_model": base,
            "library_name": library, "tags": ["corral", *card.pop("tags", [])], "datasets": card.pop("datasets", None)}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in meta.items() if v), "---", "",
             f"# {card.pop('title', 'Corral model')}", ""]  # fmt: skip
    for key, value in card.items():
        lines.append(f"- {key}: {', '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    if command:
        lines.append(f"- made by: `{command}`")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {f'{v:.6g}' if isinstance(v, float) else v} |" for k, v in metrics.items()]
    return "\n".join([*lines, "", *usage]) + "\n"


def base_license(name: str) -> str | None:
    """The license of model `name` if something on this machine says it: the embedded registry, or the
    `license:` of the model card in its folder (or in the hub cache, for a hub id; nothing is downloaded)."""
    known = embedded_for(name)
    if known is not None:
        return known.license
    readme = Path(name).expanduser() / "README.md"
    if not readme.is_file() and name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        with contextlib.suppress(Exception):  # not a valid repo id after all: nothing known
            cached = try_to_load_from_cache(name, "README.md")
            readme = Path(cached) if isinstance(cached, str) else readme
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None


def quantization_config(bits: int, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            "QLoRA needs bitsandbytes: pip install 'corral[quant]' (bitsandbytes>=0.46 runs on CPU and CUDA)"
        ) from None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quant bits must be 4 or 8, got {bits}")

