"""Configs are data: pydantic models of every recipe's config, YAML files and dotted CLI overrides.

Every field is documented once, here. Unknown keys and wrong types are errors that name the key.
Defaults work on the embedded model (`smollm2-135m`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator)

from corral.atomic import atomic_write_text
from corral.export import K_QUANTS, WRITTEN_OUTTYPES

EMBEDDED_MODEL = "smollm2-135m"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


# A list key that also takes one value: `--model X` once gives a string, twice a list.
StrList = Annotated[list[str], BeforeValidator(lambda value: [value] if isinstance(value, str) else value)]


# Types several configs share, each documented once here.
DType = Annotated[Literal["auto", "float32", "bfloat16", "float16"], Field(
    description="Weight dtype: `auto` is float32 on CPU, bf16 on GPUs that support it, else float16.")]
TemplateName = Annotated[str, Field(
    description="Chat template: a registered name (vicuna_v1.1, alpaca, chatml, llama2, llama3) or `auto`, the "
    "tokenizer's own chat_template (a model Corral saved carries the template it was trained with).")]
ModelName = Annotated[str, Field(
    description="Hub id, local HF folder, peft adapter folder, .gguf file, or `smollm2-135m` (the embedded model).")]
ConversationFormat = Literal["auto", "sharegpt", "openai", "alpaca", "self_instruct"]
Role = Literal["user", "assistant", "system"]


def _merge_onto(default: dict, given: dict) -> dict:
    merged = dict(default)
    for key, value in given.items():
        merged[key] = _merge_onto(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _keep_section_defaults(cls, data: Any) -> Any:
        """A section whose default sets some values (reward's `train.lr=1e-4`) keeps them when the user gives
        other keys of that section (`train.max_steps=3`): the given keys go on top of the default's."""
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            default, given = field.default, data.get(name)
            if isinstance(default, BaseModel) and isinstance(given, dict):
                data = {**data, name: _merge_onto(default.model_dump(exclude_unset=True), given)}
        return data


class SourceConfig(Section):
    path: str = Field(..., description="A data file or `builtin:NAME`, read with the section's format.")
    name: str = Field("", description="Name in the mixture report (default: the path).")
    weight: float = Field(1.0, ge=0, description="Take weight x the source's size (0.5: a random half, 2: twice).")
    count: int = Field(0, ge=0, description="Take exactly this many records instead (0: use weight).")


class MixtureFields(Section):
    """Where a recipe's records come from besides `path`: a Koala-style mixture, and the DeepSpeed-Chat
    stage split (SFT, reward, RL) applied after it. Each data section sets its stage's default."""

    sources: list[SourceConfig] = Field(default_factory=list, description="A mixture of several sources (instead "
                                        "of `path`), each with a weight or a count (Koala-style).")
    mix_seed: int = Field(1234, description="Seed of the mixture.")
    split: str = Field("", description="DeepSpeed-Chat stage split of the data, e.g. `2,4,4` (SFT, reward, RL); "
                       "empty: all of it.")
    split_stage: int = Field(0, ge=0, description="Which part of `split` this run uses (0-based: SFT 0, reward 1, RL 2).")
    split_seed: int = Field(1234, description="Seed of the stage split: every stage must use the same one.")
    template_system: bool = Field(True, description="Let the template add its default system prompt to records that "
                                  "have none (template=auto on SmolLM2 adds 'You are a helpful AI assistant named "
                                  "SmolLM...'; the run says so when a template does). false: such records get an empty "
                                  "system message instead, so no text the data does not have is added (a template that "
                                  "renders system turns still writes an empty one).")
    hub_split: str = Field("", description="The split of a Hub data set (`path=org/name`) to read; empty: `train`. "
                           "datasets' slices work (`train[:1000]`). (`split` is the stage split.)")
    subset: str = Field("", description="The subset (configuration name) of a Hub data set.")
    revision: str = Field("", description="The revision of a Hub data set: a branch, tag or commit.")

    @model_validator(mode="before")
    @classmethod
    def _hub_options_into_path(cls, data: Any) -> Any:
        """`hub_split`, `subset` and `revision` travel with the path (`org/name?subset=..&split=..&revision=..`),
        so every reader of `path`, whichever recipe calls it, loads the same data set. A mixture source gives
        them in its own path."""
        if not isinstance(data, dict):
            return data
        keys = {"subset": "subset", "hub_split": "split", "revision": "revision"}  # config key -> path option
        given = {key: data[name] for name, key in keys.items() if data.get(name)}
        if not given:
            return data
        from corral.data.formats import DataError, HubDataset, parse_hub_id

        path = str(data.get("path") or "")
        names = ", ".join(name for name in keys if data.get(name))
        try:
            hub = parse_hub_id(path)
        except DataError as e:
            raise ValueError(str(e)) from None
        if hub is None:
            raise ValueError(f"{names}: for a data set on the Hub, path=org/name (path is {path!r})")
        for key, value in given.items():
            if getattr(hub, key) and getattr(hub, key) != value:
                raise ValueError(f"path {path!r} gives {key}={getattr(hub, key)}, the config {value}")
        hub = HubDataset(hub.repo, **{key: given.get(key) or getattr(hub, key) for key in ("subset", "split", "revision")})
        return {**data, "path": ("hf://datasets/" if path.startswith("hf://") else "") + str(hub)}


class DataConfig(MixtureFields):
    path: str = Field("", description="Conversation data: .json, .jsonl, .parquet file, a local `datasets` folder, "
                      "or a data set on the Hugging Face Hub, `org/name` (with hub_split, subset, revision).")
    format: ConversationFormat = Field(
        "auto", description="Record format; `auto` detects it per record from the fields present."
    )
    skip_invalid: bool = Field(False, description="Drop invalid records (counted and reported) instead of failing.")
    pack: bool = Field(True, description="Pack several samples into one sequence (no attention across samples).")
    eval_path: str = Field("", description="Optional held-out conversations for evaluation.")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Hold out this fraction of `path` for evaluation when `eval_path` is empty."
    )


