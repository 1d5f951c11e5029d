"""`corral pipeline`: DeepSpeed-Chat's three steps from one config, SFT -> reward model -> PPO (or SFT -> DPO).

Each stage is the ordinary recipe (`sft.run`, `reward.run`, `ppo.run`, `dpo.run`) run on its section of the
config in OUTPUT/<stage>/, with the fields that connect the stages filled by PipelineConfig: the PPO actor
starts from OUTPUT/sft/model, its reward and critic from OUTPUT/reward/model; DPO starts from the SFT model
merged into its base (OUTPUT/sft/merged), because the DPO recipe trains a plain model whose starting weights
are the reference.

A finished stage leaves OUTPUT/<stage>/stage_done.json (written atomically: the marker exists only once the
stage's outputs do) with its config and result summary. A re-run skips that stage and says so, and refuses
when the stage's config has changed since (delete the stage's folder to train it again). An interrupted
stage has no marker: it runs again and resumes through its own recipe (SFT, reward and DPO continue from the
loop's newest checkpoint with train.resume=auto, PPO from its own with resume=auto and save_every). At the end OUTPUT/report.md and a self-contained
OUTPUT/report.html show every stage's curves (figures/<stage>.png, drawn from its metrics.jsonl), its final
figures, and replies sampled by PPO at its first and last sampled steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from corral.atomic import atomic_write_text, read_jsonl
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from corral.config import EMBEDDED_MODEL, DPOConfig, PPOConfig, RewardConfig, Section, SFTConfig, save_config
from corral.data.formats import DataError, resolve_data_path

# The pipeline's config and its wiring: which fields connect the stages, set here and nowhere else.

class PipelineDataConfig(Section):
    split: str = Field("", description="DeepSpeed-Chat stage split set on every stage's data section, e.g. `2,4,4`: "
                       "SFT takes part 0, the reward model part 1, PPO's prompts part 2; DPO, a preference stage, takes "
                       "part 1 (so `2,8` suits rl=dpo). Each stage reads its own data.path (conversations for SFT and "
                       "PPO, pairs for the reward model and DPO): for disjoint parts those files must hold the same "
                       "records in the same order, as builtin:corral_identity and builtin:corral_preferences do. "
                       "Empty: each stage keeps its own data.split settings.")
    split_seed: int = Field(1234, description="Seed of the stage split, set on every stage.")


PIPELINE_STAGES = {"ppo": ("sft", "reward", "ppo"), "dpo": ("sft", "dpo")}
PIPELINE_SPLIT_STAGE = {"sft": 0, "reward": 1, "ppo": 2, "dpo": 1}


def _given(value) -> dict:
    """A section as given: a dict (YAML), or a model built in Python (only the keys it was given)."""
    return value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else dict(value or {})


class PipelineConfig(Section):
    """`corral pipeline`: SFT -> reward model -> PPO, or SFT -> DPO, each stage in OUTPUT_DIR/<stage>/.

    The fields that connect the stages are wired by the pipeline: every stage's `output_dir` and `template`,
    `sft.model`, `ppo.model`, `ppo.reward`, `dpo.model`, and with `data.split` each stage's split fields. A
    section that sets one of them to another value is an error (the same value is accepted, so a saved
    config.yaml loads again). `reward.model` defaults to `model`; a value given there wins."""

    output_dir: str = Field("runs/pipeline", description="Each stage runs in OUTPUT_DIR/<stage>/ (sft, reward, ppo or "
                            "dpo); config.yaml, report.md, report.html and figures/ go here.")
    model: str = Field(EMBEDDED_MODEL, description="The base model. SFT starts from it, and so does the reward model "
                       "(as in DeepSpeed-Chat, not from the SFT model) unless reward.model names another model with the "
                       "same tokenizer.")
    template: str = Field("auto", description="Chat template of every stage: PPO must render prompts the way the "
                          "reward model was trained to read them.")
    rl: Literal["ppo", "dpo"] = Field("ppo", description="ppo: SFT -> reward model -> PPO (the actor starts from the "
                                      "SFT model, reward and critic from the reward model); dpo: SFT -> DPO from the "
                                      "SFT model (no reward model).")
    data: PipelineDataConfig = PipelineDataConfig()
    sft: SFTConfig = Field(default_factory=dict, validate_default=True, description="Stage 1.")  # type: ignore[arg-type]
    reward: RewardConfig = Field(default_factory=dict, validate_default=True, description="Stage 2 (rl=ppo).")  # type: ignore[arg-type]
    ppo: PPOConfig = Field(default_factory=dict, validate_default=True, description="Stage 3 (rl=ppo).")  # type: ignore[arg-type]
    dpo: DPOConfig = Field(default_factory=dict, validate_default=True, description="Stage 2 (rl=dpo).")  # type: ignore[arg-type]
    report_samples: int = Field(4, ge=0, description="PPO replies shown in the report from its first and last sampled step.")

    @field_validator("data")
    @classmethod
    def _split_has_the_stages(cls, data: PipelineDataConfig, info: ValidationInfo) -> PipelineDataConfig:
        from corral.data.mix import parse_split

        rl = info.data.get("rl")
        needed = 1 + max(PIPELINE_SPLIT_STAGE[s] for s in PIPELINE_STAGES[rl]) if rl else 0
        if data.split and len(parse_split(data.split)) < needed:
            raise ValueError(f"split '{data.split}' has {len(parse_split(data.split))} parts; rl={rl} uses {needed}")
        return data

    @field_validator("sft", "reward", "ppo", "dpo", mode="before")
    @classmethod
    def _wire_stage(cls, value, info: ValidationInfo) -> dict:
        stage, top = info.field_name, info.data
        section = _given(value)
        if not {"output_dir", "model", "template"} <= top.keys():
            return section  # an earlier field is invalid and already reported
        out = Path(top["output_dir"])
        wired = {"output_dir": (str(out / stage), "OUTPUT_DIR/" + stage),
                 "template": (top["template"], "the pipeline's template")}  # fmt: skip
        if stage == "sft":
            wired["model"] = (top["model"], "the pipeline's model")
            if section.get("method") == "prefix":
                raise ValueError("sft.method=prefix: a prefix-tuning adapter cannot be merged, and PPO and DPO "
                                 "start from the merged SFT model")
        elif stage == "reward":
            section.setdefault("model", top["model"])
        elif stage == "ppo":
            wired["model"] = (str(out / "sft" / "model"), "the SFT stage's model")
            wired["reward"] = (str(out / "reward" / "model"), "the reward stage's model")
        elif stage == "dpo" and "sft" in top:
            merged = "model" if top["sft"].method == "full" else "merged"  # DPO trains on top of the SFT weights
            wired["model"] = (str(out / "sft" / merged), "the SFT stage's model, merged")
        data = _given(section.get("data"))
        if "data" in top and top["data"].split:
            for key, wanted in (("split", top["data"].split), ("split_seed", top["data"].split_seed),
                                ("split_stage", PIPELINE_SPLIT_STAGE[stage])):  # fmt: skip
                if key in data and data[key] != wanted:
                    raise ValueError(f"{stage}.data.{key}={data[key]!r}, but the pipeline's data.split sets it to "
                                     f"{wanted!r}; leave it out")
                data[key] = wanted
            section["data"] = data
        for key, (wanted, what) in wired.items():
            if key in section and section[key] != wanted and Path(str(section[key])) != Path(str(wanted)):
                raise ValueError(f"{stage}.{key}={section[key]!r}, but the pipeline sets it to {what} "
                                 f"({wanted!r}); leave it out")
            section[key] = wanted
        return section


MARKER = "stage_done.json"
# Which finished stages a stage is built on: it cannot stay done when one of them has to run again.
STAGE_INPUTS = {"sft": (), "reward": (), "ppo": ("sft", "reward"), "dpo": ("sft",)}


def run_stage(stage: str, cfg: PipelineConfig) -> dict:
    """Run one stage's recipe on its section; its summary figures, with its model folder, go in the marker."""
    from corral.recipes import dpo, ppo, reward, sft

    section = getattr(cfg, stage)
    if stage == "dpo":
        from corral.models.adapters import merge_adapter

        start = Path(section.model)
        if not start.exists():  # OUTPUT/sft/merged: the SFT adapter folded into its base, once (atomic folder)
            merge_adapter(Path(cfg.sft.output_dir) / "model", start, section.dtype)
            print(f"corral pipeline: merged the SFT adapter into its base for DPO: {start}")
    result = {"sft": sft, "reward": reward, "ppo": ppo, "dpo": dpo}[stage].run(section)
    return {"model": str(result.model_dir), **result.summary}


