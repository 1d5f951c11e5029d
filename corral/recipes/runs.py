"""What every training recipe does first, written once: the run folder, config, accelerator, seed, and
(for the preference recipes) the train / held-out preference pairs as rows."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from corral.config import dump_config, save_config
from corral.data.mix import load_records
from corral.data.preference import read_preferences
from corral.train.harness import make_accelerator


@dataclass
class RecipeResult:
    """What every training recipe returns: its trained model folder and its figures (JSON-able: steps, last
    loss, held-out figures, PPO's first and last step and memory), which the pipeline records as they are."""

    model_dir: Path
    summary: dict


def train_summary(train, **more) -> dict:
    """The shared loop's result as summary figures."""
    return {"steps": train.steps, "loss": train.last_loss, "eval_loss": train.eval_loss,
            "resumed_from": train.resumed_from, "metrics": str(train.metrics_path), **more}  # fmt: skip


def system_prompt_policy(template, keep_default: bool, log):
    """Say once what the template adds to records without a system message, and return the function that puts
    each conversation as training and prompting will see it: unchanged, or (keep_default false) with an empty
    system message so the template adds nothing the data does not have."""
    from corral.chat.conversation import Conversation, Message

    added = template.added_system_text()
    if added and keep_default:
        log(f"note: template '{template.name}' adds a system prompt to every record without one: {added[:120]!r}; "
            "data.template_system=false leaves it out")
    if keep_default or not added:
        return lambda conv: conv
    log(f"data.template_system=false: records without a system message get an empty one (template "
        f"'{template.name}' would add {added[:60]!r})")

    def without_default(conv: Conversation) -> Conversation:
        if conv.messages and conv.messages[0].role == "system":
            return conv
        return Conversation([Message("system", ""), *conv.messages], conv.source, conv.id, conv.meta, conv.tools)

    return without_default


def data_of(data) -> str:
    """What a data section reads, for the model card: its path, or its mixture's sources."""
    return data.path or ", ".join(source.path for source in data.sources)


def saver(tokenizer, template, card: dict):
    """`save(model, folder)` for this run's model folders: checkpoints and final models alike (`save_model`).
    `card` is read at each save, so a recipe adds its final `metrics` to it before the final save. `state_dict`:
    the full weights gathered under FSDP / ZeRO-3 (the harness's `Trained.save_to`)."""
    from corral.models.load import save_model

    return lambda model, folder, state_dict=None: save_model(model, tokenizer, template, folder, card=card,
                                                             state_dict=state_dict)


@dataclass
class Run:
    accelerator: object
    out: Path
    main: bool
    log: object  # print on the main process, a no-op elsewhere


def begin_run(cfg, command: str, seed: int | None = None, mixed_precision: str | None = None) -> Run:
    """Accelerator, output folder with the resolved config saved (main process), printed config, seed
    (`seed` and `mixed_precision` default to the config's `train` section)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(mixed_precision or cfg.train.mixed_precision, getattr(cfg, "dtype", "auto"))
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    log = print if main else (lambda *a, **k: None)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    log(f"corral {command}: resolved config\n{dump_config(cfg)}")
    set_seed(cfg.train.seed if seed is None else seed)
    return Run(accelerator, out, main, log)


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random `fraction` held out."""
    import random

    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(records)))
    held = set(order[:n_eval])
    return [c for i, c in enumerate(records) if i not in held], [c for i, c in enumerate(records) if i in held]


def preference_rows(data, template, max_len: int, seed: int, to_rows, log) -> tuple[list, list]:
    """Train and held-out rows from a PreferenceDataConfig: file or mixture, stage split, eval split,
    `to_rows(pairs, template, max_len) -> (rows, dropped_too_long)`."""
    import dataclasses
    reader = partial(read_preferences, data_format=data.format, skip_invalid=data.skip_invalid)
    pairs = load_records(reader, data.path, data.sources, data.mix_seed, data.split, data.split_stage,
                         data.split_seed, log)
    if data.eval_path:
        eval_pairs, eval_report = reader(data.eval_path)
        log(eval_report.summary())
        train_pairs = pairs
    else:
        train_pairs, eval_pairs = split_eval(pairs, data.eval_fraction, seed)
    as_seen = system_prompt_policy(template, data.template_system, log)
    train_pairs, eval_pairs = ([dataclasses.replace(p, prompt=as_seen(p.prompt)) for p in part]
                               for part in (train_pairs, eval_pairs))  # fmt: skip
    rows, too_long = to_rows(train_pairs, template, max_len)
    eval_rows, eval_too_long = to_rows(eval_pairs, template, max_len)
    dropped = too_long + eval_too_long
    log(f"{len(rows)} training pairs, {len(eval_rows)} held out"
        + (f"; dropped {dropped} longer than train.max_len={max_len}" if dropped else ""))
    if not rows:
        raise ValueError(f"no training pairs left from {data.path or 'data.sources'}")
    return rows, eval_rows
