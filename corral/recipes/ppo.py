"""`corral ppo`: RLHF from prompts, a reward (a reward model or a Python function) and an SFT actor.

Each step: sample replies from the live actor through the generation engine, score them, compute
reference log-probs (LoRA: the adapter disabled), rewards with the KL penalty and advantages (GAE
with a critic started from the reward model, or rloo / grpo), then clipped-PPO epochs over
mini-batches; optional pretraining mix (ptx) and an EMA of the actor.
"""

from __future__ import annotations

import copy
import importlib
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from corral.atomic import append_line, atomic_dir
from corral.chat.conversation import Conversation
from corral.chat.templates import get_template
from corral.config import PPOConfig
from corral.data.formats import read_conversations
from corral.data.mix import load_records
from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingParams
from corral.models.adapters import add_lora, is_adapter, trainable_parameter_count
from corral.models.load import load_model, load_tokenizer
from corral.recipes.sft import save_model_folder
from corral.train.metrics import MetricsLog
from corral.train.ppo.advantages import KLController
from corral.train.ppo.ema import EMA
from corral.train.ppo.rollout import Samples, batch_tensors, sample_replies
from corral.train.ppo.step import PPOSettings, make_experience, ppo_update


def prompt_of(conv: Conversation) -> Conversation | None:
    """Everything before the last assistant turn (a conversation ending with a user turn is all prompt)."""
    messages = list(conv.messages)
    while messages and messages[-1].role == "assistant":
        messages.pop()
    return Conversation(messages, conv.source, conv.id) if messages and messages[-1].role == "user" else None


def read_rl_prompts(cfg: PPOConfig, fmt, log) -> list[Conversation]:
    from functools import partial

    reader = partial(read_conversations, fmt=cfg.data.format, skip_invalid=cfg.data.skip_invalid)
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


