"""The CLI: commands listed, configs validated with the key named, resolved config printed and saved."""

import subprocess
import sys

import pytest
import yaml

from corral.cli import COMMANDS, main
from corral.config import ConfigError, SFTConfig, load_config, parse_value


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, cmd in COMMANDS.items():
        assert name in out and cmd.help in out


def test_command_help_lists_config_keys(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("model", "template", "data.path", "output_dir", "train.max_steps", "train.epochs", "train.lr",
                "train.batch_size", "train.grad_accum", "train.max_len", "train.save_every", "train.resume", "lora.r"):
        assert f"  {key} = " in out, key


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.lr=abc"], "train.lr: Input should be a valid number"),
        (["train.nope=1"], "train.nope: unknown key"),
        (["--lora.rank", "8"], "lora.rank: unknown key"),
        (["method=dora"], "method: Input should be"),
        (["--config", "missing.yaml"], "cannot read config file missing.yaml"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(args, message, capsys):
    assert main(["sft", *args]) == 2
    assert message in capsys.readouterr().err


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.1, "batch_size": 3}, "data": {"path": "x.jsonl"}}))
    cfg = load_config(SFTConfig, path, {"train.lr": parse_value("1e-4"), "lora.target_modules": parse_value("[q_proj, v_proj]")})
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 3 and cfg.data.path == "x.jsonl"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(SFTConfig, path, {"train.batch_size": 0})


def test_shipped_configs_are_valid():
    from corral.cli import resolve_config_path

    from corral.config import DPOConfig, RewardConfig

    for name, cls in [("sft_lora.yaml", SFTConfig), ("sft_full.yaml", SFTConfig), ("sft_qlora.yaml", SFTConfig),
                      ("sft_prefix.yaml", SFTConfig), ("reward_lora.yaml", RewardConfig), ("dpo_lora.yaml", DPOConfig)]:
        cfg = load_config(cls, resolve_config_path(name))
        assert cfg.model == "smollm2-135m"


def test_two_word_commands_and_repeated_keys(capsys):
    from corral.cli import COMMANDS, build_config, parse_args

    for name in COMMANDS:
        assert main([*name.split(), "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"corral {name}:")
    cfg = build_config(COMMANDS["serve"], *parse_args("serve", COMMANDS["serve"], ["--model", "a=x", "--model", "b=y"]))
    assert cfg.models == ["a=x", "b=y"]
    assert build_config(COMMANDS["serve"], *parse_args("serve", COMMANDS["serve"], ["--model", "a=x"])).models == ["a=x"]


def test_console_script_runs_sft_prints_and_saves_resolved_config(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "corral.cli", "sft", f"--model={tiny_model_dir}", "--data", "builtin:corral_identity",
         f"output_dir={out}", "train.max_steps=2", "train.max_len=96", "--train.lr", "3e-4"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resolved config" in proc.stdout and "lr: 0.0003" in proc.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == 3e-4 and saved["train"]["max_steps"] == 2 and saved["model"] == str(tiny_model_dir)
    assert (out / "model" / "adapter_config.json").is_file()


def test_data_inspect_highlights_and_counts(tiny_model_dir, capsys):
    assert main(["data", "inspect", "builtin:corral_identity", "--model", str(tiny_model_dir),
                 "--template", "chatml", "--num_samples", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "token counts" in out and "trained" in out and "<|im_start|>assistant" in out


def test_unreadable_data_is_reported_with_its_place(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    assert main(["data", "inspect", str(bad), "--model", str(tiny_model_dir)]) == 1
    assert f"{bad}:1: field 'messages[1].role': unknown role 'bot'" in capsys.readouterr().err


def test_documented_words_parse_as_the_documented_values(tmp_path, capsys):
    """YAML 1.1 reads `no`, `yes`, `on`, `off` as booleans; the documented `mixed_precision=no` and any word in a
    string field stay the word, on the command line and in files, while bool fields still take them."""
    from corral.cli import COMMANDS, build_config, parse_args

    assert [parse_value(w) for w in ("no", "yes", "on", "off", "true", "False")] == ["no", "yes", "on", "off", True, False]
    cfg = build_config(COMMANDS["sft"], *parse_args("sft", COMMANDS["sft"],
                                                    ["train.mixed_precision=no", "data.pack=off", "output_dir=on"]))
    assert (cfg.train.mixed_precision, cfg.data.pack, cfg.output_dir) == ("no", False, "on")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\ndata:\n  pack: no\n")
    from_file = load_config(SFTConfig, path)
    assert (from_file.train.mixed_precision, from_file.data.pack) == ("no", False)


def test_a_section_keeps_its_recipe_defaults_when_other_keys_are_given(capsys):
    """reward's train.lr default is 1e-4 and DPO's 5e-5, not the loop's 2e-4: setting train.max_steps keeps them,
    and `--help` shows them."""
    from corral.config import DPOConfig, PPOConfig, RewardConfig

    assert load_config(RewardConfig, None, {"train.max_steps": 3}).train.lr == 1e-4
    assert load_config(DPOConfig, None, {"train.max_steps": 3}).train.lr == 5e-5
    ppo = load_config(PPOConfig, None, {"reward": "m:f", "actor.warmup_ratio": 0.1, "critic.max_grad_norm": 0.5})
    assert (ppo.actor.lr, ppo.actor.schedule, ppo.actor.warmup_ratio) == (1e-5, "constant", 0.1)
    assert (ppo.critic.lr, ppo.critic.max_grad_norm) == (5e-5, 0.5)
    assert main(["reward", "--help"]) == 0
    assert "  train.lr = 0.0001\n" in capsys.readouterr().out


def test_a_run_that_fails_on_its_inputs_leaves_nothing_behind(tmp_path, tiny_model_dir, capsys):
    """Bad data is an error naming file and line, exit status 1, and the output folder the run made (holding only
    its config.yaml) is gone; a folder that existed before the run is left as it was."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}\n{"nope": 1}\n')
    out = tmp_path / "run"
    args = ["sft", f"model={tiny_model_dir}", "template=chatml", f"data.path={bad}", f"output_dir={out}"]
    assert main(args) == 1
    assert f"{bad}:2" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(args) == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]


def test_bitsandbytes_hub_kernel_message_is_dropped_and_its_other_warnings_kept():
    """bitsandbytes, imported by peft, logs a failed Hub fetch of an optional CPU kernel at import on avx512_bf16
    CPUs (then uses its own): every `corral serve` printed it as `corral: Failed to load ...`."""
    import logging

    from corral.cli import quiet_libraries

    quiet_libraries()
    quiet_libraries()  # once is enough: no second filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    records = []
    collector = logging.Handler()
    collector.emit = records.append
    logger.addHandler(collector)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        logger.warning("some other bitsandbytes warning")
    finally:
        logger.removeHandler(collector)
    assert [r.getMessage() for r in records] == ["some other bitsandbytes warning"]
