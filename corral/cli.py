"""`corral <command> --config FILE.yaml key.sub=value --key.sub value ...`

One subcommand per recipe, nothing else. Overrides are dotted config keys; a few commands accept
short aliases (`--data` for `data.path`). The resolved config is validated, printed and saved by
the recipe.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from corral.recipes.pipeline import PipelineConfig  # the pipeline's config lives with its wiring
from corral.config import (
    ChatConfig,
    ConfigError,
    DataCleanConfig,
    DataStatsConfig,
    DeltaApplyConfig,
    DeltaMakeConfig,
    DistillConfig,
    DPOConfig,
    ExportGGUFConfig,
    InspectConfig,
    JudgeAnswerConfig,
    JudgeGradeConfig,
    JudgeReportConfig,
    MergeConfig,
    PPOConfig,
    QuickstartConfig,
    RewardConfig,
    RewardScoreConfig,
    ServeConfig,
    SFTConfig,
    ToolEvalConfig,
    load_config,
    parse_value,
    shipped_config,
)


@dataclass(frozen=True)
class Command:
    config: type[BaseModel]
    run: str  # "module:function", imported only when the command runs (keeps --help fast)
    help: str
    aliases: dict[str, str] = field(default_factory=dict)
    default_config: str | None = None  # shipped YAML applied before --config and overrides
    positional: str | None = None  # config key set by a bare positional argument
    positional_many: bool = False  # every bare argument goes to `positional` (a list: `data clean A B`)


COMMANDS: dict[str, Command] = {
    "quickstart": Command(
        QuickstartConfig, "corral.recipes.quickstart:run",
        "LoRA SFT of the embedded model on Corral's identity data; answers before and after",
        default_config="quickstart.yaml",
    ),
    "sft": Command(
        SFTConfig, "corral.recipes.sft:run",
        "supervised fine-tuning: full, LoRA, QLoRA or prefix tuning on conversations",
        aliases={"--data": "data.path"},
    ),
    "merge": Command(
        MergeConfig, "corral.recipes.merge:run",
        "fold a LoRA adapter into its base model and write a plain HF folder",
        aliases={"--output": "output_dir"}, positional="adapter",
    ),
    "delta make": Command(
        DeltaMakeConfig, "corral.recipes.delta:make",
        "publish a fine-tune as delta weights (target minus base) with a manifest that checks the base",
        aliases={"--base": "base", "--target": "target", "--output": "output_dir"},
    ),
    "delta apply": Command(
        DeltaApplyConfig, "corral.recipes.delta:apply",
        "rebuild a model from its base and a delta folder (every tensor checked), as a plain HF folder",
        aliases={"--base": "base", "--delta": "delta", "--output": "output_dir"},
    ),
    "reward": Command(
        RewardConfig, "corral.recipes.reward:run",
        "train a reward model on preference pairs (pairwise loss); held-out accuracy and margin",
        aliases={"--data": "data.path"},
    ),
    "reward score": Command(
        RewardScoreConfig, "corral.recipes.reward:score",
        "score conversations (or preference pairs) with a reward model",
        aliases={"--data": "data", "--model": "model"},
    ),
    "dpo": Command(
        DPOConfig, "corral.recipes.dpo:run",
        "direct preference optimisation (DPO / IPO / SimPO) on preference pairs",
        aliases={"--data": "data.path"},
    ),
    "ppo": Command(
        PPOConfig, "corral.recipes.ppo:run",
        "RLHF: PPO (critic + GAE) or rloo / grpo against a reward model or a reward function; KL control, ptx, EMA",
        aliases={"--data": "data.path", "--reward": "reward"},
    ),
    "pipeline": Command(
        PipelineConfig, "corral.recipes.pipeline:run",
        "SFT -> reward model -> PPO (or SFT -> DPO) from one config, stage by stage, resumable; one HTML report",
    ),
    "distill": Command(
        DistillConfig, "corral.recipes.distill:run",
        "adversarial distillation (Lion): a teacher endpoint answers, referees and writes harder instructions; resumable",
        aliases={"--data": "data.path"},
    ),
    "serve": Command(
        ServeConfig, "corral.recipes.serve:run",
        "OpenAI-compatible API server with web chat and arena (default: the embedded model)",
        aliases={"--model": "models"},
    ),
    "chat": Command(
        ChatConfig, "corral.recipes.chat:run",
        "chat in the terminal with a local model or an OpenAI-compatible server (--api URL)",
        positional="model",
    ),
    "judge answer": Command(
        JudgeAnswerConfig, "corral.recipes.judge:answer",
        "models answer a question set (local models batched, or --api URL); resumable",
        aliases={"--model": "models", "--api-model": "api_model", "--questions": "questions"},
    ),
    "judge grade": Command(
        JudgeGradeConfig, "corral.recipes.judge:grade",
        "LLM-as-judge: single scores, pairwise with position swap, or relative; cached judgments",
        aliases={"--model": "models", "--judge-api": "judge_api", "--judge-model": "judge_model"},
    ),
    "judge report": Command(
        JudgeReportConfig, "corral.recipes.judge:report",
        "scores with intervals, per category, relative scores, win rates, Elo: Markdown + HTML",
    ),
    "eval tools": Command(
        ToolEvalConfig, "corral.eval.tools:run",
        "tool calling on held-out conversations: well-formed calls, right function, exact arguments, no-tool, answers",
        aliases={"--model": "model", "--data": "data"},
    ),
    "export gguf": Command(
        ExportGGUFConfig, "corral.recipes.export:gguf",
        "a model folder or LoRA adapter as one GGUF file (llama.cpp, Ollama) with an Ollama Modelfile beside it",
        positional="model",
    ),
    "data inspect": Command(
        InspectConfig, "corral.recipes.data:run",
        "show samples as training renders them (trained tokens highlighted) and token counts",
        aliases={"--data": "data.path"}, positional="data.path",
    ),
    "data clean": Command(
        DataCleanConfig, "corral.recipes.data:clean",
        "raw ShareGPT / OpenAI exports -> clean conversations: HTML, Unicode, roles, filters, language, dedup, split",
        positional="inputs", positional_many=True,
    ),
    "data stats": Command(
        DataStatsConfig, "corral.recipes.data:stats",
        "counts, tokens, length histogram, near-duplicates and what max_len would split: Markdown + PNG",
        aliases={"--data": "data.path"}, positional="data.path",
    ),
}  # fmt: skip


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: corral <command> [--config FILE.yaml] [key.sub=value | --key.sub value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "`corral <command> --help` lists the command's config keys with their defaults."]
    return "\n".join(lines)


def describe_fields(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """Every key with its default; a section's defaults are its parent's (reward's `train.lr` is 1e-4)."""
    lines = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if defaults is not None:
            default_value = getattr(defaults, name)
        elif not info.is_required():
            default_value = info.get_default(call_default_factory=True)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            section = default_value if not info.is_required() and isinstance(default_value, BaseModel) else None
            lines += describe_fields(annotation, key + ".", section)
            continue
        default = "(required)" if info.is_required() and defaults is None else repr(default_value)
        lines.append(f"  {key} = {default}" + (f"\n      {info.description}" if info.description else ""))
    return lines


def parse_args(name: str, cmd: Command, args: list[str]) -> tuple[list[str], dict]:
    config_files: list[str] = []
    overrides: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file")
            config_files.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            config_files.append(arg.split("=", 1)[1])
        elif arg.startswith("--"):
            key, eq, value = arg.partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{key} needs a value")
                value = args[i + 1]
                i += 1
            key = cmd.aliases.get(key, key[2:].replace("-", "_"))
            _set_override(overrides, key, parse_value(value))
        elif "=" in arg:
            key, _, value = arg.partition("=")
            _set_override(overrides, key, parse_value(value))
        elif cmd.positional and (cmd.positional not in overrides or cmd.positional_many):
            _set_override(overrides, cmd.positional, arg)
        else:
            raise ConfigError(f"unexpected argument '{arg}' (overrides are key=value or --key value)")
        i += 1
    return config_files, overrides


def _set_override(overrides: dict, key: str, value) -> None:
    """A key given twice collects its values into a list (`--model a=X --model b=Y`)."""
    if key in overrides:
        previous = overrides[key]
        overrides[key] = (previous if isinstance(previous, list) else [previous]) + [value]
    else:
        overrides[key] = value


def resolve_config_path(text: str) -> Path:
    path = Path(text)
    if not path.exists() and shipped_config(text).is_file():
        return shipped_config(text)  # `--config sft_lora.yaml` finds the shipped recipe
    return path


def build_config(cmd: Command, config_files: list[str], overrides: dict):
    files = ([shipped_config(cmd.default_config)] if cmd.default_config else []) + [
        resolve_config_path(f) for f in config_files
    ]
    return load_config(cmd.config, files, overrides)


def _not_the_hub_kernel_message(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_libraries() -> None:
    # Our own messages at INFO; libraries only when they warn (HTTP clients log every request at INFO).
    logging.basicConfig(level=logging.WARNING, format="corral: %(message)s")
    logging.getLogger("corral").setLevel(logging.INFO)
    for noisy in ("transformers", "accelerate", "peft", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # bitsandbytes (imported by peft) tries, on a CPU with avx512_bf16 and the `kernels` package installed, to
    # fetch a 4-bit kernel from the Hugging Face Hub at import, and says so as a failure when it cannot (offline,
    # or the repository's trust check), then uses its own kernel: every `corral serve` printed it. Only that
    # message is dropped; the logger's other warnings still show.
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _not_the_hub_kernel_message not in bnb.filters:
        bnb.addFilter(_not_the_hub_kernel_message)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch|bitsandbytes)")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = argv[0]
    rest = argv[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:  # two-word commands (`data inspect`, `reward score`) first
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        group = any(c.startswith(f"{argv[0]} ") for c in COMMANDS)  # `corral delta mke`: name both words
        print(f"corral: unknown command '{' '.join(argv[:2]) if group else name}'\n\n{usage()}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    if any(a in ("-h", "--help") for a in rest):
        print(f"corral {name}: {cmd.help}\n\nconfig keys (set with key=value or --key value):")
        print("\n".join(describe_fields(cmd.config)))
        return 0
    from corral.chat.templates import TemplateError
    from corral.data.formats import DataError
    from corral.models.load import ModelLoadError, running_command

    try:
        config = build_config(cmd, *parse_args(name, cmd, rest))
    except ConfigError as e:
        print(f"corral {name}: {e}", file=sys.stderr)
        return 2
    quiet_libraries()
    module_name, func = cmd.run.split(":")
    run = getattr(importlib.import_module(module_name), func)
    out = Path(getattr(config, "output_dir", "") or "")
    fresh = bool(out.parts) and not out.exists()
    try:
        with running_command(["corral", *argv]):  # model cards record the command that made them
            run(config)
    except (DataError, TemplateError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"corral {name}: error: {e}", file=sys.stderr)
        if fresh:
            remove_debris(out)
        return 1
    return 0


def remove_debris(out: Path) -> None:
    """A run that failed on its inputs leaves no folder behind: the one it made is removed when it holds nothing
    but the saved config (a run that got as far as writing checkpoints or metrics keeps them)."""
    import shutil

    if out.is_dir() and {p.name for p in out.iterdir()} <= {"config.yaml"}:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
