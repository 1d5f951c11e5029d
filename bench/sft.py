"""Benchmark: Corral's LoRA SFT (packed and unpacked) against TRL's SFTTrainer, same data and shapes.

    python bench/sft.py --steps 20

Rows, each trained in its own fresh child process, one after the other (never concurrently):

  corral lora packed fp32       corral.recipes.sft.run with data.pack=true, dtype float32, mixed_precision no
  corral lora unpacked fp32     the same with data.pack=false
  corral lora packed auto       data.pack=true at Corral's defaults (dtype and mixed_precision auto: bf16
                                autocast over a bf16 base where the CPU computes bf16 natively, else fp32)
  corral lora unpacked auto     the same with data.pack=false
  trl SFTTrainer lora fp32      trl.SFTTrainer on prompt/completion pairs built from the same conversations
  trl SFTTrainer lora bf16      the same with bf16=True (autocast over its fp32 weights)
  trl SFTTrainer lora defaults  TRL's own defaults for precision and memory: bf16 (True unless fp16) and
                                gradient checkpointing (on)

Same model (smollm2-135m), LoRA (r 16, alpha 32, dropout 0, all-linear), sequence length, batch,
gradient accumulation, optimizer (torch AdamW), learning rate and schedule. Ratios: each Corral row
against TRL at matched precision (fp32 rows; bf16: Corral auto where it resolved to bf16, TRL bf16)
and at each one's defaults (Corral auto, TRL defaults). Per row: real (non-padding) input tokens per
second and trained (target) tokens per second over the steps after `--warmup`, the child's peak RSS
(kernel-tracked `ru_maxrss` of that one child, from os.wait4), which covers loading, data preparation
and training, and that peak per token of a step (a packed step holds about batch x seq_len tokens).

Writes bench/results/sft.json (sft-<gpu>.json on CUDA) atomically; `--out` writes elsewhere (smoke
runs). `python bench/report.py` turns the results into the README's table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout's corral, installed or not

from bench.common import (  # noqa: E402
    machine_info, on_cuda, results_path, run_row_child, safe_ratio, timed_window, versions, write_child_row,
    write_results)

MODEL = "smollm2-135m"
TEMPLATE = "chatml"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
WARMUP_RATIO = 0.03  # of the steps, for the learning-rate schedule (Corral's default); TRL gets the same step count
SEED = 42
ROWS = {  # key (for --rows and the child) -> row name in the results
    "corral-packed": "corral lora packed fp32",
    "corral-unpacked": "corral lora unpacked fp32",
    "corral-packed-auto": "corral lora packed auto",
    "corral-unpacked-auto": "corral lora unpacked auto",
    "trl": "trl SFTTrainer lora fp32",
    "trl-bf16": "trl SFTTrainer lora bf16",
    "trl-defaults": "trl SFTTrainer lora defaults",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per row (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2, at least 1)")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length: max_len / max_length (default 512)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--data", default="builtin:corral_identity", help="conversations (default: %(default)s)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--out", default="", help="results path (default bench/results/sft.json, or sft-<gpu>.json on CUDA)")
    p.add_argument("--child", choices=sorted(ROWS), help=argparse.SUPPRESS)  # internal: run one row, in this process
    p.add_argument("--child-result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1: the timed window starts at the end of a warmup step")
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    return args


# ---------------------------------------------------------------------------------------------
# The rows, each run inside its own child process


def run_corral_row(args: argparse.Namespace, pack: bool, workdir: Path, auto: bool) -> dict:
    """`auto`: dtype and mixed_precision at their defaults; else fp32 weights and compute."""
    from corral.config import DataConfig, LoraConfig, SFTConfig, TrainConfig
    from corral.recipes import sft

    cfg = SFTConfig(
        model=MODEL, template=TEMPLATE, method="lora", output_dir=str(workdir / "run"),
        dtype="auto" if auto else "float32",
        data=DataConfig(path=args.data, pack=pack),
        train=TrainConfig(
            max_steps=args.steps, lr=args.lr, batch_size=args.batch, grad_accum=args.grad_accum, max_len=args.seq_len,
            schedule="cosine", warmup_ratio=WARMUP_RATIO, weight_decay=0.0, max_grad_norm=1.0,
            mixed_precision="auto" if auto else "no", log_every=1, resume="never", seed=SEED,
        ),
        lora=LoraConfig(
            r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=LORA["target_modules"]
        ),
    )  # fmt: skip
    result = sft.run(cfg)
    records = [json.loads(line) for line in Path(result.summary["metrics"]).read_text().splitlines() if line.strip()]
    steps = sorted((r for r in records if "tokens_per_s" in r), key=lambda r: r["step"])
    if [r["step"] for r in steps] != list(range(1, args.steps + 1)):
        raise RuntimeError(f"{Path(result.summary['metrics'])}: expected one record per step 1..{args.steps}")
    # seen_tokens is cumulative, so a step's tokens are the difference; elapsed_s is taken at the
    # end of each step, after its loss.item() (which waits for the GPU).
    seen = [0] + [r["seen_tokens"] for r in steps]
    tokens = [b - a for a, b in zip(seen, seen[1:])]
    row = timed_window([r["elapsed_s"] for r in steps], tokens, [r["target_tokens"] for r in steps], args.warmup)
    precision = steps[0]["precision"]  # what the run computed and stored in, from its first record
    compute = "bf16" if precision["mixed_precision"] == "bf16" else "fp32"
    return {**row, "precision": f"{compute} (base {precision['frozen_weights']})", "compute": compute,
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"]}


def prompt_completion_pairs(conversations: list, fmt) -> list[dict]:
    """One pair per conversation: everything before the last assistant reply is the prompt (chatml,
    ending with the generation prompt), the last reply plus its end-of-turn is the completion."""
    from corral.chat.conversation import Conversation

    pairs = []
    for conv in conversations:
        *before, last = conv.messages
        if last.role != "assistant":
            raise ValueError(f"{conv.source}: the conversation does not end with an assistant reply")
        prompt = fmt.render_text(Conversation(before), add_generation_prompt=True)
        completion = last.content + "<|im_end|>"
        # Guard: the pair must be exactly the start of what Corral renders for training.
        if not fmt.render_text(conv, add_generation_prompt=False).startswith(prompt + completion):
            raise ValueError(f"{conv.source}: prompt + completion is not a prefix of the chatml rendering")
        pairs.append({"prompt": prompt, "completion": completion})
    return pairs


def run_trl_row(args: argparse.Namespace, workdir: Path, precision: str) -> dict:
    """`precision`: fp32, bf16 (autocast, gradient checkpointing off as in Corral's rows) or defaults (TRL's own
    bf16 and gradient checkpointing)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from corral.chat.templates import IGNORE_INDEX, get_template
    from corral.data.formats import read_conversations
    from corral.models.load import attention_implementation, resolve_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    path = resolve_model(MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = get_template(TEMPLATE, tokenizer)
    tokenizer.chat_template = fmt.chat_template_jinja  # unused for plain-text pairs, but the same template if asked
    conversations, _ = read_conversations(args.data)
    dataset = Dataset.from_list(prompt_completion_pairs(conversations, fmt))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation=attention_implementation(device)
    )

    class StepClock(TrainerCallback):
        """Wall-clock time at the end of every optimizer step (after a GPU sync, as Corral's loss.item()).

        Trainer fetches and collates a step's batches before on_step_begin, so begin-to-end would leave
        out data work that Corral's step time holds; end-to-end windows hold everything, in both.
        on_step_begin only checks that the steps do not overlap.
        """

        def __init__(self):
            self.step_ends: list[float] = []
            self.step_begins: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.step_ends.append(time.perf_counter())

    class CountingCollator:
        """TRL's own collator, counting real tokens (attention mask) and trained tokens of each batch."""

        def __init__(self, collate):
            self.collate = collate
            self.tokens: list[int] = []
            self.targets: list[int] = []

        def __call__(self, examples):
            batch = self.collate(examples)
            self.tokens.append(int(batch["attention_mask"].sum()))
            # labels[:, 0] is never predicted (no token before it); Corral counts shifted targets the same way
            self.targets.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
            return batch

    config = SFTConfig(
        output_dir=str(workdir / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=round(WARMUP_RATIO * args.steps), weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        packing=False, completion_only_loss=True, max_length=args.seq_len, use_cpu=not cuda,
        eval_strategy="no", save_strategy="no", report_to="none", seed=SEED, dataloader_num_workers=0, logging_steps=1,
        # activation_checkpointing: the new name of gradient_checkpointing
        **({} if precision == "defaults" else {"activation_checkpointing": False, "bf16": precision == "bf16"}),
    )  # fmt: skip
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    clock = StepClock()
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[clock],
    )  # fmt: skip
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter  # the train dataloader is built in train(), from this attribute
    trainer.train()
    if len(clock.step_ends) != args.steps or len(clock.step_begins) != args.steps:
        raise RuntimeError(f"TRL ran {len(clock.step_ends)} steps, expected {args.steps}")
    if any(b < e for b, e in zip(clock.step_begins[1:], clock.step_ends)):
        raise RuntimeError("TRL steps overlap: a step began before the previous one ended")
    # Batches are collated in training order (possibly one ahead): micro-batch i belongs to step i // accum.
    accum = args.grad_accum
    n = args.steps * accum
    tokens = [sum(counter.tokens[s * accum : (s + 1) * accum]) for s in range(args.steps)]
    targets = [sum(counter.targets[s * accum : (s + 1) * accum]) for s in range(args.steps)]
    if len(counter.tokens) < n:
        raise RuntimeError(f"counted {len(counter.tokens)} batches, expected at least {n}")
    row = timed_window(clock.step_ends, tokens, targets, args.warmup)
    compute = "bf16" if config.bf16 else "fp32"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {**row, "precision": f"{compute} (base {str(model.dtype).removeprefix('torch.')})"
            + (", gradient checkpointing" if config.gradient_checkpointing else ""), "compute": compute,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def child_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-sft-{args.child}-") as workdir:
        if args.child.startswith("trl"):
            row = run_trl_row(args, Path(workdir), args.child.removeprefix("trl").removeprefix("-") or "fp32")
        else:
            row = run_corral_row(args, pack="-packed" in args.child, workdir=Path(workdir),
                                 auto=args.child.endswith("-auto"))
    write_child_row(row, args.child_result)


# ---------------------------------------------------------------------------------------------
# The parent: one fresh child per row, setup facts, results file, table


def run_child(key: str, args: argparse.Namespace, argv: list[str], workdir: Path) -> dict:
    return run_row_child(Path(__file__), key, ROWS[key], argv, workdir)


def data_facts(args: argparse.Namespace) -> dict:
    """What each row trains on, counted with the same tokenizer and template the rows use."""
    from corral.chat.templates import get_template
    from corral.data.clean import conversations_to_samples
    from corral.data.formats import read_conversations
    from corral.data.pack import pack_rows
    from corral.models.load import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    fmt = get_template(TEMPLATE, tokenizer)
    conversations, _ = read_conversations(args.data)
    samples, split = conversations_to_samples(conversations, fmt, args.seq_len)
    pairs = prompt_completion_pairs(conversations, fmt)
    trl_tokens = trl_targets = trl_truncated = 0
    for pair in pairs:
        n_prompt = len(tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"])
        n_all = len(tokenizer(pair["prompt"] + pair["completion"], add_special_tokens=False)["input_ids"])
        trl_truncated += n_all > args.seq_len
        trl_tokens += min(n_all, args.seq_len)
        trl_targets += max(0, min(n_all, args.seq_len) - n_prompt)
    return {
        "conversations": len(conversations),
        "multi_turn": sum(len(c.turns) > 2 for c in conversations),
        "corral_samples": len(samples),
        "corral_split": split.split,
        "corral_truncated": split.truncated,
        "corral_tokens": sum(len(s.input_ids) for s in samples),
        "corral_targets": sum(s.num_targets for s in samples),
        "corral_packed_rows": len(pack_rows(samples, args.seq_len)),
        "trl_pairs": len(pairs),
        "trl_truncated": trl_truncated,
        "trl_tokens": trl_tokens,
        "trl_targets": trl_targets,
    }


def make_ratios(rows: dict[str, dict]) -> dict:
    """Corral against TRL at matched precision (fp32 rows; bf16: Corral's auto rows where auto resolved to bf16)
    and at each one's defaults (Corral auto, TRL defaults): tokens/s, trained tokens/s, peak RSS per step token;
    and what bf16 gives each framework over its fp32 row."""
    get = lambda key, field: rows.get(ROWS[key], {}).get(field)  # noqa: E731
    auto_bf16 = {key: get(key, "compute") == "bf16" for key in ("corral-packed-auto", "corral-unpacked-auto")}
    comparisons = {}  # label -> (corral row, trl row)
    for layout in ("packed", "unpacked"):
        comparisons[f"corral {layout}/trl fp32"] = (f"corral-{layout}", "trl")
        if auto_bf16[f"corral-{layout}-auto"]:
            comparisons[f"corral {layout}/trl bf16"] = (f"corral-{layout}-auto", "trl-bf16")
        comparisons[f"corral {layout} auto/trl defaults"] = (f"corral-{layout}-auto", "trl-defaults")
    pairs = {}
    for label, (a, b) in comparisons.items():
        for field in ("tokens_per_s", "target_tokens_per_s", "peak_rss_mb_per_step_token"):
            pairs[f"{label} {field}"] = (a, b, field)
    pairs |= {
        "corral packed auto/fp32 tokens_per_s": ("corral-packed-auto", "corral-packed", "tokens_per_s"),
        "corral unpacked auto/fp32 tokens_per_s": ("corral-unpacked-auto", "corral-unpacked", "tokens_per_s"),
        "trl bf16/fp32 tokens_per_s": ("trl-bf16", "trl", "tokens_per_s"),
        "corral packed auto/fp32 peak_rss": ("corral-packed-auto", "corral-packed", "peak_rss_mb"),
        "packed/unpacked fp32 tokens_per_s": ("corral-packed", "corral-unpacked", "tokens_per_s"),
    }
    ratios = {name: safe_ratio(get(a, field), get(b, field)) for name, (a, b, field) in pairs.items()}
    return {name: value for name, value in ratios.items() if value is not None}


def setup_notes(args: argparse.Namespace, facts: dict, cuda: bool) -> str:
    precision = ("precision per row (fp32 rows: fp32 weights and compute; Corral auto: what dtype=auto and "
                 "mixed_precision=auto pick on this machine, see the row's precision; TRL bf16: bf16=True, autocast "
                 "over its fp32 weights; TRL defaults: its bf16 and gradient checkpointing defaults)")
    return (
        f"Data: {args.data}, {facts['conversations']} conversations ({facts['multi_turn']} multi-turn), rendered with "
        f"the chatml template (no default system prompt) for every row. Corral trains every assistant reply: "
        f"{facts['corral_samples']} samples, {facts['corral_tokens']} tokens, {facts['corral_targets']} trained "
        f"({facts['corral_split']} conversations split at turn boundaries, {facts['corral_truncated']} truncated at "
        f"seq_len); packed, they fill {facts['corral_packed_rows']} rows of at most {args.seq_len} tokens. "
        f"TRL gets one prompt/completion pair per conversation (its assistant_only_loss refuses SmolLM2's template): "
        f"prompt = the chatml rendering up to and including '<|im_start|>assistant\\n' of the last reply (for "
        f"multi-turn conversations, every earlier turn is prompt), completion = last reply + '<|im_end|>'; "
        f"{facts['trl_pairs']} pairs, {facts['trl_tokens']} tokens, {facts['trl_targets']} trained "
        f"({facts['trl_truncated']} truncated at max_length). So TRL trains fewer tokens per conversation (only the "
        f"last reply), and Corral's sequences carry one more untrained token (the newline after '<|im_end|>'). "
        f"Each row runs in its own fresh child process, one after the other; {precision}; attention sdpa "
        f"(flash-attention-2 where Corral would pick it). Same LoRA, lr {args.lr}, cosine schedule with "
        f"{round(WARMUP_RATIO * args.steps)} warmup steps, torch AdamW (TRL's optim='adamw_torch'; its default is the "
        f"fused variant), weight decay 0, grad clip 1.0, seed {SEED}, gradient checkpointing off in every row but TRL "
        f"defaults (TRL defaults it on; Corral off). Data order: each framework's own seeded shuffle. "
        f"TRL otherwise at its defaults: no packing, completion_only_loss, padding to the longest in the batch, "
        f"fused LM-head loss with per-step entropy/accuracy metrics; no eval, no saving, report_to none. "
        f"Throughput: the first {args.warmup} steps are left out; tokens_per_s = real (non-padding) input tokens of "
        f"the timed steps / wall time from the end of the last warmup step to the end of the last step (so data "
        f"loading and logging between steps count); target_tokens_per_s = trained tokens over the same time. Corral: "
        f"from its metrics.jsonl (seen_tokens, target_tokens, elapsed_s per step). TRL: a TrainerCallback stamps "
        f"on_step_end{' after torch.cuda.synchronize()' if cuda else ''}; a wrapper around TRL's collator counts "
        f"attention-mask and label tokens per batch. peak_rss_mb: ru_maxrss of the row's child process (os.wait4), "
        f"which includes model loading and data preparation. Peak memory grows with the tokens in a step: a packed "
        f"step holds about batch x seq_len tokens, an unpacked one batch x its longest sample (see tokens_per_step); "
        f"peak_rss_mb_per_step_token = peak_rss_mb / tokens_per_step (the fixed part, the model and the Python "
        f"process, is in it too, so it favours big steps). first_loss / last_loss: the logged loss of the first and "
        f"last step (Corral: per target token of the step; TRL: its logged mean)."
    )


def print_table(results: dict) -> None:
    setup, machine = results["setup"], results["machine"]
    where = f"{machine['cpu']}, {machine['cores']} cores" + (f", GPU {machine['gpu']}" if machine["gpu"] else "")
    print(f"\nSFT throughput, {setup['model']} LoRA r{setup['lora']['r']}, seq_len {setup['seq_len']}, batch "
          f"{setup['batch']} x accum {setup['grad_accum']}, {setup['dtype']}; {setup['steps_timed']} timed steps "
          f"after {setup['warmup']} warmup; on {where}, torch {machine['torch']}")  # fmt: skip
    titles = ("tokens/s", "trained tok/s", "peak RSS MB", "MB/step tok", "tokens/step", "median step s")
    header = f"{'row':<30} {'precision':<40} " + " ".join(f"{t:>13}" for t in titles)
    print(header)
    print("-" * len(header))
    for row in results["rows"]:
        print(f"{row['name']:<30} {row['precision']:<40} {row['tokens_per_s']:>13.1f} "
              f"{row['target_tokens_per_s']:>13.1f} "
              f"{row['peak_rss_mb']:>13.0f} {row['peak_rss_mb_per_step_token']:>13.2f} {row['tokens_per_step']:>13.0f} "
              f"{row['median_step_s']:>13.3f}")  # fmt: skip
    for name, value in results["ratios"].items():
        print(f"  {name:<42} {value:.2f}")
    print("tokens/s: real (non-padding) input tokens / wall time of the timed steps; trained tok/s: target tokens; "
          "peak RSS: each row's own child process.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0

    from corral.models.load import resolve_model

    resolve_model(MODEL)  # converts the GGUF once, here, so no row pays for (or measures) the conversion
    cuda = on_cuda()
    machine = machine_info()
    out = results_path("sft", machine["gpu"] if cuda else None, args.out)
    facts = data_facts(args)
    keys = args.rows.split(",")
    load_before = os.getloadavg()  # other work on the machine while the rows ran shows here
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as workdir:
        for key in keys:
            print(f"[bench] {ROWS[key]}: {args.steps} steps in a fresh process ...", flush=True)
            row = run_child(key, args, argv, Path(workdir))
            row["peak_rss_mb_per_step_token"] = row["peak_rss_mb"] / row["tokens_per_step"]
            print(f"[bench] {ROWS[key]}: {row['tokens_per_s']:.1f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB "
                  f"({row['process_wall_s']:.0f} s in all)", flush=True)  # fmt: skip
            rows.append(row)
    first = ("name", "precision", "tokens_per_s", "target_tokens_per_s", "peak_rss_mb", "peak_rss_mb_per_step_token",
             "steps")  # the schema's fields, then extras
    ordered = [{k: row[k] for k in first} | {k: v for k, v in row.items() if k not in first} for row in rows]
    results = {
        "command": shlex.join(["python", "bench/sft.py", *argv]),
        "date": datetime.date.today().isoformat(),
        "machine": {**machine, "load_avg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "setup": {
            "model": MODEL,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "grad_accum": args.grad_accum,
            "lora": LORA,
            "dtype": "per row (precision)",
            "lr": args.lr,
            "steps": args.steps,
            "warmup": args.warmup,
            "steps_timed": args.steps - args.warmup,
            "data": args.data,
            "data_facts": facts,
            "versions": versions(),
            "notes": setup_notes(args, facts, cuda),
        },
        "rows": ordered,
        "ratios": make_ratios({row["name"]: row for row in rows}),
    }
    write_results(out, results)
    print_table(results)
    print(f"\nwrote {out}" + ("" if args.out else "; run python bench/report.py to update README.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
