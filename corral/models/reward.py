"""Reward models: a causal LM's backbone with a scalar head, read at each sequence's last real token.

The model is transformers' `AutoModelForSequenceClassification` with one label (`load_model(head="score")`), so a saved reward
model is a standard folder (full, or a peft adapter whose `score` head is saved with it). Its own
pooling is not used: it finds the last token by looking for the pad token, which is wrong when pad
and end-of-turn are the same token (SmolLM2, Qwen, ...) and every reply ends with it. Corral reads
the score at the last position of the attention mask instead, right for left and right padding.
"""

from __future__ import annotations

import torch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token, for right or left padding. attention_mask (B, L)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


def _classifier(model):
    from corral.models.forward import unwrap

    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) reward of each sequence: the scalar head on the final hidden state of its last real token."""
    return scores_at(model, input_ids, last_token_index(attention_mask)[:, None], attention_mask=attention_mask)[:, 0]


def scores_at(model, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) rewards read at `positions` (B, K) of each row: a shared-prompt pair row (a 4-D mask from
    `models.forward.pair_attention_mask`) is scored at the last token of each reply."""
    classifier = _classifier(model)
    backbone = getattr(classifier, classifier.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], positions]
    return classifier.score(picked).squeeze(-1).float()
