"""`corral pipeline` on the tiny model: SFT -> reward -> PPO with a stage split, the report, finished stages
skipped on a re-run, a failure in PPO resumed at PPO, and the DPO branch."""

from __future__ import annotations

import json

import pytest
import yaml

from corral.config import ConfigError, load_config
from corral.data.formats import DataError
from corral.recipes.pipeline import MARKER, PipelineConfig, run

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TRAIN = {"max_steps": 2, "batch_size": 2, "max_len": 256, "lr": 1e-3}


def tiny_pipeline(tmp_path, model_dir, **overrides) -> PipelineConfig:
    """A pipeline config as a user writes it (YAML + dotted overrides), two steps a stage."""
    tree = {
        "output_dir": str(tmp_path / "run"), "model": str(model_dir), "data": {"split": "2,4,4"},
        "sft": {"data": {"path": "builtin:corral_identity", "eval_fraction": 0.05}, "train": TRAIN, "lora": LORA},
        "reward": {"data": {"path": "builtin:corral_preferences"}, "train": TRAIN, "lora": LORA},
        "ppo": {"steps": 2, "rollout": {"prompts_per_step": 2, "max_new_tokens": 4, "sample_every": 1},
                "update": {"minibatch": 2}, "actor": {"lr": 1e-3}, "data": {"path": "builtin:corral_identity"}, "lora": LORA},
        "dpo": {"data": {"path": "builtin:corral_preferences"}, "train": TRAIN, "lora": LORA},
    }  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(PipelineConfig, path, overrides)


def stage_files(out, stage: str) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted((out / stage).rglob("*")) if p.is_file()}


