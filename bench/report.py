"""Regenerate the README's benchmark section from bench/results/*.json (never typed by hand).

    python bench/report.py [--readme README.md] [--results bench/results]

Rewrites the lines between `<!-- bench:start -->` and `<!-- bench:end -->` with one Markdown table
per results file (its rows and ratios, the command, date and machine). The README is written
atomically; without both markers it is left alone and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's corral, installed or not (as the other bench scripts)

from corral.atomic import atomic_write_text  # noqa: E402
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

COLUMN_TITLES = {  # row fields shown first, in this order; other fields follow under their own names
    "tokens_per_s": "tokens/s",
    "target_tokens_per_s": "trained tokens/s",
    "peak_rss_mb": "peak RSS (MB)",
    "peak_gpu_mb": "peak GPU mem (MB)",
    "steps": "steps",
    "tokens_per_step": "tokens/step",
    "median_step_s": "median step (s)",
    "timed_s": "timed (s)",
    "ttft_p50_s": "TTFT p50 (s)",
    "ttft_p95_s": "TTFT p95 (s)",
    "latency_p50_s": "latency p50 (s)",
    "requests": "requests",
    "output_tokens": "output tokens",
    "wall_s": "wall (s)",
    "mean_step_s": "mean step (s)",
    "gen_s": "generation (s/step)",
    "train_s": "training (s/step)",
    "gen_tok_s": "generated tokens/s",
    "train_tok_s": "training tokens/s",
    "reply_len": "reply tokens",
    "reward_mean": "reward",
}
HIDDEN_FIELDS = {"name", "self_peak_rss_mb", "process_wall_s", "timed_tokens", "timed_target_tokens", "timed_steps",
                 "timed_step_s", "recipe_train_s"}  # fmt: skip


def fmt_number(value) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def rows_table(rows: list[dict]) -> list[str]:
    present = [k for k in COLUMN_TITLES if any(k in r for r in rows)]
    for row in rows:
        present += [k for k in row if k not in COLUMN_TITLES and k not in HIDDEN_FIELDS and k not in present]
    lines = [
        "| " + " | ".join(["row"] + [COLUMN_TITLES.get(k, k) for k in present]) + " |",
        "|---|" + "---:|" * len(present),
    ]
    for row in rows:
        lines.append("| " + " | ".join([str(row.get("name", "?"))] + [fmt_number(row.get(k)) for k in present]) + " |")
    return lines


def machine_text(machine: dict) -> str:
    parts = [f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"]
    parts.append(f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU")
    parts.append(f"torch {machine.get('torch', '?')}")
    return "; ".join(parts)


def setup_text(setup: dict) -> str:
    known = []
    if "model" in setup:
        known.append(f"model `{setup['model']}`")
    lora = setup.get("lora")
    if isinstance(lora, dict):
        known.append("LoRA " + ", ".join(f"{k} {v}" for k, v in lora.items()))
    for key, title in (("seq_len", "seq len"), ("batch", "batch"), ("grad_accum", "grad accum"), ("dtype", "dtype"),
                       ("steps_timed", "timed steps"), ("warmup", "warmup steps"),
                       ("prompts_per_step", "prompts per step"), ("samples_per_prompt", "samples per prompt"),
                       ("max_new_tokens", "max new tokens"), ("decoding", "decoding"), ("kl_coef", "KL coef"),
                       ("clients", "clients"),
                       ("replies_differing_between_servers", "replies differing between the servers")):  # fmt: skip
        if key in setup:
            known.append(f"{title} {setup[key]}")
    return ", ".join(known)


def file_section(path: Path, results: dict) -> list[str]:
    area = path.stem
    lines = [f"### {area}", ""]
    machine = machine_text(results.get("machine", {}))
    lines.append(f"`{results.get('command', '?').strip()}` on {results.get('date', '?')}; {machine}.")
    setup = results.get("setup", {})
    if setup_text(setup):
        lines.append(f"Setup: {setup_text(setup)}.")
    lines.append("")
    lines += rows_table(results.get("rows", []))
    ratios = results.get("ratios", {})
    if ratios:
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {name} | {value:.2f} |" if isinstance(value, (int, float)) else f"| {name} | {value} |"
                  for name, value in ratios.items()]  # fmt: skip
    if setup.get("notes"):
        lines += ["", "<details><summary>How it was measured</summary>", "", setup["notes"], "", "</details>"]
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    lines.append(f"\n<sub>generated by `python bench/report.py` from `{shown}`</sub>")
    return lines


def render(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return "(no results yet: run `python bench/sft.py --steps 20 && python bench/report.py`)"
    sections = []
    for path in files:
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {path}: cannot read results: {e}") from None
        sections.append("\n".join(file_section(path, results)))
    return "\n\n".join(sections)


def replace_section(text: str, body: str, where: str) -> str:
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise ValueError(
            f"{where}: expected one line '{START}' followed by one line '{END}' "
            f"(found {len(starts)} start and {len(ends)} end markers)"
        )
    return "".join(lines[: starts[0] + 1]) + body.rstrip("\n") + "\n" + "".join(lines[ends[0] :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", default=str(REPO / "README.md"), help="README to update (default: the repo's)")
    p.add_argument("--results", default=str(REPO / "bench" / "results"), help="folder of results *.json")
    args = p.parse_args(argv)
    readme = Path(args.readme)
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as e:
        print(f"error: cannot read {readme}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        updated = replace_section(text, render(Path(args.results)), str(readme))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if updated == text:
        print(f"{readme}: benchmark section already up to date")
        return 0
    atomic_write_text(readme, updated)
    print(f"{readme}: benchmark section rewritten from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
