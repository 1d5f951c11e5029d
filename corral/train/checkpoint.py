"""The one checkpoint writer: atomic step folders, standard model files, our state beside them.

    output_dir/checkpoints/step-000010/
        model/           peft adapter folder or full HF safetensors folder (+ tokenizer)
        trainer_state/   accelerate state (optimizer, scheduler, RNG of every process) + state.json

A checkpoint is written to `step-N.tmp` by every process, then renamed by the main process: a
folder named `step-N` is always complete. `resume: auto` picks the newest one. Under FSDP and DeepSpeed,
`trainer_state/` also holds accelerate's sharded copy of the model (which resume reads), and `model/` is
written from the weights gathered from every process.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

from corral.atomic import atomic_write_text, replace_dir

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / "trainer_state" / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "trainer_state" / "state.json").is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete Corral checkpoint (no trainer_state/state.json)")
    return path


def install_state_hooks(accelerator) -> None:
    """Model weights live in the standard `model/` folder; keep accelerate from writing a second copy. (FSDP and
    DeepSpeed save and load the model in `save_state` / `load_state` whatever these hooks say: there the sharded
    copy in `trainer_state/` is the one resume reads.)"""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def save_checkpoint(accelerator, step: int, output_dir: str | Path, folders: dict[str, Callable[[Path], None]],
                    state: dict, keep: int) -> Path:
    """`checkpoints/step-N`: each of `folders` (name -> writer of a standard model folder: `model`, PPO's
    `critic`; called on every process, it gathers sharded weights and writes on the main process), and
    `trainer_state/` by every process (its own RNG state). The folder is complete before it takes the name
    `step-N`; an existing one is replaced without a moment with neither (`replace_dir`). Only the newest `keep`
    checkpoints stay."""
    final = checkpoints_dir(output_dir) / f"step-{step:06d}"
    staging = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    for name, write in folders.items():
        write(staging / name)
    accelerator.save_state(str(staging / "trainer_state"))  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(staging / "trainer_state" / "state.json", json.dumps({"step": step, **state}, indent=1))
        replace_dir(staging, final)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state" / "state.json").read_text())


def load_weights(model, folder: Path) -> None:
    """Load `folder` (written by save_model) into the (unwrapped) model in place."""
    from safetensors.torch import load_file

    from corral.models.adapters import is_adapter

    if is_adapter(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights to resume from")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed_tokens" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{folder}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    if tied:
        model.tie_weights()
