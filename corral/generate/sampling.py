"""Sampling parameters and the per-row logits processing of a batch where every row has its own.

Each row of a running batch belongs to a different request, so temperature, top-p, top-k and the
penalties are per-row tensors and one vectorised pass serves the whole batch. Each request draws
from its own seeded generator, so a seeded reply does not depend on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corral.generate.structured import ResponseFormat

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs

class SamplingError(ValueError):
    """A sampling parameter out of range. `param` names it, so the server can report the request field
    without parsing the message; the message still starts with it (`"top_p: invalid value 0"`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # transformers' semantics: over prompt and reply tokens
    presence_penalty: float = 0.0  # OpenAI's semantics: over reply tokens
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings; the reply is cut before them
    stop_token_ids: tuple[int, ...] = ()  # in addition to the engine's default stops (eos / end-of-turn)
    n: int = 1  # replies per prompt; with a seed, reply i uses seed + i
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely (0..20)
    response_format: ResponseFormat | None = None  # constrain the reply to JSON (generate/structured.py)

    def __post_init__(self):
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": 0 <= self.temperature <= 100,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": self.repetition_penalty > 0,
            "presence_penalty": -2 <= self.presence_penalty <= 2,
            "frequency_penalty": -2 <= self.frequency_penalty <= 2,
            "n": 1 <= self.n <= 128,
            # reply i draws from a torch generator seeded with seed + i: each must fit its 64 bits
            "seed": self.seed is None or -(2**63) <= self.seed <= 2**64 - self.n,
            "logprobs": self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
        }
        for name, ok in checks.items():
            if not ok:
                raise SamplingError(name, f"invalid value {getattr(self, name)!r}")
        if any(not s for s in self.stop):
            raise SamplingError("stop", "stop strings must not be empty")


def per_prompt(params: SamplingParams | list[SamplingParams], count: int) -> list[SamplingParams]:
    """An engine's `generate` takes one params for all prompts or one per prompt (e.g. a seed each)."""
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"{len(params)} sampling params for {count} prompts")
    return list(params)


@dataclass
class RowParams:
    """The sampling settings of the rows of a batch, as (B,) tensors."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor

    @classmethod
    def of(cls, params: list[SamplingParams], device) -> RowParams:
        def col(name, dtype=torch.float32):
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        return cls(col("temperature"), col("top_p"), col("top_k", torch.long), col("repetition_penalty"),
                   col("presence_penalty"), col("frequency_penalty"))


def apply_penalties(logits: torch.Tensor, rows: RowParams, seen: torch.Tensor, reply_counts: torch.Tensor) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool: token occurs in prompt or reply; reply_counts (B, V) in the reply."""
    penalty = rows.repetition_penalty[:, None]
    if bool((penalty != 1).any()):
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if bool((rows.presence_penalty != 0).any() or (rows.frequency_penalty != 0).any()):
        counts = reply_counts.to(logits.dtype)
        logits = logits - rows.presence_penalty[:, None] * (counts > 0) - rows.frequency_penalty[:, None] * counts
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus to -inf. logits (B, V); top_k, top_p (B,)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    drop = rank >= k
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it is < top_p
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, rows: RowParams, generators: list[torch.Generator]) -> torch.Tensor:
    """(B,) next tokens: argmax where temperature is 0, else a draw from each row's own generator.

    A draw is inverse-CDF sampling: one uniform number from the row's generator, looked up in the row's
    cumulative probabilities, all rows at once. Per-row `torch.multinomial` calls cost more than the
    model's own decode step on CPU at small batch; this costs one batched cumsum.
    """
    greedy = logits.argmax(dim=-1)
    sampled_rows = (rows.temperature > 0).nonzero().flatten().tolist()
    if not sampled_rows:
        return greedy
    idx = torch.tensor(sampled_rows, device=logits.device)
    scaled = logits[idx] / rows.temperature[idx, None]
    top_k, top_p = rows.top_k[idx], rows.top_p[idx]
    if bool(((top_k > 0) & (top_k < scaled.shape[-1])).any() or (top_p < 1).any()):  # the sort is costly: only if needed
        scaled = filter_top_k_top_p(scaled, top_k, top_p)
    cdf = scaled.softmax(dim=-1).float().cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, generator=generators[row]) for row in sampled_rows]).to(cdf.device)
    # The first token whose cumulative mass exceeds u * total: a token of zero probability is never picked.
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(-1)
    tokens = greedy.clone()
    tokens[idx] = picked.clamp(max=scaled.shape[-1] - 1)
    return tokens
