"""Benchmark: Corral's reward-model and DPO training against TRL's RewardTrainer and DPOTrainer.

    python bench/preference.py --steps 12

Ten rows, each trained in its own fresh child process, one after the other:

  corral reward lora                  corral.recipes.reward.run (LoRA + score head), one shared-prompt sequence per pair
  corral reward lora, two sequences   the same with train.shared_prompt=false (the reference path)
  corral reward lora, defaults        the same at Corral's own defaults (dtype and mixed_precision auto: bf16 autocast
                                      on a CPU with native bf16, such as avx512_bf16 or AMX)
  trl RewardTrainer lora              trl.RewardTrainer, AutoModelForSequenceClassification + LoRA (SEQ_CLS)
  trl RewardTrainer lora, defaults    the same at TRL's own defaults (bf16 autocast, activation checkpointing)
  corral dpo lora                     corral.recipes.dpo.run (reference = base with the adapter disabled), shared prompt
  corral dpo lora, two sequences      the same with train.shared_prompt=false
  corral dpo lora, defaults           the same at Corral's own defaults
  trl DPOTrainer lora                 trl.DPOTrainer with peft (its reference is also the adapter-disabled base)
  trl DPOTrainer lora, defaults       the same at TRL's own defaults

The defaults rows compare each framework as a user who sets nothing gets it. All rows: same model
(smollm2-135m), data (Corral's built-in preference pairs, chatml template), LoRA (r 16, alpha 32,
dropout 0, all-linear), batch (pairs per step), max length, optimizer (torch AdamW), learning rate
and schedule, device; outside the defaults rows, the same precision (fp32 on CPU; on CUDA bf16
weights and autocast for both, TRL off its use_cpu). Per row: real (non-padding) tokens per second of chosen + rejected sequences over the
steps after `--warmup` (window from the end of the last warmup step to the end of the last step), and
the child's peak RSS (os.wait4), with its peak GPU memory on CUDA.

Writes bench/results/preference.json (preference-<gpu>.json on CUDA) atomically; `--out` elsewhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout's corral, installed or not

from bench.common import (  # noqa: E402
    machine_info, on_cuda, results_path, run_row_child, timed_window, versions, write_child_row, write_results)

MODEL = "smollm2-135m"
TEMPLATE = "chatml"
DATA = "builtin:corral_preferences"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
SEED = 42
ROWS = {
    "corral-reward": "corral reward lora",
    "corral-reward-twoseq": "corral reward lora, two sequences",
    "corral-reward-defaults": "corral reward lora, defaults",
    "trl-reward": "trl RewardTrainer lora",
    "trl-reward-defaults": "trl RewardTrainer lora, defaults",
    "corral-dpo": "corral dpo lora",
    "corral-dpo-twoseq": "corral dpo lora, two sequences",
    "corral-dpo-defaults": "corral dpo lora, defaults",
    "trl-dpo": "trl DPOTrainer lora",
    "trl-dpo-defaults": "trl DPOTrainer lora, defaults",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per row (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step (default 4)")
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (default 512)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--rows", default=",".join(ROWS), help="rows to run (default all)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def corral_windows(metrics_path: Path, steps: int, warmup: int) -> dict:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    per_step = sorted((r for r in records if "tokens_per_s" in r), key=lambda r: r["step"])
    if [r["step"] for r in per_step] != list(range(1, steps + 1)):
        raise RuntimeError(f"{metrics_path}: expected one record per step 1..{steps}")
    seen = [0] + [r["seen_tokens"] for r in per_step]
    tokens = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    ends = [r["elapsed_s"] for r in per_step]
    return timed_window(ends, tokens, tokens, warmup)


def corral_settings(args, workdir: Path, cuda: bool, shared_prompt: bool = True) -> dict:
    """The Corral rows' config: fp32 on CPU; bf16 weights and autocast on CUDA, as the TRL rows (`trl_settings`)."""
    return {
        "model": MODEL, "template": TEMPLATE, "method": "lora", "output_dir": str(workdir / "run"),
        "dtype": "bfloat16" if cuda else "float32", "data": {"path": DATA, "eval_fraction": 0.0},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "max_len": args.max_len, "lr": args.lr,
                  "warmup_ratio": 0.0, "schedule": "cosine", "max_grad_norm": 1.0, "log_every": 1, "resume": "never",
                  "seed": SEED, "mixed_precision": "bf16" if cuda else "no", "shared_prompt": shared_prompt},
        "lora": LORA,
    }  # fmt: skip


def trl_settings(args, workdir: Path, cuda: bool, defaults: bool = False) -> dict:
    """TRL's trainer arguments for the same run, on the same device and precision as the Corral rows. `defaults`:
    TRL's own precision (bf16 autocast) and activation checkpointing, both on by default."""
    settings = {
        "output_dir": str(workdir / "run"), "max_steps": args.steps, "per_device_train_batch_size": args.batch,
        "learning_rate": args.lr, "lr_scheduler_type": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "optim": "adamw_torch", "max_length": args.max_len, "use_cpu": not cuda,
        "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "seed": SEED, "dataloader_num_workers": 0,
        "activation_checkpointing": False, "logging_steps": 1,
        "bf16": cuda,  # TRL defaults to bf16, which a CPU barely runs: fp32 there, as Corral on CPU
    }  # fmt: skip
    if defaults:
        del settings["bf16"], settings["activation_checkpointing"]
    return settings


