"""Rollouts: replies sampled from the live actor through the generation engine, then the per-token
log-probs the PPO update needs, computed on exactly those tokens.

The engine runs on the actor model itself (no weight copy): `engine.generate` switches it to eval
mode for the rollout and back to train mode after. With LoRA, the reference model is the same base
with the adapter disabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from corral.chat.conversation import Conversation
from corral.generate.chat import ChatTemplate, with_template_stops
from corral.generate.sampling import SamplingParams
from corral.generate.types import Engine
from corral.models.forward import final_hidden, output_head
from corral.train.losses import entropy_from_logprobs


@dataclass
class Samples:
    """k replies per prompt, flattened prompt-major: sample i belongs to prompt i // k."""

    prompt_ids: list[list[int]]
    reply_ids: list[list[int]]  # the end-of-turn token included when the reply ended with one
    texts: list[str]
    finish_reasons: list[str]
    k: int
    prompts: list[Conversation] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.reply_ids)


def sample_replies(engine: Engine, template: ChatTemplate, prompts: list[Conversation], params: SamplingParams,
                   k: int = 1, seeds: list[int] | None = None, adapter: str | None = None) -> Samples:
    """k sampled replies per prompt conversation (each ending with a user turn). `seeds`, one per prompt,
    make each prompt's replies independent of what else is in the batch (and of the process it ran on)."""
    from dataclasses import replace

    params = replace(with_template_stops(params, template), n=k)
    prompt_ids = [template.render(c) for c in prompts]
    per_prompt = [replace(params, seed=s) for s in seeds] if seeds is not None else params
    results = engine.generate(prompt_ids, per_prompt, adapter)
    out = Samples([], [], [], [], k, list(prompts))
    for ids, completions in zip(prompt_ids, results):
        for c in completions:
            out.prompt_ids.append(ids)
            out.reply_ids.append(list(c.token_ids) or [engine.pad_id])
            out.texts.append(c.text.strip())
            out.finish_reasons.append(c.finish_reason)
    return out


def gather_samples(samples: Samples, accelerator) -> Samples:
    """Every process's samples, in process order, on every process (prompt-major order is kept)."""
    from accelerate.utils import gather_object

    if accelerator is None or accelerator.num_processes == 1:
        return samples
    fields = ("prompt_ids", "reply_ids", "texts", "finish_reasons", "prompts")
    gathered = {f: gather_object(list(getattr(samples, f))) for f in fields}
    return Samples(k=samples.k, **gathered)


def batch_tensors(prompt_ids: list[list[int]], reply_ids: list[list[int]], pad_id: int, device=None):
    """Right-padded prompt+reply rows: (input_ids, attention_mask, reply_mask (B, T), reply_start (B,)).
    reply_mask[b, t] is 1 for the t-th reply token of row b."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, reply_ids)]
    width, T = max(lengths), max(len(r) for r in reply_ids)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(lengths), width), dtype=torch.long)
    reply_mask = torch.zeros((len(lengths), T))
    for b, (p, r) in enumerate(zip(prompt_ids, reply_ids)):
        input_ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        attention[b, : len(p) + len(r)] = 1
        reply_mask[b, : len(r)] = 1
    start = torch.tensor([len(p) for p in prompt_ids])
    return input_ids.to(device), attention.to(device), reply_mask.to(device), start.to(device)


def reply_positions(reply_start: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) index of the position whose output predicts reply token t: reply_start + t - 1."""
    return reply_start[:, None] - 1 + torch.arange(T, device=reply_start.device)[None, :]


def reply_logprobs(model, input_ids, attention_mask, reply_mask, reply_start, with_entropy: bool = False,
                   entropy_grad: bool = False):
    """(B, T) log-prob of each reply token under `model` (and its entropy when asked: a figure to watch,
    without a graph unless `entropy_grad`, for an entropy bonus). The output head runs on the reply
    positions only."""
    B, T = reply_mask.shape
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = final_hidden(model, input_ids, position_ids)
    pos = reply_positions(reply_start, T).clamp(max=input_ids.shape[1] - 2)
    rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
    picked = hidden[rows, pos]  # (B, T, H)
    targets = input_ids[rows, pos + 1]
    logp = output_head(model)(picked).float().log_softmax(-1)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * reply_mask
    if not with_entropy:
        return token_logp
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
        entropy = entropy_from_logprobs(logp)
    return token_logp, entropy * reply_mask
