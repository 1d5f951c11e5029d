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


def final_hidden(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, H) final normed hidden states.

    Position ids restarting inside a row mark packed samples: transformers then builds a
    block-diagonal causal mask, so packed samples never attend to each other. Prefix tuning
    supplies its trained prefix as a cache, so it gets no position ids (no packing either).
    `logits_to_keep=1` keeps the model from building full-vocabulary logits we do not need.
    A 4-D `attention_mask` (`pair_attention_mask`) is used as given, instead of the causal one.
    """
    if uses_prefix(unwrap(model)):
        if attention_mask is not None:
            raise ValueError("prefix tuning prepends its own keys: it cannot take a 4-D attention mask")
        position_ids = None
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)  # fmt: skip
    return out.hidden_states[-1]


def takes_pair_mask(model) -> bool:
    """Whether the model's attention takes a custom 4-D mask (`pair_attention_mask`). SDPA and eager do.
    flash-attention 2 does not: it takes padding masks only (as variable-length sequences), so preference pairs
    run as two sequences there. Prefix tuning prepends keys the mask would not cover, and a 4-D mask replaces the
    sliding-window masks of models that have them (Mistral, Gemma 2 / 3): those run two sequences too."""
    model = unwrap(model)
    config = model.config
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and not uses_prefix(model) and not sliding


def shared_prompt_path(asked: bool, model, log=print) -> bool:
    """Whether preference pairs run as one shared-prompt sequence: when asked (`train.shared_prompt`) and the
    model's attention takes the 4-D mask. Otherwise as two sequences, which compute the same losses."""
    if asked and not takes_pair_mask(model):
        # flash-attention 2 has no 4-D mask; on a GPU the two-sequence path's speed there is still to be measured.
        config = unwrap(model).config
        log(f"train.shared_prompt: this model's attention ({getattr(config, '_attn_implementation', None)}"
            f"{', sliding window' if getattr(config, 'sliding_window', None) else ''}) takes no 4-D pair mask; "
            "each pair runs as two sequences")
        return False
    return asked


def pair_attention_mask(model, segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) attention mask of shared-prompt pair rows (`data.preference.collate_shared`): causal, except
    that a rejected token never sees a chosen one. `segments` (B, L) holds PROMPT, CHOSEN, REJECTED, PADDING.

    transformers passes a 4-D mask to attention unchanged. SDPA takes it as booleans (True: attend), as
    transformers' own SDPA masks are; the eager path adds it to the scores, so there it is 0 / the dtype's
    minimum. Padding follows every real token, so causality alone keeps real tokens from seeing it; padding
    rows see the tokens before them, so no row is all masked (which would give NaN)."""
    from corral.data.preference import CHOSEN, REJECTED

    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    crossing = (segments[:, :, None] == REJECTED) & (segments[:, None, :] == CHOSEN)
    allowed = (causal & ~crossing)[:, None]
    model = unwrap(model)
    if getattr(model.config, "_attn_implementation", None) == "eager":
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed
