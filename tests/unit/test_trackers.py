"""`train.report_to`: MetricsLog forwards each metrics line to accelerate's trackers, read back from their files."""

from __future__ import annotations

import glob
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from corral.config import SFTConfig, TrainConfig
from corral.train.metrics import MetricsLog, TrackerUnavailable, check_trackers, flatten_config

# Exact in float32 (TensorBoard stores scalars as float32), so they compare with ==.
RECORDS = [
    {"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.75, "target_tokens": 96, "note": "text", "ok": True},
    {"step": 2, "loss": 2.25, "lr": 2e-4, "grad_norm": 0.5, "target_tokens": 80},
    {"step": 3, "loss": 1.875, "lr": 3e-4, "grad_norm": 0.25, "target_tokens": 88},
    {"step": 3, "eval_loss": 1.5},
]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    return float(np.float32(x))


def test_report_to_config_takes_one_name_a_list_or_none():
    assert TrainConfig().report_to == []
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert TrainConfig(report_to=["wandb", "trackio"]).report_to == ["wandb", "trackio"]
    assert TrainConfig(report_to="none").report_to == []
    with pytest.raises(ValueError, match="tensorboard"):
        TrainConfig(report_to="mlflow")
    assert SFTConfig.model_validate({"train": {"report_to": "tensorboard"}}).train.report_to == ["tensorboard"]


def test_tensorboard_gets_every_numeric_value_at_its_step(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install -e '.[test]'")
    config = {"model": "tiny", "train": {"lr": 1e-4, "betas": (0.9, 0.99), "report_to": ["tensorboard"]}}
    with MetricsLog(tmp_path, report_to="tensorboard", config=config) as metrics:
        for record in RECORDS:
            metrics.log(record)
    # metrics.jsonl is still the full record, text and all.
    assert metrics.read() == RECORDS
    logged = scalars(tmp_path / "tensorboard")
    # Numbers only: the text `note`, the boolean `ok` and `step` itself are not scalars.
    assert set(logged) == {"loss", "lr", "grad_norm", "target_tokens", "eval_loss"}
    assert logged["loss"] == [(1, 2.5), (2, 2.25), (3, 1.875)]
    assert logged["eval_loss"] == [(3, 1.5)]
    assert logged["grad_norm"] == [(1, 0.75), (2, 0.5), (3, 0.25)]
    assert logged["target_tokens"] == [(1, 96.0), (2, 80.0), (3, 88.0)]
    assert logged["lr"] == [(1, f32(1e-4)), (2, f32(2e-4)), (3, f32(3e-4))]
    # accelerate's layout: the hyperparameters as CLI keys in a hparams.yml beside the events.
    (hparams,) = (tmp_path / "tensorboard").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text()) == {
        "model": "tiny", "train.lr": 1e-4, "train.betas": "(0.9, 0.99)", "train.report_to": "['tensorboard']"}


def test_resumed_run_replaces_the_redone_steps_in_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install -e '.[test]'")
    with MetricsLog(tmp_path, report_to=["tensorboard"]) as metrics:
        for step, loss in [(1, 4.0), (2, 3.5), (3, 3.0), (4, 2.5)]:
            metrics.log({"step": step, "loss": loss})
    # Crashed after a checkpoint at step 2: steps 3 and 4 are trained again, with other losses.
    with MetricsLog(tmp_path, resume_step=2, report_to=["tensorboard"]) as metrics:
        for step, loss in [(3, 2.75), (4, 2.25)]:
            metrics.log({"step": step, "loss": loss})
    assert [(r["step"], r["loss"]) for r in metrics.read()] == [(1, 4.0), (2, 3.5), (3, 2.75), (4, 2.25)]
    assert scalars(tmp_path / "tensorboard")["loss"] == [(1, 4.0), (2, 3.5), (3, 2.75), (4, 2.25)]


def test_missing_package_is_a_clear_error_at_construction(tmp_path, monkeypatch):
    # Neither torch's writer (which needs the tensorboard package) nor tensorboardX can be imported.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    for enabled in (True, False):  # every process stops, not only the main one
        with pytest.raises(TrackerUnavailable, match=r"report_to=tensorboard needs the tensorboard package: "
                                                     r"pip install tensorboard"):
            MetricsLog(tmp_path, enabled=enabled, report_to=["tensorboard"])
    assert not (tmp_path / "metrics.jsonl").exists()  # raised before anything was written
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        check_trackers("wandb")
    with pytest.raises(ValueError, match="pip install wandb"):  # the CLI prints ValueErrors without a traceback
        check_trackers(["wandb"])
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        check_trackers(["mlflow"])


def test_disabled_log_and_no_trackers_stay_as_before(tmp_path):
    quiet = MetricsLog(tmp_path / "other", enabled=False, report_to=["tensorboard"] if _has("tensorboard") else [])
    quiet.log({"step": 1, "loss": 1.0})
    quiet.close()
    assert not (tmp_path / "other").exists() and quiet.trackers == []
    plain = MetricsLog(tmp_path)  # the old signature
    plain.log({"step": 1, "loss": 1.0})
    assert plain.trackers == [] and plain.read() == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


def test_trackio_gets_project_run_config_and_values(tmp_path, monkeypatch):
    # trackio is not installed here (it pins other versions of shared packages): a stand-in module records what
    # accelerate's TrackioTracker hands it.
    calls = []

    class Run:
        def log(self, values, step=None):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("trackio")
    fake.init = lambda project, **kwargs: calls.append(("init", project, kwargs)) or Run()
    fake.config = types.SimpleNamespace(update=lambda values, **kw: calls.append(("config", values)))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    metrics = MetricsLog(tmp_path / "runs" / "sft", report_to="trackio", config={"train": {"lr": 0.5}})
    for record in RECORDS[:2]:
        metrics.log(record)
    metrics.close()
    metrics.close()  # finishing twice is harmless
    assert calls == [
        ("init", "corral", {"name": "sft"}),
        ("config", {"train.lr": 0.5}),
        ("log", {"loss": 2.5, "lr": 1e-4, "grad_norm": 0.75, "target_tokens": 96}, 1),
        ("log", {"loss": 2.25, "lr": 2e-4, "grad_norm": 0.5, "target_tokens": 80}, 2),
        ("finish",),
    ]


def test_wandb_runs_offline_without_credentials(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (not a test dependency): pip install 'corral[track]'")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_IDENTITY_TOKEN_FILE",
                "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out = tmp_path / "run"
    metrics = MetricsLog(out, report_to=["wandb"], run_name="tiny-sft", config={"train": {"lr": 1e-4}})
    (tracker,) = metrics.trackers
    assert tracker.run.offline and tracker.run.project == "corral" and tracker.run.name == "tiny-sft"
    assert Path(tracker.run.dir).is_relative_to(out / "wandb")
    assert dict(tracker.run.config) == {"train.lr": 1e-4}
    for record in RECORDS:
        metrics.log(record)
    metrics.close()
    # The offline run is on disk, ready for `wandb sync`. (Its history is written by wandb's own service process,
    # after finish returns, so the file's records are not read back here: that made the test flaky.)
    assert glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))


