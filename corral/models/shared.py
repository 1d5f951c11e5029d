"""Several models over one copy of base weights (PPO's actor, reference, reward model and critic).

A *view* is a model built on the meta device whose parameters are then pointed, by name, at the
tensors of an already loaded model: the causal LM and the sequence classifier of one architecture
name their backbone alike (`model.layers.0...`), so a reward model or critic over the actor's base
costs only its adapter and its head. peft then adds each role's own adapter to its own view, never
touching the shared tensors (they stay frozen). Only frozen weights may be shared: a fully
fine-tuned model cannot lend its weights to a frozen role.
"""

from __future__ import annotations

import torch


def _base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a (peft-wrapped) model by their plain names; adapter weights and heads peft
    added are left out. peft moves an adapted Linear's weight to `<name>.base_layer.weight`: same tensor."""
    from corral.models.forward import unwrap

    model = unwrap(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return {name.replace(".base_layer", ""): p for name, p in model.named_parameters(remove_duplicate=False)
            if not any(part in name for part in ("lora_", "modules_to_save", "original_module"))}  # fmt: skip


def base_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of one plain copy of `model`'s base weights."""
    return weight_bytes_of(_base_tensors(model).values())


def share_into(view: torch.nn.Module, source: torch.nn.Module) -> list[str]:
    """Point every parameter of `view` that `source` has by the same name and shape at `source`'s
    tensor; give the rest fresh zero tensors. Returns the names that were not shared."""
    lent = _base_tensors(source)
    device = next(iter(lent.values())).device
    own = []
    for name, param in list(view.named_parameters(remove_duplicate=False)):
        module_name, _, attr = name.rpartition(".")
        module = view.get_submodule(module_name)
        tensor = lent.get(name)
        if tensor is not None and tensor.shape == param.shape:
            module._parameters[attr] = tensor
        else:
            own.append(name)
            module._parameters[attr] = torch.nn.Parameter(torch.zeros(param.shape, dtype=param.dtype, device=device),
                                                          requires_grad=param.requires_grad)  # fmt: skip
    for name, buffer in list(view.named_buffers()):
        if buffer.is_meta:
            raise RuntimeError(f"shared view: buffer {name} was left on the meta device")
    return own


def view_of(source: torch.nn.Module, model_class, dtype: torch.dtype, **config_overrides) -> torch.nn.Module:
    """A `model_class` (e.g. AutoModelForSequenceClassification) over `source`'s weights."""
    from accelerate import init_empty_weights

    from corral.models.forward import unwrap

    base = unwrap(source)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    settings = {**base.config.to_dict(), **config_overrides}
    if "num_labels" in config_overrides:  # a head of another size: the label maps go with it
        settings.pop("id2label", None), settings.pop("label2id", None)
    config = base.config.__class__.from_dict(settings)
    with init_empty_weights(include_buffers=False):
        view = model_class.from_config(config, dtype=dtype, attn_implementation=base.config._attn_implementation)
    share_into(view, base)
    return view.eval()


def weight_bytes(*models: torch.nn.Module) -> int:
    """Bytes of distinct parameter storage across `models` (shared tensors counted once)."""
    return weight_bytes_of(p for model in models for p in model.parameters())


def weight_bytes_of(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
