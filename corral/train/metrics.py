"""Run metrics: one JSON line per logged step, and a loss-curve PNG a person can open."""

from __future__ import annotations

import io
import json
from pathlib import Path

from corral.atomic import atomic_write_bytes, atomic_write_text, read_jsonl


class MetricsLog:
    def __init__(self, output_dir: str | Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        # A resumed run re-does the steps after its checkpoint: drop their old lines so each step appears once.
        kept = [r for r in self.read() if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def plot(self, title: str = "") -> Path | None:
        if not self.enabled:
            return None
        return plot_losses(self.read(), self.path.with_name("loss.png"), title)


def plot_losses(rows: list[dict], path: Path, title: str = "") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target token)")
    ax.set_title(title or path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_panels(rows: list[dict], path: Path, panels: dict[str, list[str]], title: str = "") -> Path | None:
    """One small plot per panel (title -> metric keys against `step`), in a grid; keys never logged are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {name: [k for k in keys if any(k in r for r in rows)] for name, keys in panels.items()}
    present = {name: keys for name, keys in present.items() if keys}
    if not present:
        return None
    cols = 3
    nrows = -(-len(present) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), dpi=100, squeeze=False)
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, (name, keys) in zip(axes.flat, present.items()):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    axes.flat[0].figure.suptitle(title or path.parent.name)
    fig.supxlabel("step", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