def run_corral(args, kind: str, workdir: Path, variant: str = "") -> dict:
    from corral.config import DPOConfig, RewardConfig

    common = corral_settings(args, workdir, on_cuda(), shared_prompt=variant != "twoseq")
    if variant == "defaults":
        common["dtype"] = "auto"
        common["train"]["mixed_precision"] = "auto"
    if kind == "reward":
        from corral.recipes import reward

        result = reward.run(RewardConfig(**common))
    else:
        from corral.recipes import dpo

        result = dpo.run(DPOConfig(**common, beta=args.beta))
    return corral_windows(Path(result.summary["metrics"]), args.steps, args.warmup)


def trl_datasets():
    """The same pairs as Corral reads, in TRL's conversational preference format."""
    from datasets import Dataset

    from corral.data.preference import read_preferences

    pairs, _ = read_preferences(DATA)
    records = []
    for p in pairs:
        prompt = p.prompt.to_openai()
        records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                        "rejected": [{"role": "assistant", "content": p.rejected}]})
    return Dataset.from_list(records)


def run_trl(args, kind: str, workdir: Path, variant: str = "") -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from corral.chat.templates import get_template
    from corral.models.load import attention_implementation, resolve_model

    cuda = on_cuda()
    dtype = torch.bfloat16 if cuda else torch.float32  # the same device, precision and attention as the Corral rows
    attention = attention_implementation(torch.device("cuda" if cuda else "cpu"), dtype)
    path = resolve_model(MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = get_template(TEMPLATE, tokenizer).chat_template_jinja  # render exactly as Corral
    dataset = trl_datasets()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    class CountingCollator:
        """TRL's own collator, counting real tokens (every attention mask in the batch)."""

        def __init__(self, collate):
            self.collate, self.tokens = collate, []

        def __call__(self, examples):
            batch = self.collate(examples)
            self.tokens.append(int(sum(v.sum() for k, v in batch.items() if "attention_mask" in k)))
            return batch

    settings = trl_settings(args, workdir, cuda, defaults=variant == "defaults")
    if kind == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                   attn_implementation=attention)
        model.config.pad_token_id = tokenizer.pad_token_id
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=LORA["target_modules"], task_type="SEQ_CLS")
        trainer_cls, config = RewardTrainer, RewardConfig(**settings)
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)
        peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        trainer_cls, config = DPOTrainer, DPOConfig(**settings, beta=args.beta)
    clock = StepClock()
    trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft, callbacks=[clock])
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    if len(clock.step_ends) != args.steps or len(counter.tokens) < args.steps:
        raise RuntimeError(f"TRL ran {len(clock.step_ends)} steps / {len(counter.tokens)} batches, expected {args.steps}")
    tokens = counter.tokens[: args.steps]
    return timed_window(clock.step_ends, tokens, tokens, args.warmup)


def child_main(args) -> None:
    framework, kind, *variant = args.child.split("-")
    with tempfile.TemporaryDirectory(prefix=f"bench-pref-{args.child}-") as workdir:
        row = (run_corral if framework == "corral" else run_trl)(args, kind, Path(workdir), *variant)
    write_child_row(row, args.child_result)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    keys = [k for k in args.rows.split(",") if k]
    unknown = set(keys) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-pref-") as workdir:
        for key in keys:
            print(f"running {ROWS[key]} ...", flush=True)
            row = run_row_child(Path(__file__), key, ROWS[key], argv, Path(workdir))
            print(f"  {row['tokens_per_s']:.1f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
            rows[ROWS[key]] = row
    ratios = {}
    for kind in ("reward", "dpo"):
        for label, mine, over in (("trl", f"corral-{kind}", f"trl-{kind}"),
                                  ("two sequences", f"corral-{kind}", f"corral-{kind}-twoseq"),
                                  ("trl defaults", f"corral-{kind}-defaults", f"trl-{kind}-defaults")):
            corral_name, other = ROWS[mine], ROWS[over]
            if corral_name in rows and other in rows:
                for name, metric in (("tokens_per_s", "tokens_per_s"), ("peak_rss", "peak_rss_mb")):
                    ratios[f"corral/{label} {kind} {name}"] = round(rows[corral_name][metric] / rows[other][metric], 3)
    machine = machine_info()
    results = {
        "command": " ".join(["python bench/preference.py", *map(shlex.quote, argv)]),
        "date": datetime.date.today().isoformat(), "machine": machine,
        "versions": versions(("corral", "torch", "transformers", "peft", "trl")),
        "setup": {"model": MODEL, "batch": args.batch, "seq_len": args.max_len,
                  "dtype": "bf16" if on_cuda() else "fp32",
                  "lora": LORA, "steps_timed": args.steps - args.warmup, "warmup": args.warmup,
                  "notes": f"data {DATA} (chatml); batch = pairs per step; tokens = real tokens of chosen + rejected "
                           "sequences, counted as two sequences on every row (Corral's shared-prompt rows run the "
                           "prompt once, so they do less work for the same tokens; TRL: its collator's attention "
                           "masks); TRL rows at fp32 without checkpointing unless 'defaults'; DPO beta "
                           f"{args.beta}; same lr {args.lr}, cosine, AdamW (torch), grad clip 1.0, no warmup, seed {SEED}; "
                           "each row in its own process, one after the other"},
        "rows": [{k: v for k, v in r.items()} for r in rows.values()],
        "ratios": ratios,
    }  # fmt: skip
    out = write_results(results_path("preference", machine["gpu"], args.out), results)
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
