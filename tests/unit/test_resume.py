"""Resume equals an uninterrupted run: 10 steps straight vs 5 + SIGKILL mid-save + resume to 10."""

import json
import signal
import subprocess
import sys
import textwrap

# Runs `corral sft` in a child process and hard-kills it (SIGKILL, no cleanup) while it writes the
# checkpoint of step KILL_AT, after it has already logged steps past the last complete checkpoint.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import corral.train.checkpoint as ck
    from corral.cli import main
    kill_at = int(sys.argv[1])
    original = ck.save_checkpoint
    def save_then_maybe_die(accelerator, step, output_dir, *args, **kwargs):
        if step == kill_at:
            staging = ck.checkpoints_dir(output_dir) / f"step-{step:06d}.tmp"
            staging.mkdir(parents=True, exist_ok=True)
            (staging / "half-written").write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(accelerator, step, output_dir, *args, **kwargs)
    ck.save_checkpoint = save_then_maybe_die
    sys.exit(main(sys.argv[2:]))
""")


def sft_args(model_dir, out):
    return ["sft", f"model={model_dir}", "template=chatml", "data.path=builtin:corral_identity", f"output_dir={out}",
            "method=lora", "lora.dropout=0.1", "train.max_steps=10", "train.save_every=5", "train.batch_size=2",
            "train.max_len=128", "train.lr=5e-3", "data.pack=false"]  # fmt: skip


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_hard_kill_and_resume_gives_identical_losses(tiny_model_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = subprocess.run([sys.executable, "-m", "corral.cli", *sft_args(tiny_model_dir, straight)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = subprocess.run([sys.executable, "-c", KILLER, "10", *sft_args(tiny_model_dir, resumed)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(losses(resumed)) == list(range(1, 11))  # it had logged steps 6-10 before dying
    assert (resumed / "checkpoints" / "step-000010.tmp").exists()
    assert not (resumed / "checkpoints" / "step-000010").exists()

    again = subprocess.run([sys.executable, "-m", "corral.cli", *sft_args(tiny_model_dir, resumed)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "step-000005" in again.stdout
    assert losses(resumed) == losses(straight)  # every step, bit for bit
    assert (resumed / "checkpoints" / "step-000010").is_dir()
    assert not (resumed / "checkpoints" / "step-000010.tmp").exists()
