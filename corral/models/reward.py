"""Reward models: a causal LM's backbone with a scalar head, read at each sequence's last real token.

The model is transformers' `AutoModelForSequenceClassification` with one label, so a saved reward
model is a standard folder (full, or a peft adapter whose `score` head is saved with it). Its own
pooling is not used: it finds the last token by looking for the pad token, which is wrong when pad
and end-of-turn are the same token (SmolLM2, Qwen, ...) and every reply ends with it. Corral reads
the score at the last position of the attention mask instead, right for left and right padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from corral.models.load import ModelLoadError, attention_implementation, default_device, resolve_dtype, resolve_model


def load_reward_model(name: str, dtype: str = "auto", device=None, pad_token_id: int | None = None,
                      trainable_adapter: bool = False):
    """A reward model from a base LM (new random head), a saved reward model, or a reward-model adapter."""
    from transformers import AutoModelForSequenceClassification

    device = torch.device(device) if device is not None else default_device()
    resolved = resolve_model(name)
    if resolved.adapter:
        task = json.loads((Path(resolved.adapter) / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise ModelLoadError(f"{name} is a {task} adapter, not a reward model (SEQ_CLS) adapter")
    kwargs = {"dtype": resolve_dtype(dtype, device), "attn_implementation": attention_implementation(device),
              "num_labels": 1}
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    try:
        model = AutoModelForSequenceClassification.from_pretrained(resolved.path, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"could not load a reward model from '{name}' ({resolved.path}): {e}") from e
    model.to(device)
    if resolved.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.adapter, is_trainable=trainable_adapter)
    model.eval()
    return model


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
    classifier = _classifier(model)
    backbone = getattr(classifier, classifier.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = last_token_index(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return classifier.score(picked).squeeze(-1).float()