def test_pipeline_fails_in_ppo_resumes_there_skips_finished_stages_and_runs_dpo(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    # Every prompt is longer than 8 tokens: PPO fails when it reads them, after SFT and the reward model.
    with pytest.raises(ValueError, match="no prompts left"):
        run(tiny_pipeline(tmp_path, tiny_model_dir, **{"ppo.data.max_prompt_len": 8}))
    printed = capsys.readouterr().out
    assert (out / "sft" / MARKER).is_file() and (out / "reward" / MARKER).is_file()
    assert not (out / "ppo" / MARKER).exists() and not (out / "report.html").exists()
    # the stage split: disjoint parts of the 258 aligned records, one per stage
    for part, n in ((0, 52), (1, 103), (2, 103)):
        assert f"stage split 2,4,4: part {part} has {n} of 258 records" in printed
    # As if the reward stage had been killed after its last checkpoint, before its marker: it resumes there.
    (out / "reward" / MARKER).unlink()

    cfg = tiny_pipeline(tmp_path, tiny_model_dir)  # fixed
    fixed = run(cfg)
    printed = capsys.readouterr().out
    assert fixed["ran"] == ["reward", "ppo"] and fixed["skipped"] == ["sft"]
    assert fixed["stages"]["reward"]["resumed_from"] == 2  # the loop's own resume: no step trained twice
    assert "reward in " + str(out / "reward") + " (started before: the recipe resumes" in printed
    # each stage's output feeds the next: PPO's actor from the SFT model, its reward and critic from the RM
    ppo_cfg = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert (ppo_cfg["model"], ppo_cfg["reward"]) == (str(out / "sft" / "model"), str(out / "reward" / "model"))
    for stage in ("sft", "reward", "ppo"):
        marker = json.loads((out / stage / MARKER).read_text())
        assert marker["stage"] == stage and marker["config"]["output_dir"] == str(out / stage)
    # the reward model's held-out pairs: 10% (its data's eval_fraction) of its 103-record part, round(10.3)
    assert fixed["stages"]["reward"]["eval"]["pairs"] == 10
    page = (out / "report.html").read_text()
    for heading in ("<h2>Supervised fine-tuning (sft/)</h2>", "<h2>Reward model (reward/)</h2>", "<h2>PPO (ppo/)</h2>"):
        assert heading in page
    assert page.count("data:image/png;base64,") == 3 and "figures/" not in page  # curves inlined
    assert "<td>held-out accuracy</td>" in page and "<th>stage</th>" in page  # Markdown tables as HTML tables
    assert "Replies at PPO step 1" in page and "Replies at PPO step 2" in page
    assert "![ppo curves](figures/ppo.png)" in (out / "report.md").read_text()

    before = {stage: stage_files(out, stage) for stage in ("sft", "reward", "ppo")}
    again = run(cfg)
    printed = capsys.readouterr().out
    assert again["ran"] == [] and again["skipped"] == ["sft", "reward", "ppo"]
    assert printed.count(": skipped") == 3
    assert {stage: stage_files(out, stage) for stage in before} == before  # nothing retrained or rewritten
    assert again["stages"]["ppo"]["last"]["step"] == 2

    with pytest.raises(ValueError, match=r"stage sft finished with other settings \(train.lr: 0.001 -> 0.002\)"):
        run(tiny_pipeline(tmp_path, tiny_model_dir, **{"sft.train.lr": 2e-3}))

    dpo = run(tiny_pipeline(tmp_path, tiny_model_dir, rl="dpo"))
    assert dpo["ran"] == ["dpo"] and dpo["skipped"] == ["sft"]
    assert (out / "sft" / "merged" / "config.json").is_file()  # DPO starts from the SFT adapter merged in
    assert yaml.safe_load((out / "dpo" / "config.yaml").read_text())["model"] == str(out / "sft" / "merged")
    assert dpo["stages"]["dpo"]["eval"]["after"]["pairs"] == 10  # DPO takes the reward model's part: 10% of 103
    page = (out / "report.html").read_text()
    assert "<h2>DPO (dpo/)</h2>" in page and "<h2>PPO" not in page and page.count("data:image/png;base64,") == 2


def test_the_pipeline_wires_its_stages_and_refuses_contradictions(tmp_path, tiny_model_dir):
    cfg = tiny_pipeline(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    assert cfg.sft.model == cfg.reward.model == str(tiny_model_dir)  # the RM starts from the base (DeepSpeed-Chat)
    assert {cfg.sft.template, cfg.reward.template, cfg.ppo.template, cfg.dpo.template} == {"auto"}
    assert [getattr(cfg, s).data.split_stage for s in ("sft", "reward", "ppo", "dpo")] == [0, 1, 2, 1]
    # the wired value itself is accepted, so a saved config.yaml loads again
    same = load_config(PipelineConfig, [], {"output_dir": str(out), "ppo.model": str(out / "sft" / "model")})
    assert same.ppo.reward == str(out / "reward" / "model")
    for key, value, message in (("ppo.reward", "pkg:fn", "ppo.reward='pkg:fn', but the pipeline sets it"),
                                ("sft.output_dir", "elsewhere", "sft.output_dir='elsewhere'"),
                                ("reward.data.split_stage", 2, "reward.data.split_stage=2"),
                                ("sft.method", "prefix", "prefix-tuning adapter cannot be merged"),
                                ("data.split", "2,8", "split '2,8' has 2 parts; rl=ppo uses 3")):  # fmt: skip
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            tiny_pipeline(tmp_path, tiny_model_dir, **{key: value})
    with pytest.raises(DataError, match="no such file"):
        run(tiny_pipeline(tmp_path, tiny_model_dir, **{"ppo.data.path": str(tmp_path / "typo.jsonl")}))
    assert not (out / "sft").exists()  # found before the first stage, not after it


def test_the_shipped_quickstart_loads_through_the_cli(capsys):
    from corral.cli import COMMANDS, build_config, main, parse_args
    from corral.recipes.pipeline import data_problems

    cmd = COMMANDS["pipeline"]
    cfg = build_config(cmd, *parse_args("pipeline", cmd, ["--config", "pipeline_quickstart.yaml"]))
    assert cfg.model == "smollm2-135m" and cfg.rl == "ppo" and cfg.ppo.advantage == "gae"
    assert {cfg.sft.method, cfg.reward.method, cfg.ppo.method, cfg.dpo.method} == {"lora"}
    assert data_problems(cfg, ["sft", "reward", "ppo", "dpo"]) == []
    dpo = build_config(cmd, *parse_args("pipeline", cmd, ["--config", "pipeline_quickstart.yaml", "rl=dpo",
                                                          "data.split=2,8"]))  # fmt: skip
    assert dpo.dpo.model == "runs/pipeline/sft/merged" and dpo.dpo.data.split == "2,8"
    assert main(["pipeline", "--config", "pipeline_quickstart.yaml", "ppo.model=elsewhere"]) == 2
    assert "ppo.model='elsewhere', but the pipeline sets it to the SFT stage's model" in capsys.readouterr().err
