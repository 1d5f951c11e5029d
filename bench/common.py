"""What every benchmark records about where it ran: the machine and the library versions."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__.split("+")[0],
        "torch_threads": torch.get_num_threads(),
        **cpu_precision_info(),
    }


CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")  # what decides bf16 and fp32 matmul speed


def cpu_precision_info() -> dict:
    """The CPU flags that decide matmul speed, the measured bf16 / fp32 matmul speed ratio (Corral's probe), and
    what Corral's `auto` concludes (`cpu_bf16_native`, CORRAL_CPU_BF16 respected), so a result says which
    precision its `auto` rows ran in and why."""
    import torch

    from corral.models.load import cpu_bf16_native, cpu_bf16_speedup, cpu_flags

    flags = cpu_flags()
    return {"cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
            "cpu_bf16_matmul_speedup": round(cpu_bf16_speedup(), 2), "cpu_bf16_native": cpu_bf16_native(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def safe_ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either side is missing or zero."""
    return round(a / b, 3) if a and b else None


def versions(packages=("corral", "transformers", "peft", "accelerate", "trl", "datasets")) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_path(area: str, gpu: str | None, out: str | None = None) -> Path:
    """`--out`, or bench/results/AREA.json (AREA-GPU.json when measured on a GPU)."""
    if out:
        return Path(out)
    return Path(__file__).resolve().parent / "results" / (f"{area}-{gpu_slug(gpu)}.json" if gpu else f"{area}.json")


def write_results(path: Path, results: dict) -> Path:
    from corral.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def timed_window(step_ends: list[float], tokens: list[int], targets: list[int], warmup: int) -> dict:
    """Throughput over steps warmup+1..N: `step_ends[k]` is when step k+1 ended (0-based list).

    The window runs from the end of the last warmup step to the end of the last step, so it holds
    everything done between steps too (data loading, collation, logging), for every row alike.
    """
    timed_s = step_ends[-1] - step_ends[warmup - 1]
    timed_tokens = sum(tokens[warmup:])
    timed_targets = sum(targets[warmup:])
    step_s = [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:])]
    return {
        "tokens_per_s": timed_tokens / timed_s,
        "target_tokens_per_s": timed_targets / timed_s,
        "steps": len(step_ends),
        "timed_steps": len(step_ends) - warmup,
        "timed_s": timed_s,
        "timed_tokens": timed_tokens,
        "timed_target_tokens": timed_targets,
        "median_step_s": statistics.median(step_s),
        "tokens_per_step": timed_tokens / (len(step_ends) - warmup),  # peak memory follows this, not tokens/s
    }


def run_row_child(script: Path, key: str, name: str, argv: list[str], workdir: Path) -> dict:
    """Run one row in a fresh child; its peak RSS comes from os.wait4 (that child alone, kernel-tracked)."""
    result_path = workdir / f"{key}.json"
    log_path = workdir / f"{key}.log"
    cmd = [sys.executable, str(Path(script).resolve()), *argv, "--child", key, "--child-result", str(result_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it was reaped
    wall = time.perf_counter() - started
    if child.returncode != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"row {name!r} failed (exit {child.returncode}); last lines of its output:\n{tail}")
    row = {"name": name, **json.loads(result_path.read_text())}
    row["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    row["process_wall_s"] = wall
    return row


def write_child_row(row: dict, path: str | Path) -> None:
    """A row child's last act: add its own peak memory (RSS, and GPU on CUDA) and hand the row to the parent."""
    import resource

    row["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if on_cuda():
        import torch

        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(path).write_text(json.dumps(row))