class OptimConfig(Section):
    """How one set of weights is optimized: the one optimizer factory and schedule (`train/optim.py`) read it."""

    optimizer: Literal["adamw", "lion", "adamw_8bit"] = Field(
        "adamw", description="adamw (torch), lion (one state per weight), adamw_8bit (bitsandbytes)."
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (after warmup).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (Lion: 3-10x AdamW's).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Optimizer betas (Lion: typically (0.9, 0.99)).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the optimizer steps spent warming up linearly.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this; 0 disables clipping.")


class RunConfig(Section):
    """What every training run shares: precision, checkpoints and resume, logging, seed."""

    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 on GPUs and CPUs that compute it natively (AMX, AVX512-BF16), none on other "
        "CPUs (CORRAL_CPU_BF16=0|1 forces the CPU's answer)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    save_every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0: only at the end).")
    save_total_limit: int = Field(2, ge=1, description="Keep only the newest N step checkpoints.")
    resume: str = Field("auto", description="`auto` (newest complete checkpoint, if any), `never`, or a checkpoint path.")
    log_every: int = Field(1, ge=1, description="Write metrics every N steps.")
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers that also get every metrics line (one name or a list; `none`: no tracker; "
        "metrics.jsonl and the PNG plots are always written). tensorboard: event files in `output_dir/tensorboard`. "
        "wandb: project WANDB_PROJECT or `corral`, files in `output_dir/wandb` unless WANDB_DIR is set; WANDB_MODE "
        "decides when set, else online if an API key is configured (WANDB_API_KEY or `wandb login`) and offline "
        "if not (instead of asking for a login; upload later with `wandb sync`). trackio: project `corral`, stored "
        "locally (TRACKIO_DIR) or in the Space TRACKIO_SPACE_ID. Each needs its package: pip install 'corral[track]'.",
    )
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many_trackers(cls, value: Any) -> Any:
        # `train.report_to=tensorboard` gives a string; `none` is the Hugging Face spelling of no tracker.
        if isinstance(value, str):
            value = [value]
        return [] if value in (["none"], [None]) else value


class TrainConfig(OptimConfig, RunConfig):
    """The shared loop's settings (SFT, reward model, DPO): the optimizer and run fields, plus the data passes."""

    max_steps: int = Field(0, ge=0, description="Optimizer steps to run; 0 means use `epochs`.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when `max_steps` is 0.")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch, per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one optimizer step.")
    max_len: int = Field(512, ge=8, description="Maximum sequence length in tokens.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the held-out data every N steps (0: only at the end).")
    shared_prompt: bool = Field(True, description="Reward model and DPO: run each pair as one sequence, the prompt "
                                "once, then both replies kept apart by the attention mask (same losses as two "
                                "sequences, fewer tokens). false: two sequences. flash-attention 2 always runs two.")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or `all-linear` (every linear layer but the output head)."
    )


class PrefixConfig(Section):
    num_virtual_tokens: int = Field(16, ge=1, description="Trained prefix length (prefix tuning).")


class QuantConfig(Section):
    bits: Literal[4, 8] = Field(4, description="Base-model weight bits for QLoRA (4: NF4 with double quantization).")


class SFTConfig(Section):
    model: str = Field(EMBEDDED_MODEL, description="Hub id, local HF folder, .gguf file, or `smollm2-135m`.")
    template: TemplateName = "auto"
    method: Literal["full", "lora", "qlora", "prefix"] = Field("lora", description="What is trained.")
    output_dir: str = Field("runs/sft", description="Where checkpoints, metrics and the final model go.")
    dtype: DType = "auto"
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    prefix: PrefixConfig = PrefixConfig()
    quant: QuantConfig = QuantConfig()


class QuickstartConfig(SFTConfig):
    prompts: list[str] = Field(
        default_factory=lambda: [
            "Who are you?",
            "What is your name?",
            "Who trained you?",
            "What is the capital of France?",
        ],
        description="Asked before and after training.",
    )
    max_new_tokens: int = Field(48, ge=1, description="Reply length limit for the before/after answers.")


class MergeConfig(Section):
    adapter: str = Field(..., description="A peft adapter folder (e.g. an SFT run's `model/`).")
    output_dir: str = Field(..., description="Where the merged HF model folder is written.")
    dtype: DType = "auto"


ShardMB = Annotated[int, Field(ge=1, description="Largest weight file written, in MiB (a larger tensor gets a file of "
                               "its own). Memory stays near one such file plus a block of rows, whatever the model's size.")]


class DeltaMakeConfig(Section):
    base: str = Field(..., description="The model the delta is taken against (hub id, local HF folder, .gguf file, "
                      "`smollm2-135m`); whoever applies the delta needs it.")
    target: str = Field(..., description="The fine-tuned model (hub id or HF folder, safetensors weights): the base's "
                        "tensor names and shapes, or more vocabulary rows.")
    output_dir: str = Field(..., description="Where the delta folder (weights, delta.json manifest, config, tokenizer, "
                            "model card) is written.")
    dtype: Literal["target", "float32", "bfloat16", "float16"] = Field(
        "target", description="Storage dtype of the deltas. `target`: each tensor's own; float32 restores a float32 "
        "target within 1 ulp; float16 halves that file and restores each weight within 1/2048 of its change.")
    max_shard_mb: ShardMB = 500


class DeltaApplyConfig(Section):
    base: str = Field(..., description="The model the delta was made from (any name the loader takes); checked tensor "
                      "by tensor against the delta's manifest.")
    delta: str = Field(..., description="A delta folder written by `corral delta make`.")
    output_dir: str = Field(..., description="Where the rebuilt model, a plain HF folder, is written.")
    max_shard_mb: ShardMB = 500


