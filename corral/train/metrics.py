"""Run metrics: one JSON line per logged step, and a loss-curve PNG a person can open.

Optionally every line also goes to experiment trackers (`train.report_to`): accelerate's tracker classes, made
here on the main process rather than through the Accelerator, so the recipes keep one place that logs.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import netrc
import numbers
import os
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from corral.atomic import atomic_write_bytes, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "trackio")
# What each tracker imports (accelerate's TensorBoardTracker takes torch's writer, else tensorboardX), and the
# package that provides it.
_TRACKER_MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboardX"), "wandb": ("wandb",),
                    "trackio": ("trackio",)}
PROJECT = "corral"


class TrackerUnavailable(ImportError, ValueError):
    """A tracker in `report_to` whose package is not installed (a ValueError too: the CLI reports it plainly)."""


def check_trackers(report_to: str | Iterable[str]) -> list[str]:
    """The tracker names, checked: each known and importable. Cheap enough to call before loading a model."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [] if names == ["none"] else names
    for name in names:
        if name not in _TRACKER_MODULES:
            raise ValueError(f"unknown tracker {name!r} in report_to (choose from {', '.join(TRACKERS)})")
        for module in _TRACKER_MODULES[name]:
            try:
                importlib.import_module(module)
                break
            except ImportError:
                continue
        else:
            raise TrackerUnavailable(
                f"report_to={name} needs the {name} package: pip install {name} "
                f"(every tracker: pip install 'corral[track]')", name=name)
    return list(dict.fromkeys(names))


class MetricsLog:
    """`metrics.jsonl` in `output_dir`, and the same records sent to the trackers in `report_to`.

    Only an enabled log (the main process) writes or creates trackers; every process checks that the trackers'
    packages are there, so a missing one stops all of them at construction, before training.
    """

    def __init__(self, output_dir: str | Path, resume_step: int = 0, enabled: bool = True,
                 report_to: str | Iterable[str] = (), run_name: str = "", config: dict | None = None,
                 first_record: dict | None = None):
        self.output_dir = Path(output_dir)
        self.first_record = dict(first_record or {})  # merged into the first record logged (the run's precision)
        self.path = self.output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.trackers: list = []
        names = check_trackers(report_to)
        if not enabled:
            return
        # A resumed run re-does the steps after its checkpoint: drop their old lines so each step appears once.
        kept = [r for r in self.read() if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        run_name = run_name or self.output_dir.resolve().name
        if names:
            from accelerate import PartialState

            PartialState()  # accelerate's trackers log through it: the Accelerator's if built, else one process
        try:
            for name in names:
                tracker = _make_tracker(name, self.output_dir, run_name, resume_step)
                # We already run on the main process only: keep accelerate from asking PartialState each call.
                tracker.main_process_only = False
                tracker.start()
                self.trackers.append(tracker)
                if config:
                    tracker.store_init_configuration(flatten_config(config))
        except BaseException:
            self.close()
            raise

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.first_record:
            record, self.first_record = {**record, **self.first_record}, {}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        values = {k: v for k, v in record.items() if k != "step" and _is_number(v)} if self.trackers else {}
        if values:
            step = int(record["step"]) if "step" in record else None
            for tracker in self.trackers:
                tracker.log(values, step=step)

    def close(self) -> None:
        """Finish every tracker (flush and close TensorBoard's file, end the wandb/trackio run); safe to repeat."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def plot(self, title: str = "") -> Path | None:
        if not self.enabled:
            return None
        return plot_losses(self.read(), self.path.with_name("loss.png"), title)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def flatten_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> `train.lr`-style keys (the CLI's), values a tracker's hparams take (lists become text)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _make_tracker(name: str, output_dir: Path, run_name: str, resume_step: int):
    from accelerate.tracking import TensorBoardTracker, TrackioTracker, WandBTracker

    if name == "tensorboard":
        # logging_dir/run_name: output_dir/tensorboard. A resumed run purges the events after its checkpoint
        # (TensorBoard drops older events at steps >= purge_step), as metrics.jsonl drops those lines.
        kwargs = {"purge_step": resume_step + 1} if resume_step else {}
        return TensorBoardTracker("tensorboard", output_dir, **kwargs)
    if name == "wandb":
        kwargs: dict = {"name": run_name}
        if not os.environ.get("WANDB_DIR"):
            output_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(output_dir)
        if not os.environ.get("WANDB_MODE") and not wandb_api_key_configured():
            kwargs["mode"] = "offline"
            log.info("wandb: no API key (WANDB_API_KEY or `wandb login`), logging offline; upload with `wandb sync`")
        return WandBTracker(os.environ.get("WANDB_PROJECT") or PROJECT, **kwargs)
    return TrackioTracker(PROJECT, name=run_name)


def wandb_api_key_configured() -> bool:
    """Whether wandb would find credentials without prompting: WANDB_API_KEY, an identity token file, or a
    `wandb login` entry in the netrc file for the server (WANDB_BASE_URL, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else [os.path.expanduser("~/.netrc"),
                                                                    os.path.expanduser("~/_netrc")]
    for path in paths:
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if auth and auth[2]:
            return True
    return False


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
