"""LoRA / QLoRA / prefix tuning through peft; folding an adapter into its base."""

from __future__ import annotations

from pathlib import Path

import torch


def add_lora(model, r: int, alpha: int, dropout: float, target_modules, quantized: bool = False,
             gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM",
             modules_to_save: list[str] | None = None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Casts norms to fp32 and makes inputs require grad, as QLoRA needs on a frozen 4-bit base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return trainable_in_float32(get_peft_model(model, config))


def trainable_in_float32(model):
    """Every trainable parameter in float32 over a bf16 / fp16 base: peft keeps its LoRA matrices so, but copies
    `modules_to_save` (a reward model's score head) in the base's dtype, where AdamW would drop small updates."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return model


def add_prefix(model, num_virtual_tokens: int):
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type="CAUSAL_LM"))


def is_adapter(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def uses_prefix(model) -> bool:
    """Prefix tuning feeds trained key/values as a cache: packing and custom position ids cannot apply."""
    if not is_adapter(model):
        return False
    return any(getattr(c, "peft_type", None) is not None and c.peft_type.value == "PREFIX_TUNING"
               for c in model.peft_config.values())


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, dtype: str = "auto") -> Path:
    """Fold a LoRA adapter into its base and write a plain HF folder (as Alpaca-LoRA's export did).

    A QLoRA adapter is a LoRA adapter too: its base is loaded unquantized, in `dtype`, and the adapter folded into
    those weights (folding it into 4-bit weights would round most of it away). The result is close to, not equal
    to, the 4-bit model with its adapter, which saw the base through NF4 rounding. Prompt-learning adapters (prefix
    tuning, prompt tuning, p-tuning) are refused before anything is loaded: they train virtual tokens, not weights."""
    from peft import PeftConfig

    from corral.models.load import load_model, load_tokenizer, save_model

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json)")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if config.is_prompt_learning:
        kind = "a prefix-tuning" if config.peft_type.value == "PREFIX_TUNING" else f"a {config.peft_type.value}"
        raise ValueError(f"{adapter_dir} is {kind} adapter: it trains virtual tokens fed to the model (a prefix, a "
                         "cache), not weights, so there is nothing to fold into the base; serve it as an adapter")
    model = load_model(str(adapter_dir), dtype=dtype, device="cpu")  # never quantized: see above
    merged = model.merge_and_unload()
    weights = str(next(merged.parameters()).dtype).removeprefix("torch.")
    card = {"title": f"Corral merge of {adapter_dir}", "recipe": "corral merge", "adapter": str(adapter_dir),
            "method": f"{config.peft_type.value} adapter merged into its unquantized base ({weights})"}
    # template None: the adapter folder's tokenizer already carries the template it was trained with.
    return save_model(merged, load_tokenizer(str(adapter_dir)), None, output_dir, card=card)


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