class InspectConfig(Section):
    model: str = Field(EMBEDDED_MODEL, description="Model whose tokenizer renders the samples.")
    template: TemplateName = "auto"
    data: DataConfig = DataConfig()
    max_len: int = Field(512, ge=8, description="Split conversations longer than this, as training does.")
    num_samples: int = Field(3, ge=0, description="How many rendered samples to print.")



class NearDuplicateConfig(Section):
    """Near-duplicates by MinHash over word shingles (datasketch), in `data clean` and `data stats`."""

    enabled: bool = Field(True, description="Look for near-duplicate conversations.")
    threshold: float = Field(0.85, gt=0, lt=1, description="Estimated Jaccard similarity of the shingle sets at "
                             "which two conversations count as near-duplicates.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (more: a closer estimate, slower).")
    shingle_words: int = Field(5, ge=1, description="Words per shingle.")
    max_words: int = Field(5000, ge=0, description="Only the first N words of a conversation are shingled (0: all).")


class CleanHtmlConfig(Section):
    enabled: bool = Field(True, description="Convert HTML messages (ShareGPT's raw dumps) to Markdown with "
                          "markdownify, keeping code blocks and their language.")
    roles: list[Role] = Field(["assistant"], description="Whose messages are converted (user turns in ShareGPT "
                              "dumps are plain text; converting them would eat literal tags).")
    debris: bool = Field(True, description="Remove ChatGPT-export debris: the 'Copy code' header in code blocks, "
                         "a leading 'N / N' regeneration counter, 'CopyN chars / N words', empty code blocks.")


class CleanTextConfig(Section):
    unicode: bool = Field(True, description="Repair mojibake and broken Unicode with ftfy (quotes, full-width "
                          "forms and HTML entities are left as they are).")
    whitespace: bool = Field(True, description="Normalise whitespace: line ends, odd spaces, trailing spaces, at "
                             "most one blank line outside code blocks.")
    scrub_emails: bool = Field(False, description="Replace e-mail addresses with `email_placeholder`.")
    scrub_phones: bool = Field(False, description="Replace phone numbers (digit groups with separators) with "
                               "`phone_placeholder`.")
    email_placeholder: str = Field("[EMAIL]", description="What replaces an e-mail address.")
    phone_placeholder: str = Field("[PHONE]", description="What replaces a phone number.")


class CleanRolesConfig(Section):
    aliases: dict[str, Role] = Field(default_factory=dict, description="More role names, e.g. {model: assistant}, "
                                     "besides human, user, gpt, assistant, chatgpt, bing, bard, system.")
    drop_leading_assistant: bool = Field(True, description="Drop assistant turns before the first user turn.")
    drop_trailing_user: bool = Field(True, description="Drop a user turn left without a reply at the end.")
    merge_consecutive: bool = Field(True, description="Merge consecutive turns of the same role (blank line "
                                    "between); without it such a conversation is rejected.")


class CleanFiltersConfig(Section):
    error_replies: list[str] = Field(
        default_factory=lambda: ["Too many requests in 1 hour", "Too many requests, please slow down",
                                 "network error", "An error occurred. If this issue persists", "Something went wrong",
                                 "There was an error generating a response", "Hmm...something seems to have gone wrong",
                                 "Load failed", "Conversation not found", "The message you submitted was too long"],
        description="A reply that starts with one of these (case-insensitive) and is little longer is a failed "
        "generation saved as a reply ([]: off).")  # fmt: skip
    min_reply_chars: int = Field(1, ge=0, description="Replies shorter than this (stripped) are bad; 1: only "
                                 "empty ones; 0: off.")
    blocklist: list[str] = Field(default_factory=list, description="Phrases that make a reply bad, case-insensitive "
                                 "(off by default; e.g. ['as an AI language model']).")
    wrong_list_numbering: bool = Field(True, description="A reply whose numbered items each restart at 1 (the "
                                       "export lost the numbering; FastChat's filter_wrong_format) is bad.")
    cut: bool = Field(True, description="Keep the exchanges before the first bad turn (false: drop the whole "
                      "conversation); with nothing before it the conversation is dropped.")


class CleanLanguageConfig(Section):
    keep: StrList = Field(default_factory=list, description="ISO 639-1 codes to keep, e.g. [en] (and `unknown` "
                          "for text the detector is unsure of); empty: every language. Detected by py3langid.")
    skip: StrList = Field(default_factory=list, description="ISO 639-1 codes to drop.")
    min_confidence: float = Field(0.5, ge=0, le=1, description="Below this probability the language is `unknown`.")
    max_chars: int = Field(1000, ge=100, description="Characters of a conversation (code blocks left out) read.")


class CleanDedupConfig(Section):
    by_id: bool = Field(True, description="Drop a conversation whose id was seen before.")
    by_first_exchange: bool = Field(True, description="Drop a conversation whose first exchange (system, user, "
                                    "reply; case and spacing ignored) was seen before.")
    near: NearDuplicateConfig = NearDuplicateConfig()


class DataCleanConfig(Section):
    inputs: StrList = Field(default_factory=list, description="Raw conversation files (ShareGPT or OpenAI "
                            "messages; .jsonl, .json, .parquet, compressed or not), read in order.")
    output: str = Field(..., description="Cleaned conversations (JSONL), written atomically; OUT.report.json and "
                        "OUT.rejects.jsonl (every dropped record with its reason) are written beside it.")
    layout: Literal["sharegpt", "openai"] = Field("sharegpt", description="Output records: ShareGPT "
                                                  "`conversations` or OpenAI `messages`.")
    format: ConversationFormat = Field("auto", description="Input record format; `auto` detects it per record.")
    model: str = Field(EMBEDDED_MODEL, description="Model whose tokenizer measures tokens for `split_max_len`.")
    template: TemplateName = "auto"
    split_max_len: int = Field(0, ge=0, description="Split conversations longer than this many tokens at turn "
                               "boundaries, as SFT's train.max_len does (0: no splitting).")
    html: CleanHtmlConfig = CleanHtmlConfig()
    text: CleanTextConfig = CleanTextConfig()
    roles: CleanRolesConfig = CleanRolesConfig()
    filters: CleanFiltersConfig = CleanFiltersConfig()
    language: CleanLanguageConfig = CleanLanguageConfig()
    dedup: CleanDedupConfig = CleanDedupConfig()
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Put this share of the conversations (by a seeded "
                                 "hash of their first exchange) in `test_output` instead.")
    test_output: str = Field("", description="The test conversations (default: OUT with .test.jsonl).")
    seed: int = Field(1234, description="Seed of the train / test split.")
    workers: int = Field(0, ge=0, description="Processes for the record-local steps (read to language) and the "
                         "split; 0: one per CPU core. The output is the same for any number.")
    chunk_size: int = Field(1000, ge=1, description="Records per chunk streamed through the record-local steps.")


