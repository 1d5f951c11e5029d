"""Generation: replies to prompt conversations, rendered by the same template that training used.

A batched KV-cache path over transformers' `generate` (left padding). The serving work replaces
this body with continuous batching behind the same function; callers do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corral.chat.conversation import Conversation


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


def generate_replies(model, fmt, conversations: list[Conversation], params: SamplingParams, batch_size: int = 8) -> list[str]:
    """One reply per conversation (each ending with a user message)."""
    tokenizer = fmt.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    if params.seed is not None:
        torch.manual_seed(params.seed)
    replies: list[str] = []
    model.eval()
    for start in range(0, len(conversations), batch_size):
        prompts = [fmt.render(c) for c in conversations[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling = params.temperature > 0
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=params.max_new_tokens,
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None,
                top_k=params.top_k if sampling else None,
                repetition_penalty=params.repetition_penalty,
                eos_token_id=fmt.stop_token_ids,
                pad_token_id=pad_id,
            )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in fmt.stop_token_ids), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return replies
