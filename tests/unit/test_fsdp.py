"""SFT under FSDP2 through accelerate's FSDP plugin and the shipped corral/configs/accelerate_fsdp.yaml: 2 gloo
processes on CPU compute the one-process update (full and LoRA), a run hard-killed while checkpointing resumes to
the very same losses, and the saved model/ loads with plain transformers / peft.

accelerate 1.15 selects FSDP only for GPU-like distributed types: `AcceleratorState` reaches its FSDP branch for
MULTI_GPU, MULTI_XPU, MULTI_NPU... but never MULTI_CPU, so on a CPU the FSDP config silently runs DDP. torch's FSDP2
itself runs on CPU with gloo. `LAUNCHER` below sets the distributed type to FSDP after accelerate's own setup;
everything after it (fsdp2_prepare_model, clip_grad_norm_, get_state_dict, save_state / load_state of the sharded
model and optimizer) is accelerate's and torch's own code. On a GPU machine the last test runs the shipped config as
it is, over the GPUs present (scripts/gpu_check.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tests.unit.test_distributed import free_port

ROOT = Path(__file__).resolve().parents[2]

LAUNCHER = textwrap.dedent("""
    import os, signal, sys
    import accelerate.state as state
    from accelerate.utils import DistributedType

    setup = state.AcceleratorState.__init__
    def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        setup(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.AcceleratorState.__init__ = fsdp_on_cpu

    import corral.train.checkpoint as ck
    from corral.cli import main
    kill_at, save = int(os.environ.get("CORRAL_KILL_AT", "0")), ck.save_checkpoint
    def save_or_die(accelerator, step, *args, **kwargs):
        if step == kill_at:  # hard-killed on its way into the checkpoint of step kill_at, steps logged before
            os.kill(os.getpid(), signal.SIGKILL)
        return save(accelerator, step, *args, **kwargs)
    ck.save_checkpoint = save_or_die
    sys.exit(main(sys.argv[1:]))
""")

needs_accelerate = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")


def sft_args(model_dir, out, method: str, batch_size: int, **train) -> list[str]:
    settings = {"model": model_dir, "template": "chatml", "data.path": "builtin:corral_identity", "output_dir": out,
                "method": method, "lora.dropout": 0.0, "train.batch_size": batch_size, "train.max_len": 128,
                "train.lr": 5e-3, **{f"train.{k}": v for k, v in train.items()}}  # fmt: skip
    return ["sft", *(f"{k}={v}" for k, v in settings.items())]


def cpu_fsdp_config(tmp_path: Path) -> Path:
    """The shipped FSDP config, on 2 CPU processes without mixed precision (what CPU can run)."""
    config = yaml.safe_load((ROOT / "corral" / "configs" / "accelerate_fsdp.yaml").read_text())
    config |= {"num_processes": 2, "mixed_precision": "no", "use_cpu": True}
    path = tmp_path / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, script: Path, args: list[str], kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CORRAL_KILL_AT": str(kill_at)}
    command = ["accelerate", "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
               str(script), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


def one_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral.cli", *args], capture_output=True, text=True, cwd=ROOT)


def losses(out: Path) -> dict[int, float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture
def launcher(tmp_path) -> Path:
    path = tmp_path / "fsdp_launcher.py"
    path.write_text(LAUNCHER)
    return path


@needs_accelerate
def test_fsdp_full_finetune_matches_one_process_and_resumes_after_sigkill(tiny_model_dir, tmp_path, launcher):
    from transformers import AutoModelForCausalLM

    config, fsdp_out, one_out = cpu_fsdp_config(tmp_path), tmp_path / "fsdp", tmp_path / "one"
    steps = {"max_steps": 4, "save_every": 2}
    one = one_process(sft_args(tiny_model_dir, one_out, "full", 4, resume="never", **steps))
    assert one.returncode == 0, one.stderr[-3000:]
    killed = launch(config, launcher, sft_args(tiny_model_dir, fsdp_out, "full", 2, **steps), kill_at=4)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr + killed.stdout, killed.stderr[-3000:]
    straight = losses(fsdp_out)  # it logged every step before dying in the last checkpoint
    assert sorted(straight) == [1, 2, 3, 4] and not (fsdp_out / "model").exists()
    assert "world size 2" in killed.stdout  # two processes, the global batch of one process x 4 rows
    # The first process wrote the full model/; every process its own shard of the model and optimizer (the shipped
    # config's SHARDED_STATE_DICT), which resume reads.
    step2 = fsdp_out / "checkpoints" / "step-000002"
    assert (step2 / "model" / "model.safetensors").is_file()
    assert {p.name for p in (step2 / "trainer_state" / "pytorch_model_fsdp_0").glob("*.distcp")} == {
        "__0_0.distcp", "__1_0.distcp"}  # fmt: skip

    resumed = launch(config, launcher, sft_args(tiny_model_dir, fsdp_out, "full", 2, **steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-000002" in resumed.stdout
    assert losses(fsdp_out) == straight  # steps 3 and 4 again, bit for bit
    assert list(straight.values()) == pytest.approx(list(losses(one_out).values()), abs=1e-5)
    # model/ is a standard folder: plain transformers loads it, with the weights one process trained.
    mine = AutoModelForCausalLM.from_pretrained(fsdp_out / "model").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(one_out / "model").state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-4) for k in mine)  # Adam amplifies float rounding


@needs_accelerate
def test_fsdp_lora_matches_one_process_and_saves_the_adapter_alone(tiny_model_dir, tmp_path, launcher):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fsdp_out, one_out = tmp_path / "fsdp", tmp_path / "one"
    one = one_process(sft_args(tiny_model_dir, one_out, "lora", 4, max_steps=3, resume="never"))
    assert one.returncode == 0, one.stderr[-3000:]
    run = launch(cpu_fsdp_config(tmp_path), launcher, sft_args(tiny_model_dir, fsdp_out, "lora", 2, max_steps=3,
                                                               resume="never"))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(losses(fsdp_out).values()) == pytest.approx(list(losses(one_out).values()), abs=1e-5)
    mine, theirs = (load_file(out / "model" / "adapter_model.safetensors") for out in (fsdp_out, one_out))
    assert mine.keys() == theirs.keys() and all(".lora_A." in k or ".lora_B." in k for k in mine)
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-4) for k in mine)
    assert all(v.abs().sum() > 0 for k, v in mine.items() if ".lora_B." in k)  # trained off B's zero start
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), fsdp_out / "model")  # plain peft


@needs_accelerate
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the shipped FSDP config as it is needs CUDA GPUs")
def test_fsdp_on_the_gpus_present(tiny_model_dir, tmp_path):
    """scripts/gpu_check.sh: the shipped config (bf16) over every GPU here, against one process with the same global
    batch (bf16 autocast on both sides: close, not equal), then a resume from its checkpoint."""
    from transformers import AutoModelForCausalLM

    gpus = torch.cuda.device_count()
    shipped = yaml.safe_load((ROOT / "corral" / "configs" / "accelerate_fsdp.yaml").read_text())
    config = shipped | {"num_processes": gpus}
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom corral.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    fsdp_out, one_out = tmp_path / "fsdp", tmp_path / "one"
    one = one_process(sft_args(tiny_model_dir, one_out, "full", 2 * gpus, max_steps=2, resume="never"))
    assert one.returncode == 0, one.stderr[-3000:]
    args = sft_args(tiny_model_dir, fsdp_out, "full", 2, max_steps=2, save_every=1)
    run = launch(tmp_path / "fsdp.yaml", script, args)
    assert run.returncode == 0, run.stderr[-3000:]
    first = losses(fsdp_out)
    assert list(first.values()) == pytest.approx(list(losses(one_out).values()), rel=2e-2)
    AutoModelForCausalLM.from_pretrained(fsdp_out / "model")
    shutil.rmtree(fsdp_out / "checkpoints" / "step-000002")  # resume from step 1's sharded state
    again = launch(tmp_path / "fsdp.yaml", script, args)
    assert again.returncode == 0 and "step-000001" in again.stdout, again.stderr[-3000:]
    assert losses(fsdp_out)[2] == pytest.approx(first[2], rel=1e-3)