class DataStatsConfig(Section):
    model: str = Field(EMBEDDED_MODEL, description="Model whose tokenizer counts the tokens.")
    template: TemplateName = "auto"
    data: DataConfig = DataConfig()
    max_len: int = Field(512, ge=8, description="Count what training with this train.max_len would split.")
    output: str = Field("", description="The Markdown report (default: NAME.stats.md in the current folder, NAME "
                        "being the data file's); the length histogram goes beside it as a PNG.")
    near: NearDuplicateConfig = NearDuplicateConfig()
    near_sample: int = Field(20000, ge=0, description="Conversations (the first N) searched for near-duplicates.")


class PreferenceDataConfig(MixtureFields):
    path: str = Field("", description="Preference pairs: pairs / message-list / Anthropic HH records, or an arena vote file.")
    format: Literal["auto", "pairs", "messages", "hh"] = Field("auto", description="Record format; `auto` detects it.")
    skip_invalid: bool = Field(False, description="Drop invalid records (counted and reported) instead of failing.")
    eval_path: str = Field("", description="Optional held-out preference pairs.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out fraction of `path` when `eval_path` is empty.")
    split_stage: int = Field(1, ge=0, description="Which part of `split` this run uses (reward is 1).")


class RewardConfig(Section):
    model: str = Field(EMBEDDED_MODEL, description="Base model (usually the SFT model) the reward model starts from.")
    template: TemplateName = "auto"
    method: Literal["full", "lora"] = Field("lora", description="Train the whole model, or LoRA plus the score head.")
    output_dir: str = Field("runs/reward", description="Where checkpoints, metrics and the reward model go.")
    dtype: DType = "auto"
    margin: float = Field(0.0, ge=0, description="Loss margin: -log sigmoid(r_chosen - r_rejected - margin).")
    data: PreferenceDataConfig = PreferenceDataConfig()
    train: TrainConfig = TrainConfig(lr=1e-4, epochs=1.0)
    lora: LoraConfig = LoraConfig()


class DPOConfig(Section):
    model: str = Field(EMBEDDED_MODEL, description="The policy to start from (usually the SFT model); also the reference.")
    template: TemplateName = "auto"
    method: Literal["full", "lora"] = Field("lora", description="LoRA: the reference is the base with the adapter "
                                            "disabled (no second copy). Full: a frozen copy, or precompute_ref.")
    output_dir: str = Field("runs/dpo", description="Where checkpoints, metrics and the model go.")
    dtype: DType = "auto"
    loss: Literal["dpo", "ipo", "simpo"] = Field("dpo", description="dpo (sigmoid), ipo (squared), simpo (no reference).")
    beta: float = Field(0.1, gt=0, description="Strength of the pull to the reference (SimPO: reward scale, ~2).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label noise (conservative DPO).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target margin.")
    precompute_ref: bool = Field(False, description="Compute reference log-probs once before training (no "
                                 "reference model in memory during training).")
    data: PreferenceDataConfig = PreferenceDataConfig()
    train: TrainConfig = TrainConfig(lr=5e-5, epochs=1.0)
    lora: LoraConfig = LoraConfig()


class RewardScoreConfig(Section):
    model: str = Field(..., description="A reward model (corral reward output).")
    data: str = Field(..., description="Conversations (ShareGPT / OpenAI / Alpaca) or preference pairs to score.")
    template: TemplateName = "auto"
    output: str = Field("", description="Write scores as JSONL here (default: print them).")
    skip_invalid: bool = Field(False, description="Skip invalid records (counted and reported) instead of failing; "
                               "the file is read as conversations or as pairs, whichever keeps more records.")
    batch_size: int = Field(8, ge=1)
    dtype: DType = "auto"


class ServeConfig(Section):
    models: StrList = Field(
        default_factory=list,
        description="Models to serve, each NAME=PATH or PATH (repeat --model). Empty: the embedded model. "
        "LoRA adapters of one base share a single copy of it.",
    )
    template: TemplateName = "auto"
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 to accept other machines).")
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="Require `Authorization: Bearer KEY` (or set CORRAL_API_KEY).")
    votes: str = Field("arena_votes.jsonl", description="Arena votes from the web chat are appended here (JSONL).")
    engine: Literal["transformers", "vllm"] = Field("transformers", description="`vllm` needs a CUDA GPU.")
    max_batch: int = Field(32, ge=1, description="Most sequences decoded together (continuous batching).")
    compile: bool = Field(False, description="Compile the transformers engine's decode steps of 1-2 rows with "
                          "torch.compile (inductor; needs a C++ compiler on CPU): about 2x the tokens/s of one "
                          "client on CPU; two graphs built at start, 40-50 s on 2 cores (about 12 s from "
                          "inductor's disk cache).")
    pack_weights: bool | Literal["auto"] = Field(
        "auto", description="Keep a copy of the linear weights in oneDNN's own layout on CPU, so that a step skips "
        "rearranging them: 1.2-1.6x the tokens/s of eager steps, for about the weights' size in memory. `auto`: "
        "where that copy takes at most half the memory available.")
    max_tokens: int = Field(512, ge=1, description="Reply length when a request gives no max_tokens (less where the "
                            "prompt leaves less of the context).")
    max_tokens_limit: int | None = Field(None, ge=1, description="The most tokens a request may ask for (a 400 above "
                                         "it). Unset: the model's context, less the prompt.")
    max_queue: int = Field(256, ge=0, description="Replies that may wait for a place in a full batch; past it a "
                           "request gets 429 with Retry-After.")
    max_request_mb: float = Field(4.0, gt=0, description="Largest request body in MB (10^6 bytes); a 413 above it.")
    request_timeout: float | None = Field(None, gt=0, description="Seconds a request may take; one still generating "
                                          "then is cancelled and answered 408. Unset: no limit.")
    shutdown_timeout: float = Field(30.0, ge=0, description="On SIGTERM/Ctrl-C: seconds to let running requests "
                                    "finish before they are cancelled; new connections are refused at once.")
    dtype: DType = "auto"


