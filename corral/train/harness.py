"""The one training harness: what every training recipe does around its own step, written once.

SFT, reward, DPO (through `train/loop.py`) and PPO (in its recipe) all use it with plain values:

    harness = Harness(accelerator, out, save_total_limit=..., resume=..., report_to=...)
    actor = harness.add("model", model, save=..., total_steps=..., lr=..., schedule=..., max_grad_norm=...)
    start = harness.resume()                    # loads every module's weights and the accelerate state
    for step in range(start, total):
        ... loss.backward() ...                 # the recipe's own step
        grad_norm = actor.step()                # clip (or measure), optimizer, schedule, zero grads
        harness.metrics.log({...})
        harness.checkpoint(step + 1)            # atomic step folder: model/ (+ critic/ ...), trainer_state/

It owns optimizer and schedule creation (`train/optim.py`), gradient clipping (`max_grad_norm=0`: off, the
norm still logged), accelerate's `prepare`, the extra state that a checkpoint carries (a KL controller, an EMA),
resume, the checkpoint call, and the metrics log with its trackers. Mixed precision is the accelerator's
(`make_accelerator`), so every recipe gets it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from corral.train import checkpoint as ckpt
from corral.train.metrics import MetricsLog
from corral.train.optim import make_optimizer, make_scheduler


def make_accelerator(mixed_precision: str = "auto"):
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True on a machine without CUDA: accelerate then sets up multi-process CPU runs (gloo) when
    # launched with several processes; without it each process would think it runs alone.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


@dataclass
class Trained:
    """One trained module with its optimizer, schedule and clipping. `model` is the prepared (wrapped) module."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    max_grad_norm: float
    save: Callable[[Path], None]  # writes the module's standard folder (adapter or full model)
    load: Callable[[Path], None]  # reads it back into the module, in place
    accelerator: object = field(repr=False)
    params: list = field(default_factory=list, repr=False)

    def step(self) -> torch.Tensor:
        """Clip the gradient norm (0: no clipping), step the optimizer and the schedule, zero the gradients.
        Returns the gradient norm before clipping, as a tensor: reading it syncs with the GPU, so callers read it
        only when they log."""
        if self.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            grads = [p.grad.norm() for p in self.params if p.grad is not None]
            norm = torch.norm(torch.stack(grads)) if grads else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class Harness:
    def __init__(self, accelerator, output_dir: str | Path, *, save_total_limit: int, resume: str,
                 report_to: Iterable[str] = (), config: dict | None = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit
        self.resume_setting = resume
        self.report_to = list(report_to)
        self.config = config
        self.trained: list[Trained] = []
        self.metrics: MetricsLog | None = None
        self.resumed_from: Path | None = None

    def add(self, name: str, model: torch.nn.Module, *, save: Callable[[torch.nn.Module, Path], None],
            total_steps: int, optimizer: str, lr: float, weight_decay: float, betas: tuple[float, float],
            schedule: str, warmup_ratio: float, max_grad_norm: float,
            weights: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Trained:
        """Optimizer and schedule for `model` (its trainable parameters), prepared by accelerate. The first module
        added is the checkpoint's `model/`, later ones go beside it under their `name`. `total_steps` counts this
        module's optimizer steps (the schedule's length; warmup is `warmup_ratio` of them). `weights(unwrapped)`
        picks the module whose folder is saved and loaded (PPO's critic saves the model inside its wrapper)."""
        from corral.models.forward import unwrap

        opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay, betas)
        scheduler = make_scheduler(opt, schedule, round(warmup_ratio * total_steps), total_steps)
        model, opt = self.accelerator.prepare(model, opt)
        # The scheduler is stepped by hand once per optimizer step (accelerate would step it once per process).
        self.accelerator.register_for_checkpointing(scheduler)
        pick = weights or (lambda m: m)
        trained = Trained(
            name if self.trained else "model", model, opt, scheduler, max_grad_norm,
            save=lambda folder: save(pick(unwrap(model)), folder),
            load=lambda folder: ckpt.load_weights(pick(unwrap(model)), folder),
            accelerator=self.accelerator, params=[p for p in model.parameters() if p.requires_grad],
        )  # fmt: skip
        self.trained.append(trained)
        return trained

    def track(self, *states) -> None:
        """More state every checkpoint carries and resume restores (objects with state_dict/load_state_dict)."""
        for state in states:
            if state is not None:
                self.accelerator.register_for_checkpointing(state)

    def resume(self) -> int:
        """Load the checkpoint `resume` names (`auto`: the newest, if any) and open the metrics log.
        Returns the step to start from (0 for a fresh run)."""
        ckpt.install_state_hooks(self.accelerator)
        start = 0
        self.resumed_from = ckpt.find_resume(self.output_dir, self.resume_setting)
        if self.resumed_from is not None:
            for trained in self.trained:
                trained.load(self.resumed_from / trained.name)
            self.accelerator.load_state(str(self.resumed_from / "trainer_state"))
            start = ckpt.read_state(self.resumed_from)["step"]
            if self.accelerator.is_main_process:
                print(f"resumed from {self.resumed_from} at step {start}")
        self.metrics = MetricsLog(self.output_dir, resume_step=start, enabled=self.accelerator.is_main_process,
                                  report_to=self.report_to, config=self.config)  # fmt: skip
        return start

    def checkpoint(self, step: int, state: dict | None = None) -> Path:
        """An atomic `checkpoints/step-N` folder with every module's standard folder and the trainer state."""
        return ckpt.save_checkpoint(self.accelerator, step, self.output_dir,
                                    {t.name: t.save for t in self.trained}, state or {}, self.save_total_limit)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
