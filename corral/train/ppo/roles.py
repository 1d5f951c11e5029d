"""The four PPO roles: actor (trained), reference (frozen), reward (a model or a Python function) and critic
(advantage=gae), built so that with LoRA all of them hold one copy of the base weights.

The actor is an adapter; the reference is the same base with the adapter disabled, or, when the actor
continues an SFT adapter, a frozen copy of that adapter over the same base weights; a LoRA reward model of
the same base, and the critic started from it, are views over those weights too (`models/shared.py`).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from corral.models.adapters import add_lora, is_adapter, trainable_in_float32, trainable_parameter_count
from corral.models.load import frozen_dtype, load_model, master_dtype, resolve_dtype, resolve_model
from corral.train.ppo.rollout import Samples, batch_tensors

Scorer = Callable[[Samples], torch.Tensor]  # samples -> (N,) scores


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


def score_samples(scorer: Scorer, samples: Samples, no_eos_penalty: float) -> torch.Tensor:
    """(N,) scores, less `no_eos_penalty` for each reply that hit the length limit without ending its turn."""
    scores = scorer(samples).float()
    if no_eos_penalty:
        scores -= no_eos_penalty * torch.tensor([r == "length" for r in samples.finish_reasons]).float()
    return scores


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: list[str] | str


@dataclass
class Roles:
    actor: torch.nn.Module  # trainable
    ref_model: torch.nn.Module | None  # None: the actor with its adapter disabled
    scorer: Scorer
    critic: torch.nn.Module | None  # advantage=gae only
    models: list  # every module holding weights, for the memory report
    base_bytes: int  # one plain copy of the actor's base
    weight_bytes: int  # every role's weights together (shared ones once)


def build_roles(model: str, reward: str, *, method: str, dtype: str, lora: LoraSettings, with_critic: bool,
                pad_id: int, log, mixed_precision: str = "no") -> Roles:
    """Actor, reference, reward and critic; with LoRA, all over one copy of the base weights. Weights no optimizer
    updates (a LoRA actor's base and the views over it, a reward model of its own) are stored as the run's autocast
    (`mixed_precision`) computes them (`frozen_dtype`: bf16 on CPUs that compute it natively)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from corral.models.shared import base_weight_bytes, view_of, weight_bytes

    frozen = frozen_dtype(dtype, mixed_precision)
    torch_dtype = resolve_dtype(frozen)
    start = resolve_model(model)
    # A fully trained actor keeps float32 master weights (bf16 only when asked); its frozen reference copies them,
    # so that it gives the actor's own log-probs (a KL of 0) before the first update.
    actor_dtype = master_dtype(dtype) if method == "full" else frozen
    actor = load_model(model, dtype=actor_dtype, trainable_adapter=method == "lora")
    base_bytes = base_weight_bytes(actor)
    ref_model = None
    if start.adapter and method == "lora":
        # The actor continues the SFT adapter; the reference is that adapter, frozen, over the same weights.
        from peft import PeftModel

        ref_model = PeftModel.from_pretrained(view_of(actor, AutoModelForCausalLM, torch_dtype), start.adapter).eval()
        log(f"actor: continues the SFT adapter {model} (its own LoRA settings; lora.* unused); "
            "reference: that adapter, frozen, over the same base weights")  # fmt: skip
    elif start.adapter:
        actor = actor.merge_and_unload()
        log(f"actor: {model} merged into its base for full fine-tuning; the reference is a frozen copy")
    if method == "lora" and not start.adapter:
        actor = add_lora(actor, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    if method == "full":
        ref_model = copy.deepcopy(actor).eval().requires_grad_(False)
    trainable, total = trainable_parameter_count(actor)
    log(f"actor {model} ({method}): {trainable:,} trainable of {total:,} parameters")

    # A LoRA reward model of the actor's base is a view over the actor's (frozen) base weights.
    classifier = {"num_labels": 1, "pad_token_id": pad_id}
    rm = None
    if not is_function_spec(reward):
        rm_start = resolve_model(reward)
        if rm_start.adapter and rm_start.path == start.path and method == "lora":
            from peft import PeftModel

            rm = PeftModel.from_pretrained(view_of(actor, AutoModelForSequenceClassification, torch_dtype,
                                                   **classifier), rm_start.adapter).eval()  # fmt: skip
            log(f"reward model: {reward} over the actor's base weights")
        else:
            rm = load_model(reward, dtype=frozen, head="score", pad_token_id=pad_id)
            log(f"reward model: {reward} (its own weights: it does not share the actor's frozen base)")
        rm.requires_grad_(False)
    scorer = RewardModelScorer(rm, pad_id) if rm is not None else RewardFunction(reward)
    critic = make_critic(model, reward, rm, actor, method=method, dtype=dtype, lora=lora, pad_id=pad_id,
                         log=log, frozen=torch_dtype) if with_critic else None  # fmt: skip
    models = [m for m in (actor, ref_model, rm, critic) if m is not None]
    total_bytes = weight_bytes(*models)
    log(f"weights in memory, all roles: {total_bytes / 2**20:,.1f} MiB = {total_bytes / base_bytes:.3f}x one copy of "
        f"the base ({base_bytes / 2**20:,.1f} MiB)")  # fmt: skip
    return Roles(actor, ref_model, scorer, critic, models, base_bytes, total_bytes)


def make_critic(model: str, reward: str, rm, actor, *, method: str, dtype: str, lora: LoraSettings, pad_id: int, log,
                frozen: torch.dtype | None = None):
    """The critic starts from the reward model (DeepSpeed-Chat), or with a zero value head on the actor's
    base when the reward is a function. LoRA: a trainable copy of the RM's adapter (or a new adapter)
    over frozen weights it shares (`frozen`: their dtype; default what `dtype` resolves to); full: its own
    trainable copy."""
    from transformers import AutoModelForSequenceClassification

    from corral.models.shared import view_of
    from corral.train.ppo.critic import Critic

    if method == "full":
        start = reward if rm is not None else resolve_model(model).path
        critic = load_model(start, dtype=master_dtype(dtype), head="score", pad_token_id=pad_id)
        log(f"critic: a trainable copy of {start}")
        return Critic(critic.requires_grad_(True)).train()
    source = rm if rm is not None else actor
    view = view_of(source, AutoModelForSequenceClassification, frozen or resolve_dtype(dtype), num_labels=1,
                   pad_token_id=pad_id)
    if rm is not None and is_adapter(rm):
        from peft import PeftModel

        critic = PeftModel.from_pretrained(view, resolve_model(reward).adapter, is_trainable=True)
        critic = trainable_in_float32(critic)  # its score head is copied in the view's dtype
        log("critic: a trainable copy of the reward model's adapter and head, over the same weights")
    else:
        critic = add_lora(view, lora.r, lora.alpha, lora.dropout, lora.target_modules, task_type="SEQ_CLS",
                          modules_to_save=["score"])  # fmt: skip
        log("critic: a new LoRA adapter and value head over " + ("the reward model's" if rm else "the actor's")
            + " frozen weights")
    return Critic(critic).train()