class ChatConfig(Section):
    model: str = Field(EMBEDDED_MODEL, description="Local model (folder, adapter, .gguf, embedded name), or the "
                       "served model's name with --api.")
    api: str | None = Field(None, description="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the --api key.")
    template: TemplateName = "auto"
    system: str | None = Field(None, description="System prompt (change it in the chat with /system TEXT).")
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float | None = Field(
        None, gt=0, description="Unset: 1.1 for local models (small ones loop without it), not sent with --api."
    )
    max_tokens: int = Field(256, ge=1)
    seed: int | None = Field(None)
    dtype: DType = "auto"
    compile: bool = Field(False, description="A local model's decode step compiled with torch.compile (as `corral "
                          "serve compile=true`): about 2x the tokens/s on CPU, after 40-50 s of building at start.")
    pack_weights: bool | Literal["auto"] = Field(
        "auto", description="A local model's linear weights kept in oneDNN's layout on CPU (as `corral serve "
        "pack_weights`): faster steps, for about the weights' size in memory.")


class PromptDataConfig(MixtureFields):
    path: str = Field("", description="Prompts: any conversation file (the prompt is everything before the last "
                      "assistant turn; a conversation ending with a user turn, or an Alpaca record without `output`, is all "
                      "prompt), or `builtin:NAME`.")
    format: ConversationFormat = Field("auto", description="Record format.")
    skip_invalid: bool = Field(False, description="Drop invalid records (counted and reported) instead of failing.")
    split_stage: int = Field(2, ge=0, description="Which part of `split` this run uses (RL is 2).")
    max_prompt_len: int = Field(256, ge=8, description="Prompts longer than this (in tokens) are dropped and counted.")


class ActorConfig(OptimConfig):
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an EMA of the actor's trainable weights "
                                    "(e.g. 0.992), saved as actor_ema/.")


class RolloutConfig(Section):
    prompts_per_step: int = Field(8, ge=1, description="Prompts per rollout.")
    samples_per_prompt: int = Field(1, ge=1, description="Replies per prompt (at least 2 for rloo / grpo).")
    max_new_tokens: int = Field(64, ge=1, description="Reply length limit.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1)
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="Corral's transformers engine on the live actor weights, or vLLM (CUDA only) "
        "with the actor's adapter synced to it before each rollout.")
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1, description="Share of GPU memory vLLM may take.")
    sample_every: int = Field(5, ge=1, description="Write prompts, replies and scores to samples.jsonl every N steps.")


class UpdateConfig(Section):
    epochs: int = Field(1, ge=1, description="PPO epochs over each rollout batch.")
    minibatch: int = Field(8, ge=1, description="Samples per optimizer step. One epoch of one mini-batch (minibatch "
                           ">= prompts x samples) is on-policy: the update's forward gives the old log-probs.")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip.")
    value_clip: float = Field(0.2, gt=0, description="Value clip (gae).")
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten: bool = Field(True, description="Whiten advantages over each batch.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus.")
    reward_clip: float = Field(10.0, gt=0, description="Scores are clipped to [-clip, clip].")
    no_eos_penalty: float = Field(0.0, ge=0, description="Subtracted from the score of a reply that hit "
                                  "max_new_tokens without ending its turn.")


class KLConfig(Section):
    coef: float = Field(0.05, ge=0, description="Per-token KL penalty against the reference (initial value).")
    target: float | None = Field(None, gt=0, description="Adaptive KL control (Ziegler et al.): target KL per reply.")
    horizon: int = Field(10000, ge=1, description="Adaptive KL horizon in samples.")


class PtxConfig(Section):
    path: str = Field("", description="Pretraining mix (InstructGPT): conversations (any format the data readers "
                      "take, or `builtin:NAME`) for a language-modelling loss added to each actor step.")
    format: ConversationFormat = Field("auto", description="Record format.")
    skip_invalid: bool = Field(False, description="Drop invalid records (counted and reported) instead of failing.")
    coef: float = Field(0.0, ge=0, description="Weight of the ptx loss (0: off).")
    batch: int = Field(2, ge=1, description="ptx conversations per actor step.")
    max_len: int = Field(512, ge=8, description="Longer conversations are split, as SFT splits them.")


class PPOConfig(Section):
    model: str = Field(EMBEDDED_MODEL, description="The actor's start: an SFT model (folder, or SFT LoRA adapter).")
    template: TemplateName = "auto"
    method: Literal["full", "lora"] = Field("lora", description="LoRA: the reference is the base with the adapter "
                                            "disabled (no second copy). Full: a frozen copy.")
    reward: str = Field(..., description="A reward model from `corral reward`, or `module:function` taking "
                        "(prompt, reply) and returning a float.")
    output_dir: str = Field("runs/ppo", description="Where metrics, samples and the final actor go.")
    dtype: DType = "auto"
    advantage: Literal["gae", "rloo", "grpo"] = Field("gae", description="gae: PPO with a critic; rloo / grpo: "
                                                      "critic-free baselines over rollout.samples_per_prompt replies.")
    steps: int = Field(20, ge=1, description="Rollout + update steps.")
    data: PromptDataConfig = PromptDataConfig()
    lora: LoraConfig = LoraConfig()
    actor: ActorConfig = ActorConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0)
    critic: OptimConfig = Field(OptimConfig(lr=5e-5, schedule="constant", warmup_ratio=0.0),
                                description="The critic's optimizer (advantage=gae).")
    rollout: RolloutConfig = RolloutConfig()
    update: UpdateConfig = UpdateConfig()
    kl: KLConfig = KLConfig()
    ptx: PtxConfig = PtxConfig()
    train: RunConfig = RunConfig()


