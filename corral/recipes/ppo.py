"""`corral ppo`: RLHF from prompts, a reward (a reward model or a Python function) and an SFT actor.

Each step: sample replies from the live actor through the generation engine, score them, compute
reference log-probs, rewards with the KL penalty and advantages (GAE with a critic started from the
reward model, or rloo / grpo), then clipped-PPO epochs over mini-batches; optional pretraining mix
(ptx) and an EMA of the actor. The roles and how they share one copy of the base are in
`train/ppo/roles.py`; the step's math in `train/ppo/step.py`; optimizers, schedules, clipping, mixed
precision, checkpoints and resume are the shared harness's (`train/harness.py`), as for every recipe.

Data parallel (accelerate): each process samples and scores its share of the step's prompts; the
samples are gathered so every process holds the step's whole experience, and each mini-batch's rows
are split over the processes (`ppo_update`), which makes N processes compute the one-process update.
"""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import time
from pathlib import Path

import torch

from corral.atomic import append_line, atomic_dir, atomic_write_text, read_jsonl
from corral.chat.conversation import Conversation
from corral.chat.templates import get_template
from corral.config import PPOConfig
from corral.generate.sampling import SamplingParams
from corral.models.forward import unwrap
from corral.models.load import load_tokenizer, resolve_dtype, resolve_model
from corral.recipes.runs import RecipeResult, begin_run, data_of, saver, system_prompt_policy
from corral.train.harness import Harness
from corral.train.loop import StepPlan, optim_values
from corral.train.metrics import MetricsLog, plot_panels
from corral.train.ppo.advantages import KLController
from corral.train.ppo.ema import EMA
from corral.train.ppo.ptx import PtxBatches
from corral.train.ppo.roles import LoraSettings, build_roles, score_samples
from corral.train.ppo.rollout import gather_samples, sample_replies
from corral.train.ppo.step import PPOSettings, make_experience, ppo_update


def run(cfg: PPOConfig) -> RecipeResult:
    run_ = begin_run(cfg, "ppo")
    accelerator, out, main, log = run_.accelerator, run_.out, run_.main, run_.log
    rank, world = accelerator.process_index, accelerator.num_processes
    check_batch_shapes(cfg, world)
    check_scale_out(cfg, accelerator)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.template, tokenizer)
    prompts = read_rl_prompts(cfg, template, log)
    roles = build_roles(cfg.model, cfg.reward, method=cfg.method, dtype=cfg.dtype, lora=LoraSettings(**cfg.lora.model_dump()),
                        with_critic=cfg.advantage == "gae", pad_id=tokenizer.pad_token_id, log=log,
                        mixed_precision=accelerator.mixed_precision)  # fmt: skip
    log(f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.samples_per_prompt} samples per step, world size {world}")

    card = {"title": f"Corral PPO ({cfg.advantage}, {cfg.method}) of {cfg.model}", "recipe": "corral ppo",
            "reward": cfg.reward, "data": data_of(cfg.data)}
    save = saver(tokenizer, template, card)
    harness = Harness(accelerator, out, save_total_limit=cfg.train.save_total_limit, resume=cfg.train.resume,
                      report_to=cfg.train.report_to, config=cfg.model_dump(mode="json"))  # fmt: skip
    actor, critic = add_trained(harness, roles, save, cfg)
    ema = EMA(unwrap(actor.model), cfg.actor.ema_decay) if cfg.actor.ema_decay else None
    kl = KLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    harness.track(kl, ema)
    ptx = make_ptx(cfg, template, tokenizer.pad_token_id, log)
    rollout = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    engine, sync = make_rollout_engine(cfg, unwrap(actor.model), tokenizer, rollout // world, out)
    rows_per_forward = max(1, cfg.update.minibatch // world)  # the update's own forward size, with a graph
    settings = PPOSettings(advantage=cfg.advantage, **cfg.update.model_dump(exclude={"no_eos_penalty"}))
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p)  # fmt: skip
    # Which prompts a step samples is a function of the step alone, so resuming needs nothing but the step.
    plan = StepPlan(len(prompts), cfg.rollout.prompts_per_step // world, 1, world, cfg.train.seed)
    start_step = harness.resume()
    samples_log = SamplesLog(out / "samples.jsonl", start_step, main)

    from tqdm import tqdm

    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc="ppo", disable=not main, dynamic_ncols=True)
    for step in bar:
        mine = plan.micro_batches(step - 1, rank)[0]
        first = rank * len(mine)  # this process's first slot among the step's prompts
        seeds = [cfg.train.seed * 1_000_003 + step * 10_007 + first + j for j in range(len(mine))]
        adapter = sync(step) if sync is not None else None
        t0 = time.perf_counter()
        # Under the run's autocast, as training: a LoRA actor over a bf16 frozen base (`frozen_dtype` on a CPU that
        # computes bf16) with its fp32 adapter gave the engine fp32 hidden states against the bf16 output head
        # ("expected m1 and m2 to have the same dtype" outside autocast; tested).
        with accelerator.autocast():
            samples = sample_replies(engine, template, [prompts[i] for i in mine], params,
                                     k=cfg.rollout.samples_per_prompt, seeds=seeds, adapter=adapter)
        t1 = time.perf_counter()
        scores = gather_scores(score_samples(roles.scorer, samples, cfg.update.no_eos_penalty), world)
        samples = gather_samples(samples, accelerator)
        with accelerator.autocast():
            exp = make_experience(actor.model, samples, scores, kl, settings, tokenizer.pad_token_id,
                                  ref_model=roles.ref_model, critic=critic.model if critic else None,
                                  rows_per_forward=rows_per_forward)  # fmt: skip
            stats = ppo_update(actor.model, actor.step, exp, settings, critic=critic.model if critic else None,
                               critic_step=critic.step if critic else None, accelerator=accelerator,
                               ptx_fn=(lambda key, r, w, s=step: ptx(actor.model, s * 1000 + key, r, w)) if ptx else None,
                               ptx_coef=cfg.ptx.coef, generator=torch.Generator().manual_seed(cfg.train.seed * 7919 + step))  # fmt: skip
        t2 = time.perf_counter()
        if ema is not None:
            ema.update(unwrap(actor.model))
        stats = {**exp.stats, **stats, "lr": actor.lr, **({"critic_lr": critic.lr} if critic else {})}
        kl.update(stats["kl"], len(samples))
        harness.metrics.log({"step": step, **stats, **timings(exp, samples, t0, t1, t2, settings.epochs)})
        bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.3f}")
        if step == 1 or step % cfg.rollout.sample_every == 0 or step == cfg.steps:
            samples_log.write(step, samples, scores)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.steps:
            checkpoint(harness, step, cfg)
    bar.close()
    if hasattr(engine, "close") and sync is not None:  # vLLM: its engine process and GPU memory
        engine.close()
    checkpoint(harness, cfg.steps, cfg)
    if main:  # the actor, and its EMA, as loadable folders (an adapter over the original base, or a full model)
        last = harness.metrics.read()[-1]
        card["metrics"] = {"steps": last["step"], "reward (last step)": last["reward_mean"], "KL (last step)": last["kl"]}
        save(unwrap(actor.model), out / "actor")
        if ema is not None:
            with ema.applied(unwrap(actor.model)) as averaged:
                save(averaged, out / "actor_ema")
    accelerator.wait_for_everyone()
    harness.close()
    return RecipeResult(out / "actor", summarize(harness.metrics, roles, out, ema is not None, log))