def run(cfg: PPOConfig) -> dict:
    from corral.config import save_config
    from corral.models.reward import load_reward_model
    from corral.train.ppo.critic import Critic

    if cfg.advantage in ("rloo", "grpo") and cfg.samples_per_prompt < 2:
        raise ValueError(f"advantage={cfg.advantage} needs samples_per_prompt >= 2")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    log = print

    tokenizer = load_tokenizer(cfg.model)
    fmt = get_template(cfg.template, tokenizer)
    prompts = read_rl_prompts(cfg, fmt, log)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    actor = load_model(cfg.model, dtype=cfg.dtype)
    ref_model = None
    from_adapter = is_adapter(actor)
    if from_adapter:
        # The reference must be the SFT model itself, not the base under its adapter: fold the SFT adapter
        # in, and train a new LoRA (or the full model) on top of that.
        actor = actor.merge_and_unload()
        log(f"actor: {cfg.model} merged into its base; the reference is that SFT model")
    if cfg.method == "lora":
        actor = add_lora(actor, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    else:
        ref_model = copy.deepcopy(actor).eval().requires_grad_(False)
    trainable, total = trainable_parameter_count(actor)
    log(f"actor {cfg.model} ({cfg.method}): {trainable:,} trainable of {total:,} parameters")

    if is_function_spec(cfg.reward):
        scorer = RewardFunction(cfg.reward)
    else:
        scorer = RewardModelScorer(load_reward_model(cfg.reward, dtype=cfg.dtype, pad_token_id=pad_id), pad_id)
    critic = critic_opt = None
    if cfg.advantage == "gae":
        start = cfg.model if is_function_spec(cfg.reward) else cfg.reward
        critic = Critic(load_reward_model(start, dtype=cfg.dtype, pad_token_id=pad_id, trainable_adapter=True))
        critic.train()
        critic_opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=cfg.critic_lr)
    optimizer = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad], lr=cfg.lr)
    ema = EMA(actor, cfg.ema_decay) if cfg.ema_decay else None
    ptx_fn = make_ptx(cfg, fmt, actor, pad_id) if cfg.ptx_path and cfg.ptx_coef else None

    engine = TransformersEngine(actor, tokenizer, max_batch=cfg.prompts_per_step * cfg.samples_per_prompt)
    settings = PPOSettings(advantage=cfg.advantage, epochs=cfg.ppo_epochs, minibatch=cfg.minibatch, clip=cfg.clip,
                           value_clip=cfg.value_clip, gamma=cfg.gamma, lam=cfg.lam, reward_clip=cfg.reward_clip,
                           whiten=cfg.whiten, entropy_coef=cfg.entropy_coef, max_grad_norm=cfg.max_grad_norm)  # fmt: skip
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    metrics = MetricsLog(out)
    samples_path = out / "samples.jsonl"
    order: list[int] = []
    generator = torch.Generator().manual_seed(cfg.seed)
    from tqdm import tqdm

    bar = tqdm(range(1, cfg.steps + 1), desc="ppo")
    for step in bar:
        batch = []
        while len(batch) < cfg.prompts_per_step:
            if not order:
                order = list(range(len(prompts)))
                rng.shuffle(order)
            batch.append(prompts[order.pop()])
        t0 = time.perf_counter()
        samples = sample_replies(engine, fmt, batch, replace(params, seed=cfg.seed * 100003 + step),
                                 k=cfg.samples_per_prompt)  # fmt: skip
        t1 = time.perf_counter()
        scores = scorer(samples).float()
        if cfg.no_eos_penalty:
            scores -= cfg.no_eos_penalty * torch.tensor([r == "length" for r in samples.finish_reasons]).float()
        exp = make_experience(actor, samples, scores, kl, settings, pad_id, ref_model=ref_model, critic=critic)
        stats = ppo_update(actor, optimizer, exp, settings, critic=critic, critic_optimizer=critic_opt,
                           ptx_fn=ptx_fn, ptx_coef=cfg.ptx_coef, generator=generator)  # fmt: skip
        t2 = time.perf_counter()
        if ema is not None:
            ema.update(actor)
        kl.update(exp.stats["kl"], len(samples))
        gen_tokens = int(exp.reply_mask.sum())
        train_tokens = int(exp.attention_mask.sum()) * settings.epochs
        record = {"step": step, **exp.stats, **stats, "gen_s": t1 - t0, "train_s": t2 - t1,
                  "gen_tok_s": gen_tokens / (t1 - t0), "train_tok_s": train_tokens / (t2 - t1),
                  "ended_turn": sum(r == "stop" for r in samples.finish_reasons) / len(samples)}  # fmt: skip
        metrics.log(record)
        bar.set_postfix(reward=f"{exp.stats['reward_mean']:.3f}", kl=f"{exp.stats['kl']:.3f}")
        if step == 1 or step % cfg.sample_every == 0 or step == cfg.steps:
            for i in range(min(len(samples), 4)):
                append_line(samples_path, json.dumps({"step": step, "prompt": batch[i // samples.k].messages[-1].content,
                                                      "reply": samples.texts[i], "score": float(scores[i])},
                                                     ensure_ascii=False))  # fmt: skip
    metrics.plot(f"corral ppo ({cfg.advantage})")
    tokenizer.chat_template = fmt.chat_template_jinja
    save_actor(actor, out / "actor", tokenizer, merged=from_adapter)
    if ema is not None:
        live = {n: p.detach().clone() for n, p in actor.named_parameters() if n in ema.shadow}
        ema.copy_to(actor)
        save_actor(actor, out / "actor_ema", tokenizer, merged=from_adapter)
        with torch.no_grad():
            for n, p in actor.named_parameters():
                if n in live:
                    p.copy_(live[n])
    rows = metrics.read()
    first, last = rows[0], rows[-1]
    log(f"reward {first['reward_mean']:.3f} (step 1) -> {last['reward_mean']:.3f} (step {last['step']}); "
        f"KL {last['kl']:.3f}\nactor: {out / 'actor'}" + (f"\nactor EMA: {out / 'actor_ema'}" if ema else "")
        + f"\nmetrics: {metrics.path}\nsamples: {samples_path}")  # fmt: skip
    return {"first": first, "last": last, "out": out}


def save_actor(actor, folder: Path, tokenizer, merged: bool) -> None:
    """The actor as a loadable folder: its LoRA adapter, or (when training started from an SFT adapter,
    whose merged base exists only in memory) the full model with the new LoRA folded in."""
    with atomic_dir(folder) as tmp:
        if merged and is_adapter(actor):
            merged_copy = copy.deepcopy(actor).merge_and_unload()
            save_model_folder(merged_copy, tmp, tokenizer)
            del merged_copy
        else:
            save_model_folder(actor, tmp, tokenizer)


def make_ptx(cfg: PPOConfig, fmt, actor, pad_id: int):
    """A function returning the summed LM loss and target count on a random batch of ptx conversations."""
    from corral.data.clean import conversations_to_samples
    from corral.data.pack import collate, single_rows
    from corral.models.forward import final_hidden, output_head
    from corral.train.losses import token_nll_sum

    convs, report = read_conversations(cfg.ptx_path)
    samples, _ = conversations_to_samples(convs, fmt, 512)
    rows = single_rows(samples)
    rng = random.Random(cfg.seed + 1)
    device = next(actor.parameters()).device

    def ptx():
        batch = collate(rng.sample(rows, min(cfg.ptx_batch, len(rows))), pad_id=pad_id)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        hidden = final_hidden(actor, batch["input_ids"], batch["position_ids"])
        return token_nll_sum(hidden, output_head(actor), batch["targets"])

    return ptx
