"""The one training harness: what every training recipe does around its own step, written once.

SFT, reward, DPO (through `train/loop.py`) and PPO (in its recipe) all use it with plain values:

    harness = Harness(accelerator, out, save_total_limit=..., resume=..., report_to=...)
    actor = harness.add("model", model, save=..., total_steps=..., micro_batch=..., lr=..., max_grad_norm=...)
    start = harness.resume()                    # loads every module's weights and the accelerate state
    for step in range(start, total):
        ... loss.backward() ...                 # the recipe's own step
        grad_norm = actor.step()                # clip (or measure), optimizer, schedule, zero grads
        harness.metrics.log({...})
        harness.checkpoint(step + 1)            # atomic step folder: model/ (+ critic/ ...), trainer_state/

It owns optimizer and schedule creation (`train/optim.py`), gradient clipping (`max_grad_norm=0`: off, the
norm still logged), accelerate's `prepare`, the extra state that a checkpoint carries (a KL controller, an EMA),
resume, the checkpoint call, and the metrics log with its trackers. Mixed precision is the accelerator's
(`make_accelerator`), so every recipe gets it the same way; `resume` prints it and the first metrics record
carries it (`precision_info`).

Under FSDP and DeepSpeed (`accelerate launch --config_file corral/configs/accelerate_*.yaml`) each process holds a
share of the weights: accelerate's `save_state` / `load_state` write and read the sharded model with the
optimizer, and a standard model folder is written from the full weights gathered on every process
(`Trained.save_to`, which every process must call). See docs/scaling.md for what has run where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from corral.train import checkpoint as ckpt
from corral.train.metrics import MetricsLog
from corral.train.optim import make_optimizer, make_scheduler


def auto_mixed_precision(dtype: str = "auto") -> str:
    """`train.mixed_precision=auto`: bf16 autocast on a CPU that computes bf16 natively (`cpu_bf16_native`: AMX or
    AVX512-BF16, where a 135M model's matmuls run 2-4x faster in bf16), none on other CPUs (bf16 is slower than
    fp32 there); on a GPU fp16 autocast when fp16 weights were asked for (`dtype=float16`), bf16 on GPUs that compute
    in it natively (Ampere and later), fp16 with loss scaling on older GPUs (V100, T4), where bf16 is only emulated.
    Weights an optimizer updates stay float32 under autocast (`master_dtype`)."""
    from corral.models.load import cpu_bf16_native, native_bf16

    if not torch.cuda.is_available():
        return "bf16" if dtype in ("auto", "float32", "bfloat16") and cpu_bf16_native() else "no"
    if dtype == "float16":
        return "fp16"
    return "bf16" if native_bf16() else "fp16"


def precision_info(accelerator, modules: Iterable[torch.nn.Module]) -> dict:
    """What a run computes and stores in, for its log, metrics.jsonl and summary: the autocast (`mixed_precision`),
    the dtypes of the trained and of the frozen weights of `modules`, and on CPU whether it computes bf16
    natively (what `auto` went by)."""
    from corral.models.load import cpu_bf16_native

    trained: set[str] = set()
    frozen: set[str] = set()
    for module in modules:
        for param in module.parameters():
            (trained if param.requires_grad else frozen).add(str(param.dtype).removeprefix("torch."))
    info = {"mixed_precision": str(accelerator.mixed_precision), "device": accelerator.device.type,
            "trained_weights": ",".join(sorted(trained)) or None, "frozen_weights": ",".join(sorted(frozen)) or None}
    if accelerator.device.type == "cpu":
        info["cpu_bf16_native"] = cpu_bf16_native()
    return info


def describe_precision(info: dict) -> str:
    """One line for the run's start: `precision: bf16 autocast; trained weights float32, frozen bfloat16 (...)`."""
    compute = {"no": "float32 (no autocast)", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
    line = f"precision: {compute.get(info['mixed_precision'], info['mixed_precision'])}"
    line += f"; trained weights {info['trained_weights']}"
    if info["frozen_weights"]:
        line += f", frozen {info['frozen_weights']}"
    if "cpu_bf16_native" in info:
        line += f" (CPU {'computes' if info['cpu_bf16_native'] else 'does not compute'} bf16 natively"
        line += "; CORRAL_CPU_BF16=0|1 or train.mixed_precision=no|bf16 overrides)"
    return line


def make_accelerator(mixed_precision: str = "auto", dtype: str = "auto"):
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = auto_mixed_precision(dtype)
    _forget_other_precision(mixed_precision)
    # cpu=True on a machine without CUDA: accelerate then sets up multi-process CPU runs (gloo) when
    # launched with several processes; without it each process would think it runs alone.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one state per process and refuses an Accelerator of another mixed precision after the
    first. One process running several recipes one after another (the pipeline's stages, tests, a notebook) may
    ask for different ones (a stage with train.mixed_precision=no after an `auto` one that picked bf16): a
    single-process run's state is dropped and made again. Several processes keep theirs (and accelerate's error):
    their state holds the process group."""
    from accelerate.state import AcceleratorState, PartialState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def weights_sharded(accelerator) -> bool:
    """FSDP and DeepSpeed: each process holds a share of the weights (ZeRO-1/2: of their optimizer state and
    gradients); `save_state` / `load_state` save and restore the prepared model themselves."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def configure_deepspeed(plugin, *, micro_batch: int, grad_accum: int, max_grad_norm: float, world: int) -> dict:
    """Fill the DeepSpeed config from Corral's own settings, before `prepare`: accelerate reads
    `train_micro_batch_size_per_gpu` from a prepared DataLoader, which Corral never hands it (its loop picks rows
    by step), and would refuse the `auto` the shipped configs leave; DeepSpeed runs its optimizer step every
    `gradient_accumulation_steps` backwards and clips to `gradient_clipping`, so both must be ours
    (`train.grad_accum`, `max_grad_norm`, 0: no clipping). Returns the config, changed in place."""
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = micro_batch * grad_accum * world
    config["gradient_clipping"] = float(max_grad_norm)
    plugin.gradient_accumulation_steps = grad_accum
    return config


def _sub_state(full: dict, root: torch.nn.Module, sub: torch.nn.Module) -> dict:
    """The entries of `root`'s state dict that belong to its submodule `sub`, named as `sub` names them."""
    if sub is root:
        return full
    prefix = next(name for name, module in root.named_modules() if module is sub) + "."
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


@dataclass
class Trained:
    """One trained module with its optimizer, schedule and clipping. `model` is the prepared (wrapped) module."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    max_grad_norm: float
    write: Callable  # write(module, folder[, state_dict=...]): the module's standard folder (adapter or full model)
    pick: Callable[[torch.nn.Module], torch.nn.Module]  # the module inside the unwrapped model that is saved
    accelerator: object = field(repr=False)
    params: list = field(default_factory=list, repr=False)

    def step(self) -> torch.Tensor:
        """Clip the gradient norm (0: no clipping), step the optimizer and the schedule, zero the gradients.
        Returns the gradient norm before clipping, as a tensor: reading it syncs with the GPU, so callers read it
        only when they log."""
        accelerator = self.accelerator
        if weights_sharded(accelerator):
            # FSDP: the norm of the sharded gradients (a DTensor, reduced over the processes); clipping at inf
            # multiplies by exactly 1. DeepSpeed clips in its own step (`gradient_clipping`) and reports its norm.
            norm = accelerator.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            else:
                norm = torch.tensor(float("nan") if norm is None else norm)
        elif self.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            accelerator.unscale_gradients(self.optimizer)  # fp16: the loss scale out of the norm (a no-op otherwise)
            grads = [p.grad.norm() for p in self.params if p.grad is not None]
            norm = torch.norm(torch.stack(grads)) if grads else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_to(self, folder: Path) -> None:
        """Write the module's standard folder. Every process calls it: under FSDP / DeepSpeed the full weights are
        gathered from all of them first (`accelerator.get_state_dict`); the main process writes."""
        from corral.models.forward import unwrap

        unwrapped = unwrap(self.model)
        module = self.pick(unwrapped)
        state = None
        if weights_sharded(self.accelerator):
            state = _sub_state(self.accelerator.get_state_dict(self.model), unwrapped, module)
        if self.accelerator.is_main_process and state is None:
            self.write(module, folder)
        elif self.accelerator.is_main_process:
            self.write(module, folder, state_dict=state)

    def load_from(self, folder: Path) -> None:
        """Read the module's folder back into it, in place. Under FSDP / DeepSpeed accelerate's `load_state` restores
        the sharded weights (a full safetensors file cannot be copied into a process's shard)."""
        from corral.models.forward import unwrap

        if not weights_sharded(self.accelerator):
            ckpt.load_weights(self.pick(unwrap(self.model)), folder)


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
        self.precision: dict = {}  # precision_info, set by resume()

    def add(self, name: str, model: torch.nn.Module, *, save: Callable[[torch.nn.Module, Path], None],
            total_steps: int, optimizer: str, lr: float, weight_decay: float, betas: tuple[float, float],
            schedule: str, warmup_ratio: float, max_grad_norm: float, micro_batch: int = 1, grad_accum: int = 1,
            weights: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Trained:
        """Optimizer and schedule for `model` (its trainable parameters), prepared by accelerate. The first module
        added is the checkpoint's `model/`, later ones go beside it under their `name`. `total_steps` counts this
        module's optimizer steps (the schedule's length; warmup is `warmup_ratio` of them). `micro_batch` rows per
        backward and `grad_accum` backwards per optimizer step tell accelerate (and DeepSpeed) how the recipe steps.
        `weights(unwrapped)` picks the module whose folder is saved and loaded (PPO's critic saves the model inside
        its wrapper)."""
        from accelerate.utils import DistributedType

        accelerator = self.accelerator
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            if self.trained:
                raise ValueError("DeepSpeed trains one model per run (accelerate prepares one model per DeepSpeed "
                                 "engine); this recipe trains several: run it with DDP (accelerate launch --multi_gpu)")
            configure_deepspeed(accelerator.state.deepspeed_plugin, micro_batch=micro_batch, grad_accum=grad_accum,
                                max_grad_norm=max_grad_norm, world=accelerator.num_processes)
        # accelerate.accumulate() syncs gradients (and DeepSpeed steps) on every grad_accum-th backward.
        accelerator.gradient_accumulation_steps = grad_accum
        opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay, betas)
        scheduler = make_scheduler(opt, schedule, round(warmup_ratio * total_steps), total_steps)
        model, opt = accelerator.prepare(model, opt)
        # The scheduler is stepped by hand once per optimizer step (accelerate would step it once per process).
        accelerator.register_for_checkpointing(scheduler)
        trained = Trained(
            name if self.trained else "model", model, opt, scheduler, max_grad_norm, write=save,
            pick=weights or (lambda m: m), accelerator=accelerator,
            params=[p for p in model.parameters() if p.requires_grad],
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
                trained.load_from(self.resumed_from / trained.name)
            self.accelerator.load_state(str(self.resumed_from / "trainer_state"))
            start = ckpt.read_state(self.resumed_from)["step"]
            if self.accelerator.is_main_process:
                print(f"resumed from {self.resumed_from} at step {start}")
        self.precision = precision_info(self.accelerator, [t.model for t in self.trained])
        if self.accelerator.is_main_process:
            print(describe_precision(self.precision))
        # The first record this run logs carries the precision (a record of its own would look like a step).
        self.metrics = MetricsLog(self.output_dir, resume_step=start, enabled=self.accelerator.is_main_process,
                                  report_to=self.report_to, config=self.config,
                                  first_record={"precision": self.precision})  # fmt: skip
        return start

    def checkpoint(self, step: int, state: dict | None = None) -> Path:
        """An atomic `checkpoints/step-N` folder with every module's standard folder and the trainer state.
        Every process calls it."""
        return ckpt.save_checkpoint(self.accelerator, step, self.output_dir,
                                    {t.name: t.save_to for t in self.trained}, state or {}, self.save_total_limit)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
