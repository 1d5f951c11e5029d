"""Benchmark: one RL step (rollout + update) of Corral's `corral ppo` against TRL's RLOOTrainer and GRPOTrainer.

    python bench/ppo.py --steps 4 --warmup 1

TRL 1.16 has no PPO trainer any more, so Corral's critic-free modes are measured against TRL's
trainers for the same algorithms, and Corral's PPO step with a critic (advantage=gae) is reported
beside them. Five rows, each in its own fresh child process, one after the other:

  corral rloo lora       corral.recipes.ppo.run with advantage=rloo
  corral grpo lora       the same with advantage=grpo
  corral ppo(gae) lora   the same with advantage=gae (a critic: its own LoRA and value head over the base)
  trl RLOOTrainer lora   trl.RLOOTrainer with peft
  trl GRPOTrainer lora   trl.GRPOTrainer with peft
  corral grpo lora vllm  advantage=grpo with rollout.backend=vllm (CUDA with vllm installed only; not by default
                         elsewhere)

Same model (smollm2-135m), prompts (a fixed list, chatml template), rule-based reward (`reward_fn`
below, (prompt, reply) -> float), prompts per step x samples per prompt, reply length cap, sampling
(temperature 1, top-p 1), LoRA (r 16, alpha 32, dropout 0, all-linear), KL coefficient (nonzero, so
every row computes reference log-probs with the adapter disabled), clip 0.2, one PPO epoch and one
optimizer step per rollout, AdamW, precision (fp32 on CPU, bf16 on CUDA). Per row, over the steps
after `--warmup`: seconds per step (wall time between step ends), generation and training seconds per
step, generation tokens/s (reply tokens / generation time) and training tokens/s (prompt + reply
tokens / the rest of the step), and the child's peak RSS (os.wait4).

Writes bench/results/ppo.json (ppo-<gpu>.json on CUDA) atomically; `--out` writes elsewhere (smoke
runs). `python bench/report.py` turns the results into the README's table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
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
KL_COEF = 0.05  # Corral's kl_coef default and TRL RLOO's beta default; GRPO's default (0) would skip the reference
CLIP = 0.2
LR = 1e-5
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which Corral's recipe uses; TRL's default is 0
SEED = 42
ROWS = {  # key (for --rows and the child) -> row name in the results
    "corral-rloo": "corral rloo lora",
    "corral-grpo": "corral grpo lora",
    "corral-gae": "corral ppo(gae) lora",
    "trl-rloo": "trl RLOOTrainer lora",
    "trl-grpo": "trl GRPOTrainer lora",
    "corral-vllm": "corral grpo lora vllm",
}
PAIRS = {"rloo": ("corral-rloo", "trl-rloo"), "grpo": ("corral-grpo", "trl-grpo")}  # the compared rows

# Open questions, so that replies tend to run to the length cap on every row: a step's cost follows its reply
# lengths, which sampling makes differ between rows (each row's mean is in its `reply_len`).
PROMPTS = [
    "Explain in detail how the tides work.",
    "Describe, step by step, how to bake a loaf of bread.",
    "Write a short story about a lighthouse keeper.",
    "Explain how a compiler turns source code into a program.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main causes of inflation? Explain each.",
    "Write a letter to a friend about your summer holiday.",
    "Explain how vaccines train the immune system.",
    "Describe the history of the bicycle.",
    "Explain the difference between weather and climate.",
    "Write a product description for a new kind of umbrella.",
    "Explain how a neural network learns from examples.",
    "Describe a walk through a busy market in the morning.",
    "Explain why the sky is blue and sunsets are red.",
    "Give advice to someone starting to learn the piano.",
    "Explain how a bill becomes a law in a parliament.",
]


def default_rows() -> list[str]:
    """Every row this machine runs: the vLLM row needs CUDA and the vllm package."""
    import importlib.util

    vllm = on_cuda() and importlib.util.find_spec("vllm") is not None
    return [key for key in ROWS if key != "corral-vllm" or vllm]


def reward_fn(prompt: str, reply: str) -> float:
    """The rule-based reward every row uses: replies near 20 words score best (1 at exactly 20)."""
    return 1.0 - abs(len(reply.split()) - 20) / 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="rollout + update steps per row (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="first steps not timed (default 1, at least 1)")
    p.add_argument("--prompts", type=int, default=4, help=f"prompts per step (default 4, at most {len(PROMPTS)})")
    p.add_argument("--samples", type=int, default=4, help="sampled replies per prompt (default 4, at least 2)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="reply length cap (default 32)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in every row (default 0: torch's own, one per core)")  # fmt: skip
    p.add_argument("--rows", default="", help=f"comma-separated subset of {', '.join(ROWS)} (default: all this "
                   "machine runs; corral-vllm needs CUDA and vllm)")
    p.add_argument("--bf16", action="store_true",
                   help="on CPU, bf16 rows: Corral at dtype=auto and mixed_precision=auto (bf16 autocast over a bf16 "
                        "frozen base where the CPU computes bf16 natively), TRL at bf16=True; results to ppo-bf16.json")
    p.add_argument("--out", default="", help="results path (default bench/results/ppo.json, or ppo-<gpu>.json on CUDA)")
    p.add_argument("--child", choices=sorted(ROWS), help=argparse.SUPPRESS)  # internal: run one row, in this process
    p.add_argument("--child-result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1: the timed window starts at the end of a warmup step")
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    if args.threads < 0:
        p.error("--threads must be 0 (torch's default) or more")
    if args.samples < 2:
        p.error("--samples must be at least 2: rloo and grpo compare the samples of one prompt")
    args.rows = args.rows or ",".join(default_rows())
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    return args


def set_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def sync() -> None:
    """Wait for the GPU before reading the clock, so a stamp holds the work queued before it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def row_figures(step_ends: list[float], gen_s: list[float], reply_tokens: list[int], seq_tokens: list[int],
                warmup: int, samples_per_step: int) -> dict:
    """The row's numbers over the timed steps (warmup+1..N), the same way for Corral and TRL.

    step_ends[i]: when step i+1 ended; gen_s[i]: its generation time; reply_tokens[i]: tokens generated
    (end-of-turn included); seq_tokens[i]: real prompt + reply tokens the update trained on. A step's
    training time is its wall time less its generation time: scoring, old and reference log-probs,
    advantages, the update and whatever the framework does between steps."""
    window = timed_window(step_ends, seq_tokens, reply_tokens, warmup)
    step_s = [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:])]
    timed_gen = gen_s[warmup:]
    train_s = [s - g for s, g in zip(step_s, timed_gen)]
    n = len(step_s)
    return {
        **window,
        "mean_step_s": window["timed_s"] / n,
        "gen_s": sum(timed_gen) / n,
        "train_s": sum(train_s) / n,
        "gen_tok_s": sum(reply_tokens[warmup:]) / sum(timed_gen),
        "train_tok_s": sum(seq_tokens[warmup:]) / sum(train_s),
        "reply_len": sum(reply_tokens[warmup:]) / n / samples_per_step,
        "timed_step_s": step_s,
    }