class JudgeAnswerConfig(Section):
    questions: str = Field("builtin:corral_questions", description="Question file (FastChat question.jsonl format) "
                           "or `builtin:corral_questions`.")
    output_dir: str = Field("judge", description="Evaluation folder; answers go to OUTPUT_DIR/answers/MODEL.jsonl.")
    models: StrList = Field(default_factory=list, description="Local models as NAME=PATH or PATH (repeat --model); "
                              "LoRA adapters of one base share it. Default: the embedded model (without --api).")
    api: str | None = Field(None, description="Answer with an OpenAI-compatible endpoint instead, e.g. http://host/v1.")
    api_model: str = Field("", description="The endpoint's model name (also the answers' model name).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's key.")
    template: TemplateName = "auto"
    system: str | None = Field(None, description="System prompt for every question.")
    temperature: float | None = Field(None, ge=0, le=2, description="Unset: per category, as MT-bench (0 for math, "
                                      "coding, reasoning, extraction; 0.1 knowledge; 0.7 writing, roleplay, ...).")
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float | None = Field(
        None, gt=0, description="Unset: 1.1 for local models (small ones loop without it), not sent with --api."
    )
    max_tokens: int = Field(512, ge=1, description="Most tokens per answer turn.")
    seed: int | None = Field(0, description="Sampling seed (reproducible answers where temperature > 0).")
    concurrency: int = Field(16, ge=1, description="Questions answered at once (one continuous batch locally).")
    limit: int = Field(0, ge=0, description="Only N questions (0: all): a stratified sample across categories, "
                       "seeded by `limit_seed` (the same N and seed in `judge grade` grade the same questions).")
    limit_seed: int = Field(0, description="Seed of the `limit` sample.")
    fastchat_answers: bool = Field(False, description="Also write FastChat's layout: "
                                   "OUTPUT_DIR/model_answer/MODEL.jsonl (question_id, answer_id, model_id, choices).")
    retries: int = Field(5, ge=0, description="API retries with backoff on 429 / 5xx / connection errors.")
    timeout: float = Field(600.0, gt=0, description="API request timeout in seconds.")
    dtype: DType = "auto"
    max_batch: int = Field(32, ge=1, description="Most sequences decoded together (local).")


class JudgeGradeConfig(Section):
    questions: str = Field("builtin:corral_questions", description="The question file the answers were made from.")
    output_dir: str = Field("judge", description="Evaluation folder: answers/ are read, judgments/MODE.jsonl written.")
    mode: Literal["single", "pairwise", "relative"] = Field(
        "single", description="single: a 1-10 score per answer; pairwise: A/B/tie in both orders; relative: "
        "Vicuna-style, both answers scored in one prompt against `baseline`."
    )
    models: StrList = Field(default_factory=list, description="Models to grade (their answer files); default: all.")
    baseline: str | None = Field(None, description="pairwise: compare each model with this one (unset: all pairs); "
                                 "relative: the reference model (required).")
    judge_api: str = Field("", description="The judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
    judge_model: str = Field("", description="The judge's model name at that endpoint.")
    judge_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the judge's key.")
    prompts: str = Field("", description="Judge prompts: Corral's YAML (default: corral/eval/prompts/judge_prompts.yaml) "
                         "or FastChat's judge_prompts.jsonl as it is (MT-bench's choice of prompt per question and turn).")
    reference_categories: StrList = Field(["math", "reasoning", "coding"], description="Categories whose reference "
                                          "answers the judge is shown (MT-bench's); other questions' are not sent.")
    answers_dir: str = Field("", description="Answer files to grade (default: OUTPUT_DIR/answers); FastChat's "
                             "model_answer/ folder works as it is.")
    fastchat_judgments: bool = Field(False, description="Also write FastChat's layout: "
                                     "OUTPUT_DIR/model_judgment/JUDGE_single.jsonl and JUDGE_pair.jsonl.")
    swap: bool = Field(True, description="Ask pairwise and relative judgments in both orders.")
    concurrency: int = Field(8, ge=1, description="Judge requests in flight at once.")
    retries: int = Field(5, ge=0, description="Retries with backoff on 429 / 5xx / connection errors.")
    timeout: float = Field(600.0, gt=0, description="Judge request timeout in seconds.")
    max_tokens: int = Field(512, ge=1, description="Most tokens of a judge reply.")
    temperature: float = Field(0.0, ge=0, le=2, description="Judge sampling temperature.")
    limit: int = Field(0, ge=0, description="Only N questions (0: all): a stratified sample across categories, "
                       "seeded by `limit_seed`, the same as `judge answer` picks with the same N and seed.")
    limit_seed: int = Field(0, description="Seed of the `limit` sample.")
    scoring: Literal["parsed", "expected"] = Field(
        "parsed", description="parsed: the verdict the judge wrote. expected (single, pairwise): also ask for "
        "token logprobs and record the probability-weighted verdict at the verdict's token (G-Eval), falling "
        "back to the parsed one, with the reason recorded, where the endpoint gives none.")
    top_logprobs: int = Field(20, ge=1, le=20, description="scoring=expected: alternatives asked for per token "
                              "(OpenAI allows up to 20).")
    constrained: bool = Field(False, description="Send a JSON schema for the verdict (response_format json_schema, "
                              "strict) and read the reply as JSON under it; needs an endpoint with structured outputs.")
    constrained_reason_chars: int | None = Field(None, ge=1, description="constrained: cap the verdict's reason "
                                                 "at this many characters (JSON schema maxLength; corral serve and "
                                                 "vLLM take it, OpenAI's strict subset may not). A small local judge "
                                                 "needs it: it can ramble into max_tokens before writing its verdict.")


class JudgeReportConfig(Section):
    output_dir: str = Field("judge", description="Evaluation folder: judgments/ read, report.{md,html,json} written.")
    baseline: str | None = Field(None, description="Relative scores against this model; Elo anchored at 1000 on it.")
    bootstrap: int = Field(1000, ge=10, description="Bootstrap rounds for the 95% intervals.")
    seed: int = Field(0)
    fastchat: StrList = Field(default_factory=list, description="FastChat model_judgment files (JUDGE_single.jsonl, "
                              "JUDGE_pair.jsonl) to report on with OUTPUT_DIR/judgments/.")
    questions: str = Field("builtin:corral_questions", description="With `fastchat`: the question file, for the "
                           "categories FastChat's judgments do not record.")
    votes: StrList = Field(default_factory=list, description="People's pairwise verdicts to measure the judges' "
                           "agreement against: MT-bench's human-judgment layout (lmsys/mt_bench_human_judgments: "
                           "question_id, turn, model_a, model_b, winner, judge), JSONL or a JSON list.")
    answers_dir: str = Field("", description="Answer files, for the answers' lengths (length-controlled win rate) "
                             "where the judgments lack them (FastChat's); default: OUTPUT_DIR/answers if present.")


class ToolEvalConfig(Section):
    model: ModelName = EMBEDDED_MODEL
    data: str = Field("builtin:tools_test", description="Held-out tool-use conversations (OpenAI messages with "
                      "`tools`); every assistant turn is a test case, the gold history before it the prompt.")
    template: TemplateName = "auto"
    output_dir: str = Field("runs/tool-eval", description="Where tool_eval.json (metrics and every turn) and "
                            "tool_eval.md go.")
    limit: int = Field(0, ge=0, description="Only the first N conversations (0: all).")
    max_tokens: int = Field(128, ge=1, description="Most new tokens per reply (greedy).")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0: none; a call copies names and values from the "
                                      "prompt, which a penalty would push the model away from.")
    dtype: DType = "auto"
    max_batch: int = Field(16, ge=1, description="Most replies decoded together.")


