"""Running a causal LM for training: final hidden states and the output head, for any wrapping."""

from __future__ import annotations

import torch

from corral.models.adapters import uses_prefix


def unwrap(model):
    """The model inside DDP/accelerate wrappers (peft wrappers are kept)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def output_head(model):
    """The output head, to run on the hidden states the forward returned (at the positions with a target only).

    Under FSDP2 the head belongs to a sharded group (with the tied embedding and the final norm) whose hooks run
    whenever one of its modules is called. Called after the forward, the head would register that group's
    post-backward on its own input, which reshards the weights as soon as the head's backward is done, before the
    norm and the embedding have run theirs. So there its weights are applied as a plain function: after the forward
    they are still gathered (accelerate leaves that group unsharded until the backward), and the group's
    post-backward runs once, at the end of the backward.
    """
    head = unwrap(model).get_output_embeddings()
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(head, FSDPModule):
            return lambda hidden: torch.nn.functional.linear(hidden, head.weight, head.bias)
    return head


def final_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, L, H) final normed hidden states.

    Position ids restarting inside a row mark packed samples: transformers then builds a
    block-diagonal causal mask, so packed samples never attend to each other. Prefix tuning
    supplies its trained prefix as a cache, so it gets no position ids (no packing either).
    `logits_to_keep=1` keeps the model from building full-vocabulary logits we do not need.
    """
    if uses_prefix(unwrap(model)):
        position_ids = None
    out = model(
        input_ids=input_ids, position_ids=position_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1
    )
    return out.hidden_states[-1]
