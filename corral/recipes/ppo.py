"""`corral ppo`: RLHF from prompts, a reward (a reward model or a Python function) and an SFT actor.

Each step: sample replies from the live actor through the generation engine, score them, compute
reference log-probs, rewards with the KL penalty and advantages (GAE with a critic started from the
reward model, or rloo / grpo), then clipped-PPO epochs over mini-batches; optional pretraining mix
(ptx) and an EMA of the actor.

Roles and memory (LoRA): the actor is an adapter; the reference is the same base with the adapter
disabled, or, when the actor continues an SFT adapter, a frozen copy of that adapter over the same
base weights; a LoRA reward model of the same base, and the critic started from it, are views over
those weights too (`models/shared.py`). So all four roles hold one copy of the base.

Data parallel (accelerate): each process samples and scores its share of the step's prompts; the
samples are gathered so every process holds the step's whole experience, and each mini-batch's rows
are split over the processes (`ppo_update`), which makes N processes compute the one-process update.
"""

from __future__ import annotations

import copy
import importlib
import json
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from corral.atomic import append_line, atomic_dir, atomic_write_text, read_jsonl
from corral.chat.conversation import Conversation
from corral.chat.templates import get_template
from corral.config import PPOConfig
from corral.data.formats import read_conversations
from corral.data.mix import load_records
from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingParams
from corral.models.adapters import add_lora, is_adapter, trainable_parameter_count
from corral.models.forward import unwrap
from corral.models.load import load_model, load_tokenizer, resolve_dtype, resolve_model
from corral.recipes.runs import begin_run
from corral.recipes.sft import save_model_folder
from corral.train import checkpoint as ckpt
from corral.train.loop import StepPlan
from corral.train.metrics import MetricsLog, plot_panels
from corral.train.ppo.advantages import KLController
from corral.train.ppo.ema import EMA
from corral.train.ppo.rollout import Samples, batch_tensors, gather_samples, sample_replies
from corral.train.ppo.step import PPOSettings, make_experience, ppo_update


def prompt_of(conv: Conversation) -> Conversation | None:
    """Everything before the last assistant turn (a conversation ending with a user turn is all prompt)."""
    messages = list(conv.messages)
    while messages and messages[-1].role == "assistant":
        messages.pop()
    return Conversation(messages, conv.source, conv.id) if messages and messages[-1].role == "user" else None


def read_rl_prompts(cfg: PPOConfig, fmt, log) -> list[Conversation]:
    from functools import partial

    reader = partial(read_conversations, fmt=cfg.data.format, skip_invalid=cfg.data.skip_invalid, need_reply=False)
    convs = load_records(reader, cfg.data.path, cfg.data.sources, cfg.data.mix_seed, cfg.data.split,
                         cfg.data.split_stage, cfg.data.split_seed, log)  # fmt: skip
    prompts, too_long = [], 0
    for conv in convs:
        prompt = prompt_of(conv)
        if prompt is None:
            continue
        if len(fmt.render(prompt)) > cfg.data.max_prompt_len:
            too_long += 1
            continue
        prompts.append(prompt)
    log(f"{len(prompts)} prompts" + (f"; dropped {too_long} longer than data.max_prompt_len" if too_long else ""))
    if not prompts:
        raise ValueError(f"no prompts left from {cfg.data.path or 'data.sources'}")
    return prompts