# ---------------------------------------------------------------------------------------------
# The rows, each run inside its own child process


def write_prompts(path: Path, count: int) -> Path:
    """The first `count` prompts as conversations for Corral's reader, which wants each to end with an
    assistant reply: a placeholder that `prompt_of` strips (the prompt is everything before it)."""
    lines = [json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "-"}]})
             for text in PROMPTS[:count]]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def run_corral_row(args: argparse.Namespace, advantage: str, workdir: Path) -> dict:
    """One Corral row; `advantage` "vllm" is grpo with its rollouts sampled by vLLM."""
    from corral.config import PPOConfig
    from corral.recipes import ppo
    from corral.train.metrics import MetricsLog

    cuda = on_cuda()
    batch = args.prompts * args.samples
    backend = "vllm" if advantage == "vllm" else "transformers"
    advantage = "grpo" if advantage == "vllm" else advantage
    cfg = PPOConfig(
        model=MODEL, template=TEMPLATE, method="lora", reward="bench.ppo:reward_fn", output_dir=str(workdir / "run"),
        dtype="bfloat16" if cuda else ("auto" if args.bf16 else "float32"), advantage=advantage, steps=args.steps,
        rollout={"prompts_per_step": args.prompts, "samples_per_prompt": args.samples, "temperature": 1.0,
                 "max_new_tokens": args.max_new_tokens, "top_p": 1.0, "sample_every": 10**9, "backend": backend},
        kl={"coef": KL_COEF},
        # one optimizer step per rollout, as TRL's with generation batch = train batch
        update={"clip": CLIP, "epochs": 1, "minibatch": batch},
        # fp32 compute on CPU, as TRL's bf16=False rows; --bf16: auto (bf16 autocast on a CPU with native bf16)
        actor={"lr": LR}, train={"seed": SEED, "resume": "never",
                                 "mixed_precision": "auto" if cuda or args.bf16 else "no"},
        data={"path": str(write_prompts(workdir / "prompts.jsonl", args.prompts))}, lora=LORA,
    )  # fmt: skip
    # A step ends when the recipe logs its metrics line: stamp the clock there (the recipe's gen_s and train_s
    # leave out the little it does between steps; the window from one stamp to the next holds everything).
    step_ends: list[float] = []
    original_log = MetricsLog.log

    def stamped_log(self, record):
        original_log(self, record)
        if "gen_s" in record:
            sync()
            step_ends.append(time.perf_counter())

    MetricsLog.log = stamped_log
    try:
        ppo.run(cfg)
    finally:
        MetricsLog.log = original_log
    metrics_path = Path(cfg.output_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = sorted((r for r in records if "gen_s" in r), key=lambda r: r["step"])
    if [r["step"] for r in steps] != list(range(1, args.steps + 1)) or len(step_ends) != args.steps:
        raise RuntimeError(f"{metrics_path}: expected one record per step 1..{args.steps}")
    # The recipe logs rates; the token counts behind them are rate x time (gen_tok_s = reply tokens / gen_s,
    # train_tok_s = prompt + reply tokens x ppo_epochs / train_s, with one epoch here).
    reply_tokens = [round(r["gen_tok_s"] * r["gen_s"]) for r in steps]
    seq_tokens = [round(r["train_tok_s"] * r["train_s"]) for r in steps]
    row = row_figures(step_ends, [r["gen_s"] for r in steps], reply_tokens, seq_tokens, args.warmup, batch)
    row["reward_mean"] = statistics.mean(r["reward_mean"] for r in steps[args.warmup :])
    row["recipe_train_s"] = statistics.mean(r["train_s"] for r in steps[args.warmup :])
    return row


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    """`reward_fn` in TRL's reward-function form (conversational prompts and completions); the reply is
    stripped, as Corral strips its decoded replies."""
    return [reward_fn(p[-1]["content"], c[0]["content"].strip()) for p, c in zip(prompts, completions)]


def run_trl_row(args: argparse.Namespace, kind: str, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template
    from corral.models.load import attention_implementation, resolve_model

    cuda = on_cuda()
    path = resolve_model(MODEL).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = get_template(TEMPLATE, tokenizer)
    tokenizer.chat_template = fmt.chat_template_jinja  # render exactly as Corral
    prompts = [[{"role": "user", "content": text}] for text in PROMPTS[: args.prompts]]
    for messages in prompts:  # guard: TRL's prompt ids are the ones Corral generates from
        trl_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        if list(trl_ids["input_ids"]) != fmt.render(Conversation.from_pairs(("user", messages[0]["content"]))):
            raise RuntimeError(f"TRL renders {messages[0]['content']!r} differently from Corral's {TEMPLATE} template")
    dataset = Dataset.from_list([{"prompt": messages} for messages in prompts])
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation=attention_implementation(
            torch.device("cuda" if cuda else "cpu"))
    )  # fmt: skip

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.step_ends.append(time.perf_counter())

    batch = args.prompts * args.samples
    settings = dict(
        output_dir=str(workdir / "run"), max_steps=args.steps,
        # one rollout of prompts x samples per optimizer step, trained as one batch (as Corral's minibatch = batch)
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.samples, num_iterations=1, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=KL_COEF, epsilon=CLIP, use_vllm=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0,
        optim="adamw_torch", activation_checkpointing=False,  # the new name of gradient_checkpointing (TRL: on)
        bf16=cuda or args.bf16,  # TRL's default; off in the fp32 CPU rows, as Corral's
        use_cpu=not cuda, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, seed=SEED,
        dataloader_num_workers=0,
    )  # fmt: skip
    if kind == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        config, trainer_cls = RLOOConfig(**settings, normalize_advantages=True), RLOOTrainer  # Corral whitens
    else:
        from trl import GRPOConfig, GRPOTrainer

        config, trainer_cls = GRPOConfig(**settings), GRPOTrainer
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    clock = StepClock()
    trainer = trainer_cls(model=model, reward_funcs=trl_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[clock])  # fmt: skip

    # TRL logs no generation time of its own (its profiling contexts only report to trackers): time its
    # `_generate` (chat template, generate, decode: what Corral's gen_s holds), and count the real prompt and
    # reply tokens of each rollout from the batch it hands to the update.
    gen_s: list[float] = []
    reply_tokens: list[int] = []
    seq_tokens: list[int] = []
    original_generate, original_score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(prompts):
        sync()
        started = time.perf_counter()
        out = original_generate(prompts)
        sync()
        gen_s.append(time.perf_counter() - started)
        reply_tokens.append(sum(len(ids) for ids in out[1]))  # (prompt_ids, completion_ids, ...)
        return out

    def counted_score(inputs):
        out = original_score(inputs)
        seq_tokens.append(int(out["prompt_mask"].sum()) + int(out["completion_mask"].sum()))
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_generate, counted_score
    trainer.train()
    if not len(clock.step_ends) == len(gen_s) == len(seq_tokens) == args.steps:
        raise RuntimeError(f"TRL ran {len(clock.step_ends)} steps, {len(gen_s)} rollouts, {len(seq_tokens)} scored "
                           f"batches; expected {args.steps} of each (one rollout per optimizer step)")  # fmt: skip
    row = row_figures(clock.step_ends, gen_s, reply_tokens, seq_tokens, args.warmup, batch)
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    if len(rewards) == args.steps:
        row["reward_mean"] = statistics.mean(rewards[args.warmup :])
    return row


def child_main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    framework, kind = args.child.split("-")
    with tempfile.TemporaryDirectory(prefix=f"bench-ppo-{args.child}-") as workdir:
        if framework == "trl":
            row = run_trl_row(args, kind, Path(workdir))
        else:
            row = run_corral_row(args, kind, Path(workdir))
    write_child_row(row, args.child_result)


# ---------------------------------------------------------------------------------------------
# The parent: one fresh child per row, ratios, results file, table


def make_ratios(rows: dict[str, dict]) -> dict:
    """Per compared pair: the speedup (TRL's seconds per step / Corral's, so 2.0 = Corral twice as fast),
    the generation and training token-rate ratios, and Corral's peak RSS over TRL's."""
    get = lambda key, field: rows.get(ROWS[key], {}).get(field)  # noqa: E731
    ratios = {}
    for kind, (corral, trl) in PAIRS.items():
        for name, numerator, denominator, field in (
            ("step speedup (median)", trl, corral, "median_step_s"),  # seconds: TRL's over Corral's
            ("step speedup (mean)", trl, corral, "mean_step_s"),
            ("gen_tok_s", corral, trl, "gen_tok_s"),
            ("train_tok_s", corral, trl, "train_tok_s"),
            ("peak_rss", corral, trl, "peak_rss_mb"),
        ):
            ratios[f"corral/trl {kind} {name}"] = safe_ratio(get(numerator, field), get(denominator, field))
    return {name: value for name, value in ratios.items() if value is not None}


def setup_notes(args: argparse.Namespace, cuda: bool) -> str:
    precision = ("bf16 weights (Corral dtype=bfloat16; TRL bf16=True)" if cuda else
                 "bf16 on CPU (Corral dtype=auto, mixed_precision=auto: bf16 autocast over a bf16 frozen base on a CPU "
                 "with native bf16; TRL bf16=True: autocast over fp32 weights)" if args.bf16 else
                 "fp32 on CPU (TRL bf16=False)")
    batch = args.prompts * args.samples
    threads = str(args.threads) if args.threads else "torch's default number of"
    return (
        f"One step = one rollout of {args.prompts} prompts x {args.samples} sampled replies (temperature 1, top-p 1, "
        f"at most {args.max_new_tokens} new tokens, stopping at <|im_end|>), scored by bench.ppo:reward_fn (a "
        f"rule-based reward, replies near 20 words best; TRL gets it as a reward function), then one PPO epoch as "
        f"one optimizer step over all {batch} replies (Corral minibatch={batch}; TRL per_device_train_batch_size="
        f"{batch}, steps_per_generation=1, num_iterations=1, gradient_accumulation_steps=1). Prompts: the first "
        f"{args.prompts} of the fixed list in bench/ppo.py, the same every step, rendered with the chatml template "
        f"(no system prompt) in every row (checked token for token for TRL). KL coefficient {KL_COEF} everywhere "
        f"(TRL beta), so every row computes reference log-probs, with the LoRA adapter disabled; clip {CLIP}; lr "
        f"{LR}, AdamW (torch), weight decay {WEIGHT_DECAY}, grad clip 1.0; seed {SEED}; {precision}; gradient "
        f"checkpointing off (TRL defaults it on); vLLM only in the corral grpo lora vllm row (CUDA: the actor's "
        f"adapter saved and loaded into vLLM before each rollout, outside gen_s: in the step's train_s); no TRL "
        f"row uses it. The algorithms as each framework has them: Corral "
        f"rloo / grpo put the KL penalty into the sequence reward, take leave-one-out / group-normalised "
        f"advantages and whiten them, and, with one epoch of one mini-batch as here, take the old log-probs (which "
        f"the KL penalty needs) from the update's own forward, detached, instead of a pass of their own; TRL "
        f"RLOOTrainer computes the same advantages (normalize_advantages=True to match the whitening) but always "
        f"runs a separate no-grad pass for the old log-probs; TRL GRPOTrainer puts a "
        f"per-token KL term into its loss (loss_type dapo, its default) and skips the old log-prob pass when "
        f"generation and update are aligned, as here. Corral ppo(gae) also runs and trains a critic (its own LoRA "
        f"adapter and value head over the actor's frozen base weights) and has no peer in TRL 1.16. "
        f"Timing: the first {args.warmup} step(s) left out; a step's time is the wall time from the end of the "
        f"previous step to its own end (Corral: stamped when the recipe writes the step's metrics line; TRL: "
        f"on_step_end callback{', both after torch.cuda.synchronize()' if cuda else ''}); median_step_s and "
        f"mean_step_s over the timed steps. gen_s: generation time per step (Corral: its metrics' gen_s, around "
        f"sample_replies; TRL: a wrapper around its _generate, which renders the prompts, calls model.generate and "
        f"decodes, the same work); train_s = step time - gen_s (scoring, old and reference log-probs, advantages, "
        f"the update, logging). gen_tok_s = reply tokens (end-of-turn included) / generation time; train_tok_s = "
        f"real prompt + reply tokens / train time (Corral: from its metrics' gen_tok_s x gen_s and train_tok_s x "
        f"train_s; TRL: its completion ids and the prompt_mask + completion_mask of each scored batch). "
        f"tokens_per_s and target_tokens_per_s: prompt + reply, and reply tokens over the whole timed window. "
        f"reply_len: mean reply tokens per sample, which sampling makes differ between rows and which a step's "
        f"cost follows. peak_rss_mb: ru_maxrss of the row's child process (os.wait4), loading included. Each row "
        f"runs in its own fresh child process, one after the other, with "
        f"{threads} torch threads; load_average_before_row is "
        f"the machine's 1-minute load average as each row started (anything above ~0.5 means other work shared "
        f"the cores)."
    )


def print_table(results: dict) -> None:
    setup, machine = results["setup"], results["machine"]
    where = f"{machine['cpu']}, {machine['cores']} cores" + (f", GPU {machine['gpu']}" if machine["gpu"] else "")
    print(f"\nRL step, {setup['model']} LoRA r{setup['lora']['r']}, {setup['prompts_per_step']} prompts x "
          f"{setup['samples_per_prompt']} samples, {setup['max_new_tokens']} new tokens, {setup['dtype']}; "
          f"{setup['steps_timed']} timed steps after {setup['warmup']} warmup; on {where}, "
          f"torch {machine['torch']}")  # fmt: skip
    titles = ("median step s", "gen s", "train s", "gen tok/s", "train tok/s", "reply len", "peak RSS MB")
    header = f"{'row':<22} " + " ".join(f"{t:>13}" for t in titles)
    print(header)
    print("-" * len(header))
    for row in results["rows"]:
        print(f"{row['name']:<22} {row['median_step_s']:>13.2f} {row['gen_s']:>13.2f} {row['train_s']:>13.2f} "
              f"{row['gen_tok_s']:>13.1f} {row['train_tok_s']:>13.1f} {row['reply_len']:>13.1f} "
              f"{row['peak_rss_mb']:>13.0f}")  # fmt: skip
    for name, value in results["ratios"].items():
        print(f"  {name:<42} {value:.2f}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0

    from corral.models.load import resolve_model

    resolve_model(MODEL)  # converts the GGUF once, here, so no row pays for (or measures) the conversion
    cuda = on_cuda()
    set_threads(args.threads)  # machine_info records the threads the rows run with
    machine = machine_info()
    out = results_path("ppo-bf16" if args.bf16 and not cuda else "ppo", machine["gpu"] if cuda else None, args.out)
    rows = []
    load_before = {}  # other work on the machine slows every row, and its threads fight the rows' own
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as workdir:
        for key in args.rows.split(","):
            load_before[ROWS[key]] = round(os.getloadavg()[0], 2)
            if load_before[ROWS[key]] > 0.5:
                print(f"[bench] warning: load average {load_before[ROWS[key]]:.2f} before this row: other work on "
                      "the machine makes the timings noisy", flush=True)  # fmt: skip
            print(f"[bench] {ROWS[key]}: {args.steps} steps in a fresh process ...", flush=True)
            row = run_row_child(Path(__file__), key, ROWS[key], argv, Path(workdir))
            print(f"[bench] {ROWS[key]}: {row['median_step_s']:.2f} s/step (generation {row['gen_s']:.2f} s), "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB ({row['process_wall_s']:.0f} s in all)",
                  flush=True)  # fmt: skip
            rows.append(row)
    first = ("name", "median_step_s", "mean_step_s", "gen_s", "train_s", "gen_tok_s", "train_tok_s", "reply_len",
             "peak_rss_mb", "tokens_per_s", "target_tokens_per_s", "steps")  # the headline fields, then the rest
    ordered = [{k: row[k] for k in first if k in row} | {k: v for k, v in row.items() if k not in first}
               for row in rows]  # fmt: skip
    results = {
        "command": shlex.join(["python", "bench/ppo.py", *argv]),
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "setup": {
            "model": MODEL,
            "lora": LORA,
            "dtype": "bf16" if cuda else ("bf16 autocast (--bf16)" if args.bf16 else "fp32"),
            "prompts_per_step": args.prompts,
            "samples_per_prompt": args.samples,
            "max_new_tokens": args.max_new_tokens,
            "decoding": "sampling, temperature 1.0, top_p 1.0",
            "kl_coef": KL_COEF,
            "lr": LR,
            "steps": args.steps,
            "warmup": args.warmup,
            "steps_timed": args.steps - args.warmup,
            "load_average_before_row": load_before,
            "goal": "corral/trl step speedup >= 2 for rloo and grpo",
            "versions": versions(("corral", "torch", "transformers", "peft", "accelerate", "trl")),
            "notes": setup_notes(args, cuda),
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
