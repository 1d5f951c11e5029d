"""What a person opens after a distillation run: report.json (one entry per iteration), report.md and a
self-contained report.html with the curves and sample hard / easy instructions with both answers."""

from __future__ import annotations

import json
from pathlib import Path

from corral.atomic import atomic_write_text

PANELS = {
    "referee score (mean over scored instructions)": ["teacher_score", "student_score"],
    "teacher minus student": ["gap"],
    "hard / easy / unparseable": ["hard", "easy", "unparseable"],
    "pool sizes": ["train_pool", "cache_pool"],
    "endpoint tokens (all roles)": ["teacher_tokens"],
    "student training loss": ["train_loss"],
}


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sample_rows(discrimination: dict, label: str, n: int) -> list[dict]:
    """The `n` instructions of `label` with the largest (hard) or smallest (easy) gap: the clearest cases."""
    rows = [r for r in discrimination["rows"] if r["label"] == label]
    return sorted(rows, key=lambda r: r["gap"], reverse=label == "hard")[:n]


def to_markdown(summaries: list[dict], samples: dict[int, dict], spent: dict, stopped: str | None,
                figure: str | None, title: str) -> str:
    lines = [f"# {title}", ""]
    if stopped:
        lines += [f"**Stopped early:** {stopped}. Run the same command again (with a larger budget) to continue.", ""]
    lines += [f"Endpoint calls so far: {spent['calls']} ({spent['tokens']} tokens); by role: "
              + ", ".join(f"{role} {n['calls']} calls / {n['tokens']} tokens" for role, n in spent["roles"].items()), ""]
    lines += [("| iteration | train pool | cache pool | scored | hard | easy | unparseable | teacher score | student "
               "score | gap | new kept (hard/easy) | dropped | calls | tokens | train loss | minutes |"),
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s in summaries:
        g = s["generated"]
        lines.append(f"| {s['iteration']} | {s['train_pool']} | {s['cache_pool']} | {s['scored']} | {s['hard']} | "
                     f"{s['easy']} | {s['unparseable']} | {_num(s['teacher_score'])} | {_num(s['student_score'])} | "
                     f"{_num(s['gap'])} | {g['kept']} ({g['kept_hard']}/{g['kept_easy']}) | {sum(g['dropped'].values())} | "
                     f"{s['teacher_calls']} | {s['teacher_tokens']} | {_num(s['train_loss'], 4)} | "
                     f"{_num(s['seconds'] / 60, 1)} |")  # fmt: skip
    lines.append("")
    if figure:
        lines += [f"![curves]({figure})", ""]
    for s in summaries:
        g = s["generated"]
        if g["dropped"]:
            lines += [f"Iteration {s['iteration']}: new instructions dropped, by reason: "
                      + ", ".join(f"{reason} {n}" for reason, n in sorted(g["dropped"].items(), key=lambda x: -x[1])), ""]
    for iteration, by_label in samples.items():
        for label, rows in by_label.items():
            if not rows:
                continue
            lines += [f"## Iteration {iteration}: {label} instructions", ""]
            for r in rows:
                lines += [(f"- **{_short(r['prompt'], 300)}** (teacher {_num(r['teacher_score'])}, student "
                           f"{_num(r['student_score'])})"),
                          f"  - teacher: {_short(r['teacher_answer'])}", f"  - student: {_short(r['student_answer'])}"]
            lines.append("")
    return "\n".join(lines) + "\n"


def write_report(out: Path, summaries: list[dict], discriminations: dict[int, dict], spent: dict,
                 stopped: str | None, samples_per_label: int = 3) -> dict[str, Path]:
    from corral.eval.report import markdown_page
    from corral.train.metrics import plot_panels

    out = Path(out)
    rows = [{"step": s["iteration"], **{k: s[k] for k in ("teacher_score", "student_score", "gap", "hard", "easy",
                                                             "unparseable", "train_pool", "cache_pool", "teacher_tokens",
                                                             "train_loss") if s.get(k) is not None}}
            for s in summaries]  # fmt: skip
    figure = plot_panels(rows, out / "figures" / "distill.png", PANELS, f"corral distill: {out}") if rows else None
    samples = {k: {label: sample_rows(d, label, samples_per_label) for label in ("hard", "easy")}
               for k, d in discriminations.items()}  # fmt: skip
    report = {"iterations": summaries, "spent": spent, "stopped": stopped}
    markdown = to_markdown(summaries, samples, spent, stopped, "figures/distill.png" if figure else None,
                           "Corral distillation report")  # fmt: skip
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_text(paths["html"], markdown_page("Corral distillation report", markdown, images_dir=out))
    return paths
