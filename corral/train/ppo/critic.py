"""The critic: a per-token value head. Started from a reward model (DeepSpeed-Chat's practice): its
backbone and its scalar `score` head, read at every reply position instead of only the last one."""

from __future__ import annotations

import torch

from corral.models.reward import _classifier
from corral.train.ppo.rollout import reply_positions


class Critic(torch.nn.Module):
    def __init__(self, reward_model):
        super().__init__()
        self.model = reward_model

    def forward(self, input_ids, attention_mask, reply_mask, reply_start) -> torch.Tensor:
        """(B, T) V(s_t): the value of the state before reply token t, 0 on padding."""
        classifier = _classifier(self.model)
        backbone = getattr(classifier, classifier.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        B, T = reply_mask.shape
        rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
        pos = reply_positions(reply_start, T).clamp(max=input_ids.shape[1] - 1)
        return classifier.score(hidden[rows, pos]).squeeze(-1).float() * reply_mask
