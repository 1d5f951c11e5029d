"""`corral quickstart`: LoRA SFT of the embedded model on Corral's identity data, answers before and after."""

from __future__ import annotations

import time

from corral.chat.conversation import Conversation
from corral.chat.templates import get_template
from corral.config import QuickstartConfig, SFTConfig
from corral.generate.chat import generate_replies
from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingParams
from corral.models.load import load_model, load_tokenizer
from corral.recipes import sft


def ask(model, template, prompts: list[str], max_new_tokens: int) -> list[str]:
    conversations = [Conversation.from_pairs(("user", p)) for p in prompts]
    # Greedy with a mild repetition penalty: a 135M model loops without one.
    params = SamplingParams(max_new_tokens=max_new_tokens, repetition_penalty=1.2)
    return generate_replies(TransformersEngine(model, template.tokenizer), template, conversations, params)


def run(cfg: QuickstartConfig):
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.template, tokenizer)
    base = load_model(cfg.model, dtype=cfg.dtype)
    print(f"asking the base model {cfg.model} ...")
    before = ask(base, template, cfg.prompts, cfg.max_new_tokens)
    del base

    sft_cfg = SFTConfig.model_validate(cfg.model_dump(exclude={"prompts", "max_new_tokens"}))
    result = sft.run(sft_cfg)

    tuned = load_model(str(result.model_dir), dtype=cfg.dtype)  # the adapter folder, as a user would load it
    tuned_template = get_template("auto", load_tokenizer(str(result.model_dir)))  # the template saved with it
    after = ask(tuned, tuned_template, cfg.prompts, cfg.max_new_tokens)

    print("\n" + "=" * 78)
    for prompt, b, a in zip(cfg.prompts, before, after):
        print(f"USER: {prompt}\n  before: {b}\n  after:  {a}\n")
    summary = result.summary
    print("=" * 78)
    print(f"trained {summary['steps']} steps, final train loss {summary['loss']:.4f}"
          + (f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else ""))
    out = result.model_dir.parent
    print(f"adapter (peft folder):  {result.model_dir}")
    print(f"checkpoints:            {out / 'checkpoints'}")
    print(f"metrics:                {out / 'metrics.jsonl'}")
    print(f"loss curve:             {out / 'loss.png'}")
    print(f"config:                 {out / 'config.yaml'}")
    print(f"merge into a full model: corral merge --adapter {result.model_dir} --output_dir {out / 'merged'}")
    print(f"quickstart took {time.perf_counter() - started:.0f} s")
    return result, before, after
