"""`corral delta make` / `corral delta apply`: publish a fine-tune as delta weights (target minus base) where the
base's license forbids sharing it, and rebuild the target from the base and the delta (`corral/models/delta.py`)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

from corral.config import DeltaApplyConfig, DeltaMakeConfig
from corral.models.delta import DeltaResult, apply_delta, make_delta, model_folder, read_manifest
from corral.models.load import base_license, card_text, hub_name, loading_code

MIB = 1 << 20


def make(cfg: DeltaMakeConfig) -> DeltaResult:
    start = _rss_mb()
    base, target = model_folder(cfg.base), model_folder(cfg.target)
    base_name, target_name = hub_name(cfg.base), hub_name(cfg.target)
    usage = ["Not a model by itself: rebuild the target from the base (the delta checks it is the right one) with", "",
             "```bash", f"corral delta apply --base {base_name} --delta PATH --output TARGET", "```"]  # fmt: skip

    def card(manifest: dict) -> str:
        return card_text({"title": f"Delta weights of {target_name} over {base_name}", "tags": ["delta"],
                          "license": base_license(cfg.target), "method": "delta weights (target minus base)",
                          "stored dtype": cfg.dtype, "base sha256": manifest["base"]["sha256"]},
                         base_name, None, usage)  # fmt: skip

    result = make_delta(base, target, Path(cfg.output_dir), stored=cfg.dtype, max_shard_bytes=cfg.max_shard_mb * MIB,
                        base_name=base_name, target_name=target_name, card=card)  # fmt: skip
    print(f"delta of {cfg.target} over {cfg.base}: {result.folder} ({result.tensors} tensors, "
          f"{result.written_bytes / MIB:.0f} MiB in {len(result.files)} file(s), stored as {cfg.dtype})")
    print(_memory_line(start, result.model_bytes, cfg.max_shard_mb))
    return result


def apply(cfg: DeltaApplyConfig) -> DeltaResult:
    start = _rss_mb()
    delta = Path(cfg.delta)
    manifest = read_manifest(delta)
    base = model_folder(cfg.base)
    target_name, base_name = manifest["target"]["name"], manifest["base"]["name"]
    config = json.loads((delta / "config.json").read_text()) if (delta / "config.json").is_file() else {}
    score = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])

    def card(manifest: dict) -> str:
        return card_text({"title": f"{target_name}, rebuilt from delta weights", "license": base_license(str(delta)),
                          "method": "corral delta apply", "delta": str(delta)},
                         base_name, "transformers", loading_code("SequenceClassification" if score else "CausalLM"))

    result = apply_delta(base, delta, Path(cfg.output_dir), max_shard_bytes=cfg.max_shard_mb * MIB, card=card)
    print(f"applied {delta} to {cfg.base}: {result.folder} ({result.tensors} tensors checked against the manifest; "
          f"{len(result.files)} weight file(s); loads with plain transformers)")
    print(_memory_line(start, result.model_bytes, cfg.max_shard_mb))
    return result


def _rss_mb() -> float:
    """This process's resident memory now (Linux; 0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _memory_line(start_mb: float, model_bytes: int, shard_mb: int) -> str:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return (f"peak RSS {peak:.0f} MiB ({start_mb:.0f} MiB before it began, so +{peak - start_mb:.0f} MiB) for a "
            f"{model_bytes / MIB:.0f} MiB model, shards of at most {shard_mb} MiB")
