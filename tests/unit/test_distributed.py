"""The loop under `accelerate launch` with 2 CPU processes (gloo) matches 1 process with the same global batch."""

import json
import shutil
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(model_dir, out, batch_size):
    return ["sft", f"model={model_dir}", "template=chatml", "data.path=builtin:corral_identity", f"output_dir={out}",
            "method=full", "train.max_steps=4", f"train.batch_size={batch_size}", "train.grad_accum=2",
            "train.max_len=128", "train.lr=1e-3", "train.resume=never"]  # fmt: skip


def step_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_two_processes_match_one_with_same_global_batch(tiny_model_dir, tmp_path):
    single = subprocess.run([sys.executable, "-m", "corral.cli", *args(tiny_model_dir, tmp_path / "one", 4)],
                            capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    # `--multi_gpu` is accelerate's multi-process launcher (torchrun); without GPUs it runs MULTI_CPU on gloo.
    # (`--cpu --num_processes 2` would silently start a single process.)
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "corral.cli"]  # fmt: skip
    multi = subprocess.run([*launch, *args(tiny_model_dir, tmp_path / "two", 2)], capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert "world size 2" in multi.stdout  # really two processes
    assert two == pytest.approx(one, abs=1e-5)
    # Both wrote one standard model folder, loadable without Corral, holding the same trained weights: full
    # fine-tuning moved every tensor off the start, and the two processes moved it where one process did.
    import torch
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    one_w = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    two_w = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    assert one_w.keys() == two_w.keys() == start.keys()
    assert [k for k in start if torch.equal(one_w[k], start[k])] == []
    # Adam divides by each gradient's own scale: float-rounding differences in tiny gradients show (~1e-5 here).
    assert all(torch.allclose(two_w[k], one_w[k], atol=1e-4) for k in start)
