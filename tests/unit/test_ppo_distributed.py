"""PPO's checkpoints and processes: a run hard-killed while checkpointing resumes to the very same steps and
weights (actor, critic, EMA, KL controller, optimizers, RNG, prompt position), and 2 processes (gloo) compute
what 1 process computes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_distributed import free_port
from tests.unit.test_resume import KILLER

# Left out of the comparisons: timings, and the precision a run's first record carries (a resumed run's first
# record is the step after its checkpoint, so it carries it there).
TIMING = {"gen_s", "train_s", "gen_tok_s", "train_tok_s", "precision"}


def ppo_args(model_dir, out, **overrides):
    settings = {"model": model_dir, "reward": "tests.unit.test_ppo_recipe:vowel_share", "output_dir": out,
                "template": "chatml", "data.path": "builtin:corral_identity", "advantage": "gae", "steps": 6,
                "train.save_every": 3, "rollout.prompts_per_step": 4, "update.minibatch": 2, "update.epochs": 2, "rollout.max_new_tokens": 8,
                "actor.lr": 5e-3, "critic.lr": 5e-3, "lora.dropout": 0.1, "actor.ema_decay": 0.9, "kl.target": 0.5,
                "ptx.path": "builtin:corral_identity", "ptx.coef": 0.1, "ptx.batch": 2, **overrides}  # fmt: skip
    return ["ppo", *(f"{k}={v}" for k, v in settings.items())]


def metrics(out) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def weights(folder):
    return load_file(next(folder.glob("*.safetensors")))


def test_hard_kill_and_resume_gives_the_same_steps(tiny_model_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = subprocess.run([sys.executable, "-m", "corral.cli", *ppo_args(tiny_model_dir, straight)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    killed = subprocess.run([sys.executable, "-c", KILLER, "6", *ppo_args(tiny_model_dir, resumed)],
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(metrics(resumed)) == [1, 2, 3, 4, 5, 6]  # it had logged steps past its last checkpoint
    assert not (resumed / "actor").exists()

    again = subprocess.run([sys.executable, "-m", "corral.cli", *ppo_args(tiny_model_dir, resumed)],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step-000003" in again.stdout
    first, second = metrics(straight), metrics(resumed)
    assert second == first  # every figure of every step: rewards, KL and its coefficient, losses, ptx, values
    assert "value_loss" in first[6]
    # The adaptive KL coefficient each step ran with: from 0.05, coef *= 1 + clip(kl / 0.5 - 1, -0.2, 0.2) * 4 / 10000
    # after each step (4 samples a step, horizon 10000), with that step's logged KL.
    coef = 0.05
    for step in range(1, 7):
        assert first[step]["kl_coef"] == pytest.approx(coef, rel=1e-12, abs=0), step
        coef *= 1 + min(max(first[step]["kl"] / 0.5 - 1, -0.2), 0.2) * 4 / 10000
    for folder in ("actor", "actor_ema", "checkpoints/step-000006/critic"):
        a, b = weights(straight / folder), weights(resumed / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    # The replies written for people to read: the killed run's lines after step 3 were dropped, not doubled.
    assert (resumed / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
@pytest.mark.parametrize("update", [{"update.minibatch": 2, "update.epochs": 2}, {"update.minibatch": 4, "update.epochs": 1}],
                         ids=["several-minibatches", "on-policy"])  # on-policy: old log-probs from the update's forward
def test_two_processes_compute_the_one_process_update(tiny_model_dir, tmp_path, update):
    common = {"steps": 3, "train.save_every": 0, "lora.dropout": 0.0, "train.resume": "never", **update}
    single = subprocess.run([sys.executable, "-m", "corral.cli", *ppo_args(tiny_model_dir, tmp_path / "one", **common)],
                            capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "corral.cli"]  # fmt: skip
    multi = subprocess.run([*launch, *ppo_args(tiny_model_dir, tmp_path / "two", **common)], capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "world size 2" in multi.stdout
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert one[step].keys() == two[step].keys()
        for key in one[step]:
            # A clip fraction counts tokens past a threshold: float rounding may move one token of a mini-batch.
            tolerance = 1 / 32 if key.endswith("clip_frac") else 1e-5
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-3, abs=tolerance), (step, key)
    a, b = weights(tmp_path / "one" / "actor"), weights(tmp_path / "two" / "actor")
    # Adam divides by the gradient's own scale, so float-rounding differences in tiny gradients show at ~1e-5.
    assert all(torch.allclose(a[k], b[k], atol=2e-4) for k in a)
    lora_b = [v for k, v in a.items() if "lora_B" in k]
    assert len(lora_b) == 7 * 2 and all(v.abs().sum() > 0 for v in lora_b)  # every adapter (zero at the start) trained