def add_trained(harness: Harness, roles, save, cfg: PPOConfig):
    """The actor (and the critic) on the harness, each with its optimizer and schedule. A schedule counts optimizer
    steps: steps x epochs x mini-batches per rollout."""
    rollout = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    updates = cfg.steps * cfg.update.epochs * math.ceil(rollout / cfg.update.minibatch)
    rows = max(1, cfg.update.minibatch // harness.accelerator.num_processes)  # per process and backward
    actor = harness.add("model", roles.actor, save=save, total_steps=updates, micro_batch=rows,
                        **optim_values(cfg.actor))
    if roles.critic is None:
        return actor, None
    # The checkpoint's critic/ folder is the score model inside the Critic wrapper: a standard folder.
    critic = harness.add("critic", roles.critic, save=save, total_steps=updates, micro_batch=rows,
                         weights=lambda c: c.model, **optim_values(cfg.critic))  # fmt: skip
    return actor, critic


def make_ptx(cfg: PPOConfig, template, pad_id: int, log) -> PtxBatches | None:
    if not (cfg.ptx.path and cfg.ptx.coef):
        return None
    return PtxBatches(cfg.ptx.path, data_format=cfg.ptx.format, skip_invalid=cfg.ptx.skip_invalid, template=template,
                      max_len=cfg.ptx.max_len, batch=cfg.ptx.batch, seed=cfg.train.seed, pad_id=pad_id, log=log)


def check_batch_shapes(cfg: PPOConfig, world: int) -> None:
    if cfg.advantage in ("rloo", "grpo") and cfg.rollout.samples_per_prompt < 2:
        raise ValueError(f"advantage={cfg.advantage} needs rollout.samples_per_prompt >= 2")
    rollout = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    if world > 1 and (cfg.rollout.prompts_per_step % world or cfg.update.minibatch % world or rollout % cfg.update.minibatch):
        raise ValueError(f"with {world} processes, rollout.prompts_per_step ({cfg.rollout.prompts_per_step}) and "
                         f"update.minibatch ({cfg.update.minibatch}) must be multiples of {world}, and prompts x "
                         f"samples ({rollout}) a multiple of update.minibatch")  # fmt: skip
    if cfg.ptx.coef and cfg.ptx.path and cfg.ptx.batch % world:
        raise ValueError(f"ptx.batch ({cfg.ptx.batch}) must be a multiple of the {world} processes")
    if cfg.rollout.backend == "vllm" and world > 1:
        raise ValueError(f"rollout.backend=vllm runs in one process (got {world}): every process's vLLM would start on "
                         "the same GPU and sync its adapter into the same folder; run PPO in one process, or with "
                         "rollout.backend=transformers under accelerate launch")  # fmt: skip


def check_scale_out(cfg: PPOConfig, accelerator) -> None:
    """PPO runs as one process or under DDP. FSDP would shard the actor's base weights, which the reference, reward
    model and critic read as they are (they share that one copy); DeepSpeed prepares one trained model per run, and
    PPO trains the actor and a critic."""
    from corral.train.harness import weights_sharded

    if weights_sharded(accelerator):
        raise ValueError(f"corral ppo runs in one process or data-parallel (accelerate launch --multi_gpu), not "
                         f"under {accelerator.distributed_type.value}: its roles share one unsharded copy of the base "
                         "weights")


def prompt_of(conv: Conversation) -> Conversation | None:
    """Everything before the last assistant turn (a conversation ending with a user turn is all prompt)."""
    messages = list(conv.messages)
    while messages and messages[-1].role == "assistant":
        messages.pop()
    return Conversation(messages, conv.source, conv.id) if messages and messages[-1].role == "user" else None


def read_rl_prompts(cfg: PPOConfig, template, log) -> list[Conversation]:
    from functools import partial

    from corral.data.formats import read_conversations
    from corral.data.mix import load_records

    reader = partial(read_conversations, data_format=cfg.data.format, skip_invalid=cfg.data.skip_invalid,
                     need_reply=False)  # fmt: skip
    convs = load_records(reader, cfg.data.path, cfg.data.sources, cfg.data.mix_seed, cfg.data.split,
                         cfg.data.split_stage, cfg.data.split_seed, log)  # fmt: skip
    as_seen = system_prompt_policy(template, cfg.data.template_system, log)
    prompts, too_long = [], 0
    for conv in convs:
        prompt = prompt_of(conv)
        if prompt is None:
            continue
        prompt = as_seen(prompt)
        if len(template.render(prompt)) > cfg.data.max_prompt_len:
            too_long += 1
            continue
        prompts.append(prompt)
    log(f"{len(prompts)} prompts" + (f"; dropped {too_long} longer than data.max_prompt_len" if too_long else ""))
    if not prompts:
        raise ValueError(f"no prompts left from {cfg.data.path or 'data.sources'}")
    return prompts


def make_rollout_engine(cfg: PPOConfig, actor, tokenizer, max_batch: int, out: Path):
    """Corral's engine on the live actor (no weight copy), or vLLM (CUDA) synced with the actor's adapter."""
    if cfg.rollout.backend == "transformers":
        from corral.generate.engine import TransformersEngine

        return TransformersEngine(actor, tokenizer, max_batch=max_batch), None
    from corral.generate.vllm import VLLMEngine

    if cfg.method != "lora":
        raise ValueError("rollout.backend=vllm needs method=lora: the actor is synced to vLLM as a LoRA adapter")
    # vLLM samples in the actor's own dtype (its `auto` would pick fp16 for a float32 checkpoint); its LoRA kernels
    # have no float32.
    dtype = str(resolve_dtype(cfg.dtype)).removeprefix("torch.")
    if dtype == "float32":
        raise ValueError("rollout.backend=vllm needs dtype=bfloat16 or float16 (vLLM's LoRA kernels have no float32)")
    engine = VLLMEngine(resolve_model(cfg.model).path, dtype=dtype, max_batch=max_batch, enable_lora=True,
                        max_lora_rank=actor.peft_config["default"].r,
                        gpu_memory_utilization=cfg.rollout.vllm_gpu_memory,
                        max_len=cfg.data.max_prompt_len + cfg.rollout.max_new_tokens)  # fmt: skip
    return engine, AdapterSync(engine, actor, out / "rollout_adapter")


class AdapterSync:
    """`sync(step)` before each vLLM rollout: the actor's adapter saved to `rollout_adapter/step-N` and loaded into
    vLLM as `actor-N`, the one before dropped. A name of its own per sync: vLLM keys its prefix cache by the adapter's
    name, and would serve prompts cached under the previous weights to the new ones. Returns the name to sample with."""

    STEP = re.compile(r"^step-\d{6}$")  # complete folders only, never another one's `.tmp-PID` staging folder

    def __init__(self, engine, actor, folder: Path):
        self.engine, self.actor, self.folder = engine, actor, folder
        self.loaded: str | None = None

    def __call__(self, step: int) -> str:
        folder = self.folder / f"step-{step:06d}"
        with atomic_dir(folder) as tmp:
            self.actor.save_pretrained(tmp, safe_serialization=True)
        name = f"actor-{step}"
        self.engine.load_adapter(name, str(folder))
        if self.loaded is not None and self.loaded != name:
            self.engine.remove_adapter(self.loaded)
        self.loaded = name
        complete = sorted(p for p in self.folder.iterdir() if self.STEP.match(p.name))
        for old in complete[:-2]:  # vLLM may still read the previous one
            shutil.rmtree(old, ignore_errors=True)
        return name


def gather_scores(scores: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return scores
    from accelerate.utils import gather_object

    return torch.tensor(gather_object(scores.tolist()))


def timings(exp, samples, t0: float, t1: float, t2: float, epochs: int) -> dict:
    gen_tokens = int(exp.reply_mask.sum())
    train_tokens = int(exp.attention_mask.sum()) * epochs
    return {"gen_s": t1 - t0, "train_s": t2 - t1, "gen_tok_s": gen_tokens / (t1 - t0),
            "train_tok_s": train_tokens / (t2 - t1),
            "ended_turn": sum(r == "stop" for r in samples.finish_reasons) / len(samples)}  # fmt: skip


class SamplesLog:
    """`samples.jsonl`: a few prompts, replies and scores of the sampled steps (a resumed run drops the lines of
    the steps it does again)."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            kept = [r for r in read_jsonl(path) if r["step"] <= start_step] if start_step else []
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def write(self, step: int, samples, scores: torch.Tensor, rows: int = 4) -> None:
        if not self.enabled:
            return
        for i in range(min(len(samples), rows)):
            record = {"step": step, "prompt": samples.prompts[i // samples.k].messages[-1].content,
                      "reply": samples.texts[i], "score": float(scores[i])}  # fmt: skip
            append_line(self.path, json.dumps(record, ensure_ascii=False))


PANELS = {
    "reward": ["reward_mean", "reward_std"], "KL to reference": ["kl"], "KL coefficient": ["kl_coef"],
    "policy loss": ["policy_loss"], "value loss": ["value_loss"], "entropy": ["entropy"],
    "clip fraction": ["clip_frac", "value_clip_frac"], "approx KL (update)": ["approx_kl"], "ptx loss": ["ptx_loss"],
    "reply length": ["reply_len"], "seconds per step": ["gen_s", "train_s"], "tokens/s": ["gen_tok_s", "train_tok_s"],
}  # fmt: skip


def plot(metrics: MetricsLog, advantage: str) -> None:
    if metrics.enabled:
        plot_panels(metrics.read(), metrics.path.with_name("loss.png"), PANELS, f"corral ppo ({advantage})")


def checkpoint(harness: Harness, step: int, cfg: PPOConfig) -> Path:
    path = harness.checkpoint(step, {"total_steps": cfg.steps})
    plot(harness.metrics, cfg.advantage)
    return path


def summarize(metrics: MetricsLog, roles, out: Path, with_ema: bool, log) -> dict:
    """First and last step, memory; written to summary.json and printed (main process)."""
    role_bytes = roles.weight_bytes
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    memory = {"role_weights_mib": role_bytes / 2**20, "base_copy_mib": roles.base_bytes / 2**20,
              "role_weights_vs_base": role_bytes / roles.base_bytes, "peak_rss_mib": peak_rss,
              "peak_rss_vs_base": peak_rss / (roles.base_bytes / 2**20)}  # fmt: skip
    if torch.cuda.is_available():  # this process's tensors (vLLM's own process is not counted)
        memory["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    rows = metrics.read() if metrics.enabled else []
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    if metrics.enabled:
        atomic_write_text(out / "summary.json", json.dumps({"first": first, "last": last, "memory": memory,
                                                            "precision": first.get("precision")}, indent=1))
        log(f"reward {first['reward_mean']:.3f} (step 1) -> {last['reward_mean']:.3f} (step {last['step']}); "
            f"KL {last['kl']:.3f}\npeak RSS {peak_rss:,.0f} MiB ({memory['peak_rss_vs_base']:.1f}x one base copy)"
            f"\nactor: {out / 'actor'}" + (f"\nactor EMA: {out / 'actor_ema'}" if with_ema else "")
            + f"\nmetrics: {metrics.path}\nsamples: {out / 'samples.jsonl'}")  # fmt: skip
    return {"first": first, "last": last, "memory": memory, "out": str(out)}