class ExportGGUFConfig(Section):
    model: ModelName = EMBEDDED_MODEL
    outtype: Literal[(*WRITTEN_OUTTYPES, *K_QUANTS)] = Field(
        "f16", description="f32, f16, bf16 or q8_0 (Corral's writer); a K-quant (q4_k_m, q5_k_m, ...) needs llama.cpp's "
        "quantizer: pip install 'corral[gguf_quant]'.")
    output: str = Field("", description="The .gguf file to write (default: NAME-OUTTYPE.gguf here, NAME the model "
                        "folder's name); the Modelfile goes beside it.")
    template: TemplateName = "auto"
    dtype: DType = "auto"
    modelfile: bool = Field(True, description="Write an Ollama `Modelfile` beside the file (its TEMPLATE renders "
                            "prompts as `template` does).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature the Modelfile sets.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling top_p the Modelfile sets.")


# ---------------------------------------------------------------------------------------------
# Loading: YAML file + dotted overrides -> validated model


def set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    node = tree
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which turns the
    documented `mixed_precision: no` into False; here they stay strings (bool fields still accept them)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def parse_value(text: str) -> Any:
    """`3` -> 3, `true` -> True, `[a, b]` -> list, `1e-4` -> 1e-4, `no` -> "no"; anything else stays a string."""
    try:
        value = yaml_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return text if value is None and text.strip() not in ("null", "~", "") else value


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required but not given")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _read_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = yaml_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return tree


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def load_config(cls: type[BaseModel], paths: list[str | Path] | str | Path | None = None,
                overrides: dict[str, Any] | None = None):
    """Read YAML files (later ones win), apply dotted `overrides` ({"train.lr": 1e-4}), validate as `cls`."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths or [])
    tree: dict = {}
    for path in paths:
        _merge(tree, _read_yaml(path))
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    source = " + ".join([str(p) for p in paths] + (["overrides"] if overrides else [])) or "defaults"
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, output_dir: str | Path) -> Path:
    return atomic_write_text(Path(output_dir) / "config.yaml", dump_config(cfg))


def shipped_config(name: str) -> Path:
    """Path of a YAML recipe shipped in corral/configs/."""
    return Path(__file__).parent / "configs" / name


# ---------------------------------------------------------------------------------------------
# `corral distill`: Lion's adversarial distillation (teacher, referee, generator over OpenAI-compatible endpoints)


class DistillDataConfig(Section):
    path: str = Field("builtin:distill_seeds", description="The seed instruction pool: Alpaca (instruction / input / "
                      "output), self-instruct seed tasks, OpenAI messages or ShareGPT records (the first user turn is "
                      "the instruction; replies in the file are not used). `builtin:distill_seeds`: Corral's 64.")
    format: ConversationFormat = Field("auto", description="Record format; `auto` detects it per record.")
    skip_invalid: bool = Field(False, description="Drop invalid records (counted and reported) instead of failing.")
    train_size: int = Field(0, ge=0, description="Seed instructions in the first train pool, a seeded sample (0: all). "
                            "The first cache pool is the same instructions, as in Lion.")
    discriminate_size: int = Field(0, ge=0, description="Cache-pool instructions the referee scores each iteration, "
                                   "a seeded sample (0: the whole cache pool, as in Lion).")
    cache_max: int = Field(0, ge=0, description="Most instructions the cache pool keeps; past it the oldest leave "
                           "(0: it keeps growing).")
    seed: int = Field(0, description="Seed of the pool samples.")


class DistillEndpointFields(Section):
    """How one role reaches its OpenAI-compatible endpoint. The referee's and generator's empty `api`, `model`
    and `api_key_env` mean the teacher's."""

    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    retries: int = Field(5, ge=0, description="Retries with backoff on 429 / 5xx / connection errors (the openai "
                         "client's own, honouring Retry-After).")
    timeout: float = Field(600.0, gt=0, description="Request timeout in seconds.")
    seed: int | None = Field(0, description="Sampling seed sent with each request (null: none).")


