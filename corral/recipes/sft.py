"""`corral sft`: supervised fine-tuning (full, LoRA, QLoRA, prefix tuning) on conversations."""

from __future__ import annotations

from functools import partial

from corral.chat.templates import get_template
from corral.config import SFTConfig
from corral.data.clean import conversations_to_samples
from corral.data.formats import read_conversations
from corral.data.mix import load_records
from corral.data.pack import collate, pack_rows, single_rows
from corral.models.adapters import add_lora, add_prefix, is_adapter, trainable_parameter_count, uses_prefix
from corral.models.forward import final_hidden, output_head, unwrap
from corral.models.load import frozen_dtype, load_model, load_tokenizer, master_dtype
from corral.recipes.runs import RecipeResult, begin_run, data_of, saver, system_prompt_policy, split_eval, train_summary
from corral.train.loop import train
from corral.train.losses import token_nll_sum


def sft_loss(model, batch):
    """Summed next-token loss over assistant tokens, and their count."""
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    rows, length = input_ids.shape
    if rows > 1 and flash_attention_2(model) and not uses_prefix(unwrap(model)):
        # flash-attention 2 takes no attention mask: transformers splits attention at the samples packed in a row
        # (where the position ids restart) only for a batch of one row, and runs plain causal attention over each
        # row otherwise, every sample seeing the ones packed before it. So the rows go in as one row: every row
        # and every packed sample starts at position 0, a segment of its own. (Padding continues the positions of
        # its row's last sample: it stays in that segment, after every real token, and has no targets.)
        flat = final_hidden(model, input_ids.reshape(1, -1), position_ids.reshape(1, -1))
        hidden = flat.view(rows, length, -1)
    else:
        hidden = final_hidden(model, input_ids, position_ids)
    return token_nll_sum(hidden, output_head(model), batch["targets"])


def flash_attention_2(model) -> bool:
    return getattr(unwrap(model).config, "_attn_implementation", None) == "flash_attention_2"


def prepare_model(cfg: SFTConfig, device, mixed_precision: str = "no"):
    quant_bits = cfg.quant.bits if cfg.method == "qlora" else None
    # Full fine-tuning keeps float32 master weights (bf16 only when asked): autocast does the low-precision compute.
    # The frozen base of an adapter is stored as autocast computes it (`frozen_dtype`: bf16 on CPUs that compute it).
    dtype = master_dtype(cfg.dtype) if cfg.method == "full" else frozen_dtype(cfg.dtype, mixed_precision, device)
    model = load_model(cfg.model, dtype=dtype, device=device, quant_bits=quant_bits)
    if is_adapter(model):
        raise ValueError(f"model={cfg.model} is an adapter folder; merge it first (corral merge) to train on top of it")
    if cfg.method in ("lora", "qlora"):
        model = add_lora(
            model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
            quantized=cfg.method == "qlora", gradient_checkpointing=cfg.train.gradient_checkpointing,
        )  # fmt: skip
    elif cfg.method == "prefix":
        model = add_prefix(model, cfg.prefix.num_virtual_tokens)
    return model


def run(cfg: SFTConfig) -> RecipeResult:
    run_ = begin_run(cfg, "sft")
    accelerator, out, log = run_.accelerator, run_.out, run_.log
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.template, tokenizer)
    reader = partial(read_conversations, data_format=cfg.data.format, skip_invalid=cfg.data.skip_invalid)
    conversations = load_records(reader, cfg.data.path, cfg.data.sources, cfg.data.mix_seed, cfg.data.split,
                                 cfg.data.split_stage, cfg.data.split_seed, log)
    if cfg.data.eval_path:
        train_convs = conversations
        eval_convs, eval_report = read_conversations(cfg.data.eval_path, cfg.data.format, cfg.data.skip_invalid)
        log(eval_report.summary())
    else:
        train_convs, eval_convs = split_eval(conversations, cfg.data.eval_fraction, cfg.train.seed)
    as_seen = system_prompt_policy(template, cfg.data.template_system, log)
    train_convs, eval_convs = [as_seen(c) for c in train_convs], [as_seen(c) for c in eval_convs]
    samples, split_report = conversations_to_samples(train_convs, template, cfg.train.max_len)
    log(f"train: {split_report.summary()}")
    pack = cfg.data.pack and cfg.method != "prefix"
    if cfg.data.pack and not pack:
        log("note: packing is off for prefix tuning (its prefix is a cache, which packing cannot share)")
    rows = pack_rows(samples, cfg.train.max_len) if pack else single_rows(samples)
    eval_rows = []
    if eval_convs:
        eval_samples, eval_split = conversations_to_samples(eval_convs, template, cfg.train.max_len)
        eval_rows = single_rows(eval_samples)
        log(f"eval: {eval_split.summary()}")
    n_tokens = sum(len(r.input_ids) for r in rows)
    n_targets = sum(r.num_targets for r in rows)
    log(f"{len(rows)} rows ({'packed' if pack else 'one sample each'}), {n_tokens} tokens, {n_targets} trained; "
        f"world size {accelerator.num_processes}")

    model = prepare_model(cfg, accelerator.device, accelerator.mixed_precision)
    trainable, total = trainable_parameter_count(model)
    log(f"model {cfg.model} ({cfg.method}): {trainable:,} trainable of {total:,} parameters; template {template.name}")
    # Every folder carries the template we trained with, so plain transformers/vLLM prompt the same way.
    card = {"title": f"Corral SFT ({cfg.method}) of {cfg.model}", "recipe": "corral sft", "method": cfg.method,
            "data": data_of(cfg.data)}
    save = saver(tokenizer, template, card)

    result = train(
        model, rows,
        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id), loss_fn=sft_loss, settings=cfg.train,
        output_dir=out, save_model=save, accelerator=accelerator,
        eval_rows=eval_rows, config=cfg.model_dump(mode="json"),
    )  # fmt: skip
    model_dir = out / "model"
    card["metrics"] = {"train loss": result.last_loss, "eval loss": result.eval_loss, "steps": result.steps}
    result.save(model_dir)  # every process: under FSDP / ZeRO-3 the weights are gathered from all of them
    log(f"final model: {model_dir}\nmetrics: {result.metrics_path}\nloss curve: {out / 'loss.png'}")
    accelerator.wait_for_everyone()
    return RecipeResult(model_dir, train_summary(result))