def test_wandb_mode_follows_the_environment(tmp_path, monkeypatch):
    from corral.train.metrics import _make_tracker, wandb_api_key_configured

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_IDENTITY_TOKEN_FILE",
                "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not wandb_api_key_configured()  # no netrc file at all
    netrc_file.write_text("machine example.org login user password other\n")
    assert not wandb_api_key_configured()
    netrc_file.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")  # what `wandb login` writes
    assert wandb_api_key_configured()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a self-hosted server: its own entry
    assert not wandb_api_key_configured()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert wandb_api_key_configured()

    def init_kwargs():  # what accelerate's WandBTracker will pass to wandb.init (nothing is started here)
        tracker = _make_tracker("wandb", tmp_path / "run", "tiny", 0)
        return tracker.run_name, tracker.init_kwargs

    assert init_kwargs() == ("corral", {"name": "tiny", "dir": str(tmp_path / "run")})  # a key: online
    monkeypatch.delenv("WANDB_API_KEY")
    assert init_kwargs()[1]["mode"] == "offline"  # no key: offline, not a login prompt
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's explicit choice wins
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert init_kwargs() == ("mine", {"name": "tiny"})


def test_flatten_config_uses_cli_keys():
    assert flatten_config({"a": {"b": {"c": 1}}, "d": [1, 2], "e": None, "f": True}) == {
        "a.b.c": 1, "d": "[1, 2]", "e": None, "f": True}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("recipe", ["sft", "ppo"])
def test_a_recipe_reports_its_metrics_to_tensorboard(recipe, tmp_path, tiny_model_dir):
    """`train.report_to` reaches the trackers through the shared harness, for the loop's recipes and PPO alike:
    every step's loss (PPO: reward and KL) in the event file equals metrics.jsonl's, at float32."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install -e '.[test]'")
    from corral.atomic import read_jsonl
    from corral.config import PPOConfig

    if recipe == "sft":
        from corral.recipes.sft import run

        cfg = SFTConfig(model=str(tiny_model_dir), template="chatml", output_dir=str(tmp_path), data={"path": "builtin:corral_identity"},
                        train={"max_steps": 2, "batch_size": 2, "max_len": 64, "resume": "never", "report_to": "tensorboard"})  # fmt: skip
        keys = ["loss", "grad_norm", "lr"]
    else:
        from corral.recipes.ppo import run

        cfg = PPOConfig(model=str(tiny_model_dir), template="chatml", reward="tests.golden.cases:vowel_share",
                        output_dir=str(tmp_path), advantage="rloo", steps=2, data={"path": "builtin:corral_identity"},
                        rollout={"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4},
                        train={"report_to": ["tensorboard"], "resume": "never"})  # fmt: skip
        keys = ["reward_mean", "kl", "policy_loss", "lr"]
    run(cfg)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    logged = scalars(tmp_path / "tensorboard")
    for key in keys:
        assert logged[key] == [(r["step"], f32(r[key])) for r in rows if key in r], key