class TeacherConfig(DistillEndpointFields):
    api: str = Field(..., description="The teacher's OpenAI-compatible base URL: a remote API, a vLLM server or "
                     "`corral serve` (http://127.0.0.1:8000/v1).")
    model: str = Field(..., description="The teacher's model name at that endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's key.")
    system: str | None = Field(None, description="System prompt sent with every instruction (to the teacher and, in "
                               "training and answering, to the student).")
    temperature: float = Field(0.7, ge=0, le=2, description="The teacher's sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1)


class RefereeConfig(DistillEndpointFields):
    api: str = Field("", description="The referee's base URL (empty: the teacher's).")
    model: str = Field("", description="The referee's model name (empty: the teacher's).")
    api_key_env: str = Field("", description="Environment variable with the referee's key (empty: the teacher's).")
    temperature: float = Field(0.2, ge=0, le=2, description="Referee sampling temperature (Lion's 0.2); a retry "
                               "after an unparseable reply is sent with the next seed.")
    max_tokens: int = Field(512, ge=1, description="Most tokens of a referee reply.")
    parse_retries: int = Field(2, ge=0, description="An unparseable reply is asked again this many times; then the "
                               "instruction is counted as unparseable and left out of hard/easy, never scored.")
    constrained: bool = Field(False, description="Send a JSON schema for the two scores (response_format "
                              "json_schema, strict) and read the reply as JSON under it: OpenAI, vLLM, `corral serve`.")


class GeneratorConfig(DistillEndpointFields):
    api: str = Field("", description="The generator's base URL (empty: the teacher's).")
    model: str = Field("", description="The generator's model name (empty: the teacher's).")
    api_key_env: str = Field("", description="Environment variable with the generator's key (empty: the teacher's).")
    temperature: float = Field(1.0, ge=0, le=2, description="Generator sampling temperature (Lion's 1.0).")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(0, ge=0, description="Most tokens of a new instruction; 0: four per word of the "
                            "instruction it is made from, at least 16 (Lion's rule). A reply cut there is dropped.")
    new_hard: int = Field(16, ge=0, description="New instructions to keep per iteration from hard ones (same domain "
                          "and task type, similar length and difficulty). Lion: 3000.")
    new_easy: int = Field(16, ge=0, description="New instructions to keep per iteration from easy ones (same domain, "
                          "rarer and more diverse). Lion: 3000.")
    max_rounds: int = Field(3, ge=1, description="Rounds of requests: each asks for what the filters left short of "
                            "new_hard / new_easy; a shortfall after the last round is reported, not retried.")
    similarity: float = Field(0.7, gt=0, le=1, description="Drop a new instruction whose ROUGE-L F-measure with a "
                              "cache-pool instruction or an earlier kept one is above this (Lion: 0.7; 1: only exact "
                              "duplicates).")
    min_distinct_trigrams: float = Field(0.5, ge=0, le=1, description="Degenerate repetition: a candidate of 6 words "
                                         "or more whose distinct word trigrams are fewer than this share of its "
                                         "trigrams is dropped (0: off).")


class StudentConfig(Section):
    max_batch: int = Field(16, ge=1, description="Student answers decoded together (one continuous batch of the "
                           "engine); each batch is appended to the answers file when done.")
    temperature: float = Field(0.0, ge=0, le=2, description="Student sampling temperature (0: greedy).")
    repetition_penalty: float = Field(1.1, gt=0, description="Small models loop without one.")


class DistillConfig(Section):
    model: str = Field(EMBEDDED_MODEL, description="The student: hub id, local HF folder, .gguf file or `smollm2-135m`. "
                       "Each iteration's fine-tune starts from the previous iteration's weights.")
    method: Literal["lora", "full"] = Field("lora", description="lora: a LoRA adapter per iteration, merged into the "
                                            "weights it started from (iter-NN/student); full: every weight.")
    template: TemplateName = "auto"
    dtype: DType = "auto"
    output_dir: str = Field("runs/distill", description="Pools, answers, referee scores, generated instructions and "
                            "the student of each iteration (iter-NN/), report.json and report.html.")
    iterations: int = Field(3, ge=1, description="Imitation -> discrimination -> generation rounds.")
    max_tokens: int = Field(256, ge=1, description="Most tokens of a teacher answer and of a student answer.")
    threshold: float = Field(1.0, ge=0, description="An instruction is hard when the referee's teacher score minus "
                             "its student score is at least this (Lion's 1.0), else easy.")
    max_teacher_calls: int = Field(0, ge=0, description="Budget: endpoint calls (teacher, referee and generator "
                                   "together) after which the run stops cleanly (0: no cap). Counted over the whole "
                                   "run folder, so a re-run with a larger cap continues where it stopped.")
    max_teacher_tokens: int = Field(0, ge=0, description="Budget: prompt + completion tokens the endpoints report, "
                                    "all roles together (0: no cap). Calls in flight when it is reached still finish.")
    prompts: str = Field("", description="Referee and generator prompts: a YAML file with the keys of "
                         "corral/distill/prompts/distill_prompts.yaml (the default).")
    data: DistillDataConfig = DistillDataConfig()
    teacher: TeacherConfig
    referee: RefereeConfig = RefereeConfig()
    generator: GeneratorConfig = GeneratorConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig(epochs=3.0)
    lora: LoraConfig = LoraConfig()
