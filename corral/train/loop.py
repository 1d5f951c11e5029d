"""The one data-driven training loop, on accelerate: SFT, the reward model and DPO run through it; PPO, whose
rows come from rollouts, writes its own step in its recipe. Both sit on the one harness (`train/harness.py`).

A recipe hands it the model, a list of rows, `collate` (rows -> tensors) and `loss_fn`
(model, batch -> summed loss, number of targets[, stats]). `stats` is an optional dict of summed
per-target quantities (DPO's reward accuracy, margins...): the loop sums them over the step on every
process and logs each divided by the step's targets, beside the loss. The loop owns data order, gradient
accumulation and evaluation; the harness the optimizer, schedule, clipping, checkpoints, resume and metrics.

The loss of an optimizer step is the sum of token losses over every micro-batch of the step, on
every process, divided by the number of target tokens in the whole step. So batch 1 x accum 8,
batch 8 x accum 1 and 2 processes x batch 4 give the same update.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from corral.config import TrainConfig
from corral.train import checkpoint as ckpt
from corral.train.harness import Harness


@dataclass
class StepPlan:
    """Which rows each process trains on at each step: a deterministic function of the step.

    Rows are read from an endless stream of per-epoch permutations (seeded), so resuming at step s
    needs nothing but s. A step takes batch_size x grad_accum x world_size consecutive rows of the
    stream; process p takes the p-th block of them, in micro-batches of batch_size.
    """

    num_rows: int
    batch_size: int
    grad_accum: int
    world_size: int = 1
    seed: int = 0
    _perms: dict = field(default_factory=dict, repr=False)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def total_steps(self, max_steps: int, epochs: float) -> int:
        return max_steps if max_steps > 0 else max(1, math.ceil(epochs * self.num_rows / self.rows_per_step))

    def _row(self, i: int) -> int:
        epoch, pos = divmod(i, self.num_rows)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.num_rows, generator=g).tolist()}
        return self._perms[epoch][pos]

    def step_rows(self, step: int) -> list[int]:
        start = step * self.rows_per_step
        return [self._row(i) for i in range(start, start + self.rows_per_step)]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        per_process = self.batch_size * self.grad_accum
        mine = self.step_rows(step)[rank * per_process : (rank + 1) * per_process]
        return [mine[i : i + self.batch_size] for i in range(0, per_process, self.batch_size)]


def optim_values(settings) -> dict:
    """The optimizer fields of an OptimConfig (TrainConfig, PPO's actor / critic) as the harness takes them."""
    from corral.config import OptimConfig

    return {name: getattr(settings, name) for name in OptimConfig.model_fields}


@dataclass
class TrainResult:
    steps: int
    last_loss: float | None
    eval_loss: float | None
    checkpoint: Path | None
    metrics_path: Path
    resumed_from: int = 0
    # save(folder): the trained model's standard folder. Every process calls it (FSDP / ZeRO-3 gather the weights).
    save: Callable[[Path], None] | None = None
    precision: dict = field(default_factory=dict)  # what the run computed and stored in (harness.precision_info)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(model, rows: Sequence, collate_fn, loss_fn, accelerator, batch_size: int) -> float:
    """Mean loss per target over `rows` (sharded across processes). Every process runs the same number of forwards
    (under FSDP each one gathers weights from all processes): one short of rows repeats its last batch, uncounted."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    forwards = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / batch_size)
    with torch.no_grad():
        for k in range(forwards):
            ids = mine[k * batch_size : (k + 1) * batch_size]
            batch = _to_device(collate_fn([rows[j] for j in ids or mine[-batch_size:] or [0]]), accelerator.device)
            with accelerator.autocast():
                loss_sum, n, *_ = loss_fn(model, batch)
            if ids:
                total += torch.stack([loss_sum.double(), n.double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train(
    model,
    rows: Sequence,
    *,
    collate_fn: Callable[[list], dict],
    loss_fn: Callable[[object, dict], tuple[torch.Tensor, torch.Tensor]],
    settings: TrainConfig,
    output_dir: str | Path,
    save_model: Callable[[object, Path], None],
    accelerator,
    eval_rows: Sequence | None = None,
    count_targets: Callable[[object], int] = lambda row: row.num_targets,
    count_tokens: Callable[[object], int] = lambda row: len(row.input_ids),
    config: dict | None = None,
) -> TrainResult:
    output_dir = Path(output_dir)
    main = accelerator.is_main_process
    plan = StepPlan(len(rows), settings.batch_size, settings.grad_accum, accelerator.num_processes, settings.seed)
    total_steps = plan.total_steps(settings.max_steps, settings.epochs)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # adapters on a frozen base need a grad path into the checkpoints
    harness = Harness(accelerator, output_dir, save_total_limit=settings.save_total_limit, resume=settings.resume,
                      report_to=settings.report_to, config=config)
    trained = harness.add("model", model, save=save_model, total_steps=total_steps, micro_batch=settings.batch_size,
                          grad_accum=settings.grad_accum, **optim_values(settings))
    model = trained.model
    start_step = harness.resume()
    metrics = harness.metrics

    def checkpoint(step: int) -> Path:
        path = harness.checkpoint(step, {"total_steps": total_steps})
        metrics.plot()
        return path

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=start_step, desc="train", disable=not main, dynamic_ncols=True)
    seen_tokens = sum(sum(count_tokens(rows[i]) for i in plan.step_rows(s)) for s in range(start_step))
    started = time.perf_counter()
    last_loss = eval_loss = None
    last_saved = start_step if harness.resumed_from is not None else None
    model.train()
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        step_rows = plan.step_rows(step)
        # Known up front for the whole step, across processes: normalise by it (habit 6).
        step_targets = sum(count_targets(rows[i]) for i in step_rows)
        step_tokens = sum(count_tokens(rows[i]) for i in step_rows)
        micro = plan.micro_batches(step, accelerator.process_index)
        loss_sum_total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        stat_sums: dict[str, torch.Tensor] = {}
        for row_ids in micro:
            batch = _to_device(collate_fn([rows[i] for i in row_ids]), accelerator.device)
            # accumulate(): gradients are synced (DDP, FSDP) and DeepSpeed steps only on the step's last micro-batch
            # (the harness set gradient_accumulation_steps to grad_accum).
            with accelerator.accumulate(model), accelerator.autocast():
                loss_sum, _, *extra = loss_fn(model, batch)
                for name, value in (extra[0] if extra else {}).items():
                    stat_sums[name] = stat_sums.get(name, 0) + value.detach().double()
                # DDP averages gradients over processes and accelerate (or DeepSpeed) divides the loss by the
                # accumulation steps; multiply both back so the step's gradient is the gradient of (sum of all
                # token losses) / (all target tokens).
                scale = accelerator.num_processes * accelerator.gradient_accumulation_steps
                accelerator.backward(loss_sum * scale / max(step_targets, 1))
            loss_sum_total += loss_sum.detach().double()
        grad_norm = trained.step()
        loss_sum_total = accelerator.reduce(loss_sum_total, reduction="sum")
        seen_tokens += step_tokens
        done = step + 1
        if done % settings.log_every == 0 or done == total_steps:
            last_loss = loss_sum_total.item() / max(step_targets, 1)  # .item() syncs: only on logging steps
            elapsed = time.perf_counter() - t0
            record = {
                "step": done,
                "loss": last_loss,
                "lr": trained.lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": step_tokens / elapsed,
                "target_tokens": step_targets,
                "seen_tokens": seen_tokens,
                "elapsed_s": time.perf_counter() - started,
            }
            for name, value in stat_sums.items():
                record[name] = accelerator.reduce(value, reduction="sum").item() / max(step_targets, 1)
            metrics.log(record)
            progress.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        progress.update(1)
        if eval_rows and settings.eval_every and done % settings.eval_every == 0 and done != total_steps:
            eval_loss = evaluate(model, eval_rows, collate_fn, loss_fn, accelerator, settings.batch_size)
            metrics.log({"step": done, "eval_loss": eval_loss})
        if settings.save_every and done % settings.save_every == 0 and done != total_steps:
            last_saved = done
            checkpoint(done)
    progress.close()
    if eval_rows:
        eval_loss = evaluate(model, eval_rows, collate_fn, loss_fn, accelerator, settings.batch_size)
        metrics.log({"step": total_steps, "eval_loss": eval_loss})
        if main:
            print(f"eval loss: {eval_loss:.4f} ({len(eval_rows)} held-out rows)")
    path = checkpoint(total_steps) if last_saved != total_steps else ckpt.list_checkpoints(output_dir)[-1][1]
    harness.close()
    result = TrainResult(total_steps, last_loss, eval_loss, path, metrics.path, resumed_from=start_step,
                         save=trained.save_to, precision=harness.precision)
    if main:
        write_summary(output_dir, result, time.perf_counter() - started)
    return result


def write_summary(output_dir: Path, result: TrainResult, train_s: float) -> Path:
    """`summary.json`: the run's figures in one file (steps, last losses, precision, this process's training time
    and peak memory), as PPO writes its own."""
    import json
    import resource

    from corral.atomic import atomic_write_text

    summary = {"steps": result.steps, "loss": result.last_loss, "eval_loss": result.eval_loss,
               "resumed_from": result.resumed_from, "precision": result.precision, "train_s": train_s,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip
    if torch.cuda.is_available():
        summary["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    path = output_dir / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    return path