def read_marker(stage_dir: Path) -> dict | None:
    path = stage_dir / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; keys present on one side only (a newer Corral's fields) are ignored."""
    changed = []
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def data_problems(cfg: PipelineConfig, stages: list[str]) -> list[str]:
    """Data files the stages to run cannot find, checked before the first stage rather than after it."""
    problems = []
    for name in stages:
        section = getattr(cfg, name)
        data = section.data
        paths = [data.path] if data.path else [source.path for source in data.sources]
        if not paths:
            problems.append(f"{name}.data.path: not set (nor {name}.data.sources)")
        paths += [p for p in (getattr(data, "eval_path", ""), getattr(getattr(section, "ptx", None), "path", "")) if p]
        for path in paths:
            try:
                if not resolve_data_path(path).exists():
                    problems.append(f"{name}: {path}: no such file or folder")
            except DataError as e:
                problems.append(f"{name}: {e}")
    return problems


def check_plan(cfg: PipelineConfig, stages: tuple[str, ...], done: dict) -> None:
    """Refuse, before anything runs, what would mix old and new results or fail after hours."""
    out = Path(cfg.output_dir)
    for name in stages:
        if not done[name]:
            continue
        for source in STAGE_INPUTS[name]:
            if not done[source]:
                raise ValueError(f"{out / name} is marked done but {source}, which it was trained from, is not: "
                                 f"{source} would run again under it. Delete {out / name} too to re-run both.")
        changed = changed_settings(done[name]["config"], getattr(cfg, name).model_dump(mode="json"))
        if changed:
            raise ValueError(f"stage {name} finished with other settings ({'; '.join(changed)}); a finished stage is "
                             f"not trained again: restore them, or delete {out / name} (and the stages after it) "
                             "to re-run it")
    problems = data_problems(cfg, [name for name in stages if not done[name]])
    if problems:
        raise DataError("pipeline data:\n  " + "\n  ".join(problems))


def run(cfg: PipelineConfig) -> dict:
    out = Path(cfg.output_dir)
    stages = PIPELINE_STAGES[cfg.rl]
    done = {name: read_marker(out / name) for name in stages}
    check_plan(cfg, stages, done)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    print(f"corral pipeline: {' -> '.join(stages)} in {out}; done already: "
          + (", ".join(name for name in stages if done[name]) or "none"))
    ran, skipped = [], []
    for i, name in enumerate(stages, 1):
        section = getattr(cfg, name)
        where = f"stage {i}/{len(stages)} {name}"
        if done[name]:
            print(f"corral pipeline: {where}: done at {done[name]['finished']} ({out / name / MARKER}): skipped")
            skipped.append(name)
            continue
        again = (out / name).exists()
        print(f"corral pipeline: {where} in {section.output_dir}"
              + (" (started before: the recipe resumes from its newest checkpoint, if any)" if again else ""))
        started = time.time()
        result = run_stage(name, cfg)
        done[name] = {"stage": name, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "seconds": round(time.time() - started, 1), "config": section.model_dump(mode="json"),
                      "result": result}  # fmt: skip
        atomic_write_text(out / name / MARKER, json.dumps(done[name], indent=2, default=str) + "\n")
        ran.append(name)
    report = write_report(cfg, stages, done, ran)
    print(f"corral pipeline: report {report}")
    return {"stages": {name: done[name]["result"] for name in stages}, "ran": ran, "skipped": skipped,
            "report": report}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The report: Markdown (with figures/ beside it) and the same as one self-contained HTML page

PANELS = {
    "sft": {"loss per token": ["loss", "eval_loss"], "learning rate": ["lr"], "gradient norm": ["grad_norm"]},
    "reward": {"pairwise loss": ["loss", "eval_loss"], "learning rate": ["lr"], "gradient norm": ["grad_norm"]},
    "dpo": {"loss": ["loss", "eval_loss"], "implicit reward accuracy": ["reward_accuracy"],
            "implicit rewards": ["reward_chosen", "reward_rejected", "reward_margin"], "KL estimate": ["kl_estimate"]},
    "ppo": {"reward": ["reward_mean"], "KL to the SFT model": ["kl"], "losses": ["policy_loss", "value_loss"],
            "entropy": ["entropy"], "reply length": ["reply_len"], "ended the turn": ["ended_turn"]},
}  # fmt: skip
TITLES = {"sft": "Supervised fine-tuning", "reward": "Reward model", "ppo": "PPO", "dpo": "DPO"}


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def final_figures(name: str, result: dict) -> list[tuple[str, str]]:
    """(figure, value) rows of a stage's table."""
    rows = [("optimizer steps", _num(result.get("steps"))), ("last train loss", _num(result.get("loss")))]
    if name == "sft":
        return rows + [("held-out loss", _num(result.get("eval_loss")))]
    if name == "reward":
        ev = result.get("eval") or {}
        return rows + [("held-out pairs", _num(ev.get("pairs"))), ("held-out accuracy", _num(ev.get("accuracy"))),
                       ("held-out mean margin", _num(ev.get("mean_margin"))),
                       ("mean score chosen / rejected", f"{_num(ev.get('mean_chosen'))} / {_num(ev.get('mean_rejected'))}")]  # fmt: skip
    if name == "dpo":
        before, after = ((result.get("eval") or {}).get(k) or {} for k in ("before", "after"))
        return rows + [("held-out pairs", _num(after.get("pairs"))),
                       ("held-out log-prob margin, before -> after",
                        f"{_num(before.get('logp_margin'))} -> {_num(after.get('logp_margin'))}"),
                       ("implicit reward accuracy", _num(after.get("reward_accuracy"))),
                       ("implicit reward margin", _num(after.get("reward_margin")))]  # fmt: skip
    first, last = result["first"], result["last"]
    return [("steps", _num(last.get("step"))),
            ("reward mean, first -> last step", f"{_num(first.get('reward_mean'))} -> {_num(last.get('reward_mean'))}"),
            ("KL to the SFT model, first -> last", f"{_num(first.get('kl'))} -> {_num(last.get('kl'))}"),
            ("reply length, first -> last", f"{_num(first.get('reply_len'))} -> {_num(last.get('reply_len'))}"),
            ("ended the turn, first -> last", f"{_num(first.get('ended_turn'))} -> {_num(last.get('ended_turn'))}")]  # fmt: skip


def latest_run(rows: list[dict]) -> list[dict]:
    """The rows of the newest run in an appended log: those after the step counter last went back."""
    start = max((i for i in range(1, len(rows)) if rows[i]["step"] < rows[i - 1]["step"]), default=0)
    return rows[start:]


def sample_lines(samples: list[dict], per_step: int) -> list[str]:
    samples = latest_run(samples)
    if not samples or not per_step:
        return []
    lines = []
    for step in sorted({samples[0]["step"], samples[-1]["step"]}):
        lines += [f"### Replies at PPO step {step}", ""]
        for s in [s for s in samples if s["step"] == step][:per_step]:
            prompt, reply = (" ".join(str(s[k]).split())[:400] for k in ("prompt", "reply"))
            lines.append(f"- (score {_num(float(s['score']))}) {prompt} => {reply}")
        lines.append("")
    return lines


def write_report(cfg: PipelineConfig, stages: tuple[str, ...], done: dict, ran: list[str]) -> Path:
    from corral.eval.report import markdown_page
    from corral.train.metrics import plot_panels

    out = Path(cfg.output_dir)
    lines = [f"# Corral pipeline: {' -> '.join(stages)}", "",
             f"Base model {cfg.model}, template {cfg.template}, output {out}"
             + (f", stage split {cfg.data.split} (seed {cfg.data.split_seed})" if cfg.data.split else "") + ".", "",
             "| stage | folder | finished | minutes | this run |", "|---|---|---|---:|---|"]  # fmt: skip
    for name in stages:
        lines.append(f"| {name} | {out / name} | {done[name]['finished']} | {done[name]['seconds'] / 60:.1f} | "
                     f"{'trained' if name in ran else 'skipped (done before)'} |")
    for name in stages:
        result = done[name]["result"]
        lines += ["", f"## {TITLES[name]} ({name}/)", "", "| figure | value |", "|---|---:|"]
        lines += [f"| {figure} | {value} |" for figure, value in final_figures(name, result)]
        lines.append("")
        figure = plot_panels(read_jsonl(out / name / "metrics.jsonl"), out / "figures" / f"{name}.png", PANELS[name],
                             f"{name}: {out / name / 'metrics.jsonl'}")  # fmt: skip
        if figure is not None:
            lines += [f"![{name} curves](figures/{name}.png)", ""]
        if name == "ppo":
            lines += sample_lines(read_jsonl(out / "ppo" / "samples.jsonl"), cfg.report_samples)
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", markdown)
    return atomic_write_text(out / "report.html", markdown_page("Corral pipeline report", markdown, images_dir=out))