class RewardFunction:
    """`module:function` called as function(prompt, reply) -> float, prompt being the last user message."""

    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward={spec}: cannot import {name} from {module}: {e}") from None

    def __call__(self, samples: Samples) -> torch.Tensor:
        k = samples.k
        return torch.tensor([float(self.fn(samples.prompts[i // k].messages[-1].content, text))
                             for i, text in enumerate(samples.texts)])  # fmt: skip


class RewardModelScorer:
    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id

    @torch.no_grad()
    def __call__(self, samples: Samples) -> torch.Tensor:
        from corral.models.reward import sequence_scores

        device = next(self.model.parameters()).device
        ids, attention, _, _ = batch_tensors(samples.prompt_ids, samples.reply_ids, self.pad_id, device)
        return sequence_scores(self.model, ids, attention).cpu()


def is_function_spec(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


@dataclass
class Roles:
    actor: torch.nn.Module  # trainable
    ref_model: torch.nn.Module | None  # None: the actor with its adapter disabled
    scorer: object  # Samples -> (N,) scores
    critic: torch.nn.Module | None  # advantage=gae only
    models: list  # every module holding weights, for the memory report
    base_bytes: int  # one plain copy of the actor's base


def build_roles(cfg: PPOConfig, pad_id: int, log) -> Roles:
    """Actor, reference, reward and critic; with LoRA, all over one copy of the base weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from corral.models.reward import load_reward_model
    from corral.models.shared import base_weight_bytes, view_of

    dtype = resolve_dtype(cfg.dtype)
    start = resolve_model(cfg.model)
    actor = load_model(cfg.model, dtype=cfg.dtype, trainable_adapter=cfg.method == "lora")
    base_bytes = base_weight_bytes(actor)
    ref_model = None
    if start.adapter and cfg.method == "lora":
        # The actor continues the SFT adapter; the reference is that adapter, frozen, over the same weights.
        from peft import PeftModel

        ref_model = PeftModel.from_pretrained(view_of(actor, AutoModelForCausalLM, dtype), start.adapter).eval()
        log(f"actor: continues the SFT adapter {cfg.model} (its own LoRA settings; lora.* unused); "
            "reference: that adapter, frozen, over the same base weights")  # fmt: skip
    elif start.adapter:
        actor = actor.merge_and_unload()
        log(f"actor: {cfg.model} merged into its base for full fine-tuning; the reference is a frozen copy")
    if cfg.method == "lora" and not start.adapter:
        actor = add_lora(actor, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    if cfg.method == "full":
        ref_model = copy.deepcopy(actor).eval().requires_grad_(False)
    trainable, total = trainable_parameter_count(actor)
    log(f"actor {cfg.model} ({cfg.method}): {trainable:,} trainable of {total:,} parameters")

    # A LoRA reward model of the actor's base is a view over the actor's (frozen) base weights.
    classifier = {"num_labels": 1, "pad_token_id": pad_id}
    function_reward = is_function_spec(cfg.reward)
    rm = None
    if not function_reward:
        rm_start = resolve_model(cfg.reward)
        if rm_start.adapter and rm_start.path == start.path and cfg.method == "lora":
            from peft import PeftModel

            rm = PeftModel.from_pretrained(view_of(actor, AutoModelForSequenceClassification, dtype, **classifier),
                                           rm_start.adapter).eval()  # fmt: skip
            log(f"reward model: {cfg.reward} over the actor's base weights")
        else:
            rm = load_reward_model(cfg.reward, dtype=cfg.dtype, pad_token_id=pad_id)
            log(f"reward model: {cfg.reward} (its own weights: it does not share the actor's frozen base)")
        rm.requires_grad_(False)
    scorer = RewardFunction(cfg.reward) if function_reward else RewardModelScorer(rm, pad_id)

    critic = None
    if cfg.advantage == "gae":
        critic = make_critic(cfg, actor, rm, classifier, dtype, log)
    models = [m for m in (actor, ref_model, rm, critic) if m is not None]
    return Roles(actor, ref_model, scorer, critic, models, base_bytes)


def make_critic(cfg: PPOConfig, actor, rm, classifier: dict, dtype, log):
    """The critic starts from the reward model (DeepSpeed-Chat), or with a zero value head on the actor's
    base when the reward is a function. LoRA: a trainable copy of the RM's adapter (or a new adapter)
    over frozen weights it shares; full: its own trainable copy."""
    from transformers import AutoModelForSequenceClassification

    from corral.models.reward import load_reward_model
    from corral.models.shared import view_of
    from corral.train.ppo.critic import Critic

    if cfg.method == "full":
        start = cfg.reward if rm is not None else resolve_model(cfg.model).path
        model = load_reward_model(start, dtype=cfg.dtype, pad_token_id=classifier["pad_token_id"])
        log(f"critic: a trainable copy of {start}")
        return Critic(model.requires_grad_(True)).train()
    source = rm if rm is not None else actor
    view = view_of(source, AutoModelForSequenceClassification, dtype, **classifier)
    if rm is not None and is_adapter(rm):
        from peft import PeftModel

        model = PeftModel.from_pretrained(view, resolve_model(cfg.reward).adapter, is_trainable=True)
        log("critic: a trainable copy of the reward model's adapter and head, over the same weights")
    else:
        model = add_lora(view, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                         task_type="SEQ_CLS", modules_to_save=["score"])  # fmt: skip
        log("critic: a new LoRA adapter and value head over " + ("the reward model's" if rm else "the actor's")
            + " frozen weights")
    return Critic(model).train()


def make_rollout_engine(cfg: PPOConfig, actor, tokenizer, max_batch: int, out: Path):
    """Corral's engine on the live actor (no weight copy), or vLLM (CUDA) synced with the actor's adapter."""
    if cfg.rollout_backend == "transformers":
        return TransformersEngine(unwrap(actor), tokenizer, max_batch=max_batch), None
    from corral.generate.vllm import VLLMEngine

    if cfg.method != "lora":
        raise ValueError("rollout_backend=vllm needs method=lora: the actor is synced to vLLM as a LoRA adapter")
    engine = VLLMEngine(resolve_model(cfg.model).path, dtype=cfg.dtype, max_batch=max_batch, enable_lora=True,
                        max_lora_rank=max(8, unwrap(actor).peft_config["default"].r),
                        gpu_memory_utilization=cfg.vllm_gpu_memory)  # fmt: skip
    sync_dir = out / "rollout_adapter"

    def sync(step: int) -> None:
        folder = sync_dir / f"step-{step:06d}"
        with atomic_dir(folder) as tmp:
            unwrap(actor).save_pretrained(tmp, safe_serialization=True)
        engine.load_adapter("actor", str(folder))
        for old in sorted(sync_dir.glob("step-*"))[:-2]:  # vLLM may still read the previous one
            shutil.rmtree(old, ignore_errors=True)

    return engine, sync


def run(cfg: PPOConfig) -> dict:
    if cfg.advantage in ("rloo", "grpo") and cfg.samples_per_prompt < 2:
        raise ValueError(f"advantage={cfg.advantage} needs samples_per_prompt >= 2")
    run_ = begin_run(cfg, "ppo", seed=cfg.seed, mixed_precision="no")
    accelerator, out, main, log = run_.accelerator, run_.out, run_.main, run_.log
    rank, world = accelerator.process_index, accelerator.num_processes
    rollout = cfg.prompts_per_step * cfg.samples_per_prompt
    if world > 1 and (cfg.prompts_per_step % world or cfg.minibatch % world or rollout % cfg.minibatch):
        raise ValueError(f"with {world} processes, prompts_per_step ({cfg.prompts_per_step}) and minibatch "
                         f"({cfg.minibatch}) must be multiples of {world}, and prompts_per_step x samples_per_prompt "
                         f"({rollout}) a multiple of minibatch")  # fmt: skip
    if cfg.ptx_coef and cfg.ptx_path and cfg.ptx_batch % world:
        raise ValueError(f"ptx_batch ({cfg.ptx_batch}) must be a multiple of the {world} processes")

    tokenizer = load_tokenizer(cfg.model)
    fmt = get_template(cfg.template, tokenizer)
    prompts = read_rl_prompts(cfg, fmt, log)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    roles = build_roles(cfg, pad_id, log)
    from corral.models.shared import weight_bytes

    log(f"{cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples per step over world size {world}")
    role_bytes = weight_bytes(*roles.models)
    log(f"weights in memory, all roles: {role_bytes / 2**20:,.1f} MiB = {role_bytes / roles.base_bytes:.3f}x "
        f"one copy of the base ({roles.base_bytes / 2**20:,.1f} MiB)")  # fmt: skip
    actor, critic = roles.actor, roles.critic
    optimizer = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad], lr=cfg.lr)
    critic_opt = None
    if critic is not None:
        critic_opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=cfg.critic_lr)
        actor, optimizer, critic, critic_opt = accelerator.prepare(actor, optimizer, critic, critic_opt)
    else:
        actor, optimizer = accelerator.prepare(actor, optimizer)
    ema = EMA(unwrap(actor), cfg.ema_decay) if cfg.ema_decay else None
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    for state in (kl, ema):
        if state is not None:
            accelerator.register_for_checkpointing(state)
    ckpt.install_state_hooks(accelerator)
    ptx = make_ptx(cfg, fmt, actor, pad_id) if cfg.ptx_path and cfg.ptx_coef else None

    engine, sync = make_rollout_engine(cfg, actor, tokenizer, rollout // world, out)
    settings = PPOSettings(advantage=cfg.advantage, epochs=cfg.ppo_epochs, minibatch=cfg.minibatch, clip=cfg.clip,
                           value_clip=cfg.value_clip, gamma=cfg.gamma, lam=cfg.lam, reward_clip=cfg.reward_clip,
                           whiten=cfg.whiten, entropy_coef=cfg.entropy_coef, max_grad_norm=cfg.max_grad_norm)  # fmt: skip
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    # Which prompts a step samples is a function of the step alone, so resuming needs nothing but the step.
    plan = StepPlan(len(prompts), cfg.prompts_per_step // world, 1, world, cfg.seed)

    start_step = 0
    resume_from = ckpt.find_resume(out, cfg.resume)
    if resume_from is not None:
        start_step = ckpt.load_checkpoint(accelerator, actor, resume_from)["step"]
        if critic is not None:
            ckpt.load_weights(unwrap(critic).model, resume_from / "critic")
        log(f"resumed from {resume_from} at step {start_step}")
    metrics = MetricsLog(out, resume_step=start_step, enabled=main)
    samples_path = out / "samples.jsonl"
    if main:
        kept = [r for r in read_jsonl(samples_path) if r["step"] <= start_step] if start_step else []
        atomic_write_text(samples_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def save_state(step: int) -> Path:
        also = {"critic": lambda folder: save_model_folder(unwrap(critic).model, folder, tokenizer)} if critic else {}
        path = ckpt.save_checkpoint(accelerator, actor, lambda model, folder: save_model_folder(model, folder, tokenizer),
                                    step, out, {"total_steps": cfg.steps}, cfg.save_total_limit, also=also)  # fmt: skip
        plot(metrics, cfg)
        return path

    from tqdm import tqdm

    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc="ppo", disable=not main, dynamic_ncols=True)
    for step in bar:
        mine = plan.micro_batches(step - 1, rank)[0]
        first = rank * len(mine)  # this process's first slot among the step's prompts
        seeds = [cfg.seed * 1_000_003 + step * 10_007 + first + j for j in range(len(mine))]
        if sync is not None:
            sync(step)
        t0 = time.perf_counter()
        samples = sample_replies(engine, fmt, [prompts[i] for i in mine], params, k=cfg.samples_per_prompt,
                                 seeds=seeds, adapter="actor" if sync else None)  # fmt: skip
        t1 = time.perf_counter()
        scores = scorer_scores(roles.scorer, samples, cfg.no_eos_penalty)
        samples = gather_samples(samples, accelerator)
        if world > 1:
            from accelerate.utils import gather_object

            scores = torch.tensor(gather_object(scores.tolist()))
        exp = make_experience(actor, samples, scores, kl, settings, pad_id, ref_model=roles.ref_model, critic=critic)
        step_ptx = (lambda key, r, w, step=step: ptx(step * 1000 + key, r, w)) if ptx is not None else None
        stats = ppo_update(actor, optimizer, exp, settings, critic=critic, critic_optimizer=critic_opt,
                           ptx_fn=step_ptx, ptx_coef=cfg.ptx_coef, accelerator=accelerator,
                           generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))  # fmt: skip
        t2 = time.perf_counter()
        if ema is not None:
            ema.update(unwrap(actor))
        stats = {**exp.stats, **stats}  # on-policy updates give the step's KL
        kl.update(stats["kl"], len(samples))
        gen_tokens = int(exp.reply_mask.sum())
        train_tokens = int(exp.attention_mask.sum()) * settings.epochs
        record = {"step": step, **stats, "gen_s": t1 - t0, "train_s": t2 - t1,
                  "gen_tok_s": gen_tokens / (t1 - t0), "train_tok_s": train_tokens / (t2 - t1),
                  "ended_turn": sum(r == "stop" for r in samples.finish_reasons) / len(samples)}  # fmt: skip
        metrics.log(record)
        bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.3f}")
        if main and (step == 1 or step % cfg.sample_every == 0 or step == cfg.steps):
            for i in range(min(len(samples), 4)):
                append_line(samples_path, json.dumps({"step": step, "prompt": samples.prompts[i // samples.k].messages[-1].content,
                                                      "reply": samples.texts[i], "score": float(scores[i])},
                                                     ensure_ascii=False))  # fmt: skip
        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
            save_state(step)
    bar.close()
    save_state(cfg.steps)
    tokenizer.chat_template = fmt.chat_template_jinja
    actor_model = unwrap(actor)
    if main:
        save_actor(actor_model, out / "actor", tokenizer)
        if ema is not None:
            live = {n: p.detach().clone() for n, p in actor_model.named_parameters() if n in ema.shadow}
            ema.copy_to(actor_model)
            save_actor(actor_model, out / "actor_ema", tokenizer)
            with torch.no_grad():
                for n, p in actor_model.named_parameters():
                    if n in live:
                        p.copy_(live[n])
    accelerator.wait_for_everyone()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    memory = {"role_weights_mib": role_bytes / 2**20, "base_copy_mib": roles.base_bytes / 2**20,
              "role_weights_vs_base": role_bytes / roles.base_bytes, "peak_rss_mib": peak_rss,
              "peak_rss_vs_base": peak_rss / (roles.base_bytes / 2**20)}  # fmt: skip
    rows = metrics.read() if main else []
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    if main:
        atomic_write_text(out / "summary.json", json.dumps({"first": first, "last": last, "memory": memory}, indent=1))
        log(f"reward {first['reward_mean']:.3f} (step 1) -> {last['reward_mean']:.3f} (step {last['step']}); "
            f"KL {last['kl']:.3f}\npeak RSS {peak_rss:,.0f} MiB ({memory['peak_rss_vs_base']:.1f}x one base copy)"
            f"\nactor: {out / 'actor'}" + (f"\nactor EMA: {out / 'actor_ema'}" if ema else "")
            + f"\nmetrics: {metrics.path}\nsamples: {samples_path}")  # fmt: skip
    return {"first": first, "last": last, "out": out, "memory": memory}


PANELS = {
    "reward": ["reward_mean", "reward_std"], "KL to reference": ["kl"], "KL coefficient": ["kl_coef"],
    "policy loss": ["policy_loss"], "value loss": ["value_loss"], "entropy": ["entropy"],
    "clip fraction": ["clip_frac", "value_clip_frac"], "approx KL (update)": ["approx_kl"], "ptx loss": ["ptx_loss"],
    "reply length": ["reply_len"], "seconds per step": ["gen_s", "train_s"], "tokens/s": ["gen_tok_s", "train_tok_s"],
}  # fmt: skip


def plot(metrics: MetricsLog, cfg: PPOConfig) -> None:
    if metrics.enabled:
        plot_panels(metrics.read(), metrics.path.with_name("loss.png"), PANELS, f"corral ppo ({cfg.advantage})")


def scorer_scores(scorer, samples: Samples, no_eos_penalty: float) -> torch.Tensor:
    scores = scorer(samples).float()
    if no_eos_penalty:
        scores -= no_eos_penalty * torch.tensor([r == "length" for r in samples.finish_reasons]).float()
    return scores


def save_actor(actor, folder: Path, tokenizer) -> None:
    """The actor as a loadable folder: its LoRA adapter (over the original base) or the full model."""
    with atomic_dir(folder) as tmp:
        save_model_folder(actor, tmp, tokenizer)


def make_ptx(cfg: PPOConfig, fmt, actor, pad_id: int):
    """ptx(key, rank, world) -> (this process's summed LM loss, target count of the whole batch) on a batch of
    `ptx_batch` conversations drawn with `key`; each process takes every world-th of them."""
    from corral.data.clean import conversations_to_samples
    from corral.data.pack import collate, single_rows
    from corral.models.forward import final_hidden, output_head
    from corral.train.losses import token_nll_sum

    convs, report = read_conversations(cfg.ptx_path)
    samples, _ = conversations_to_samples(convs, fmt, 512)
    rows = single_rows(samples)
    device = next(actor.parameters()).device

    def ptx(key: int, rank: int, world: int):
        chosen = random.Random(cfg.seed * 31 + key).sample(rows, min(cfg.ptx_batch, len(rows)))
        count = sum(row.num_targets for row in chosen)
        batch = collate(chosen[rank::world], pad_id=pad_id)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        hidden = final_hidden(actor, batch["input_ids"], batch["position_ids"])
        loss_sum, _ = token_nll_sum(hidden, output_head(actor), batch["targets"])
        return loss_sum, count

    return ptx
