"""`corral reward`: a reward model from preference pairs (DeepSpeed-Chat step 2); `corral reward score`.

Each pair is rendered twice by the chat template: the prompt plus the chosen reply and its end-of-turn,
and the same with the rejected reply. By default (`train.shared_prompt`) the pair runs as one sequence,
the shared prompt once and then both replies, with a mask that keeps the rejected reply from seeing the
chosen one (`data.preference.collate_shared`); otherwise as the two sequences. The score of a reply is
the scalar head at its last token; the loss is -log sigmoid(r_chosen - r_rejected - margin), summed over
pairs and normalised by the pairs of the whole optimizer step (the one loop does that). At the end, held-out
accuracy (chosen scored above rejected), mean margin and mean scores are printed, written to
`metrics.jsonl` and to `eval.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial

import torch

from corral.atomic import append_line, atomic_write_text
from corral.chat.conversation import Conversation, Message
from corral.chat.templates import get_template
from corral.config import RewardConfig, RewardScoreConfig
from corral.data.preference import PreferencePair, collate_shared, read_preferences, shared_prompt_length
from corral.models.adapters import add_lora, trainable_parameter_count
from corral.models.forward import pair_attention_mask, shared_prompt_path
from corral.models.load import frozen_dtype, load_model, load_tokenizer, master_dtype
from corral.models.reward import scores_at, sequence_scores
from corral.recipes.runs import RecipeResult, begin_run, data_of, saver, preference_rows, train_summary
from corral.train.loop import train
from corral.train.losses import pairwise_reward_loss


@dataclass
class PairRow:
    chosen_ids: list[int]
    rejected_ids: list[int]
    shared: int = 0  # leading tokens both sides share (the prompt): run once on the shared-prompt path
    num_targets: int = 1  # the loop normalises by pairs

    @property
    def input_ids(self) -> list[int]:  # token count for throughput metrics: both sequences, whichever path runs
        return self.chosen_ids + self.rejected_ids


def render_reply(template, prompt: Conversation, reply: str) -> list[int]:
    """Prompt + reply + end-of-turn, exactly as SFT renders a trained reply."""
    ids, _ = template.render_with_masks(Conversation(prompt.messages + [Message("assistant", reply)]))
    return ids


def pairs_to_rows(pairs: list[PreferencePair], template, max_len: int) -> tuple[list[PairRow], int]:
    """Rows, and how many pairs were dropped because a side is longer than max_len (truncating would cut the
    reply's end, where the score is read)."""
    rows, too_long = [], 0
    for pair in pairs:
        (chosen, chosen_labels), (rejected, rejected_labels) = (
            template.render_with_masks(Conversation(pair.prompt.messages + [Message("assistant", reply)]))
            for reply in (pair.chosen, pair.rejected))  # fmt: skip
        if max(len(chosen), len(rejected)) > max_len:
            too_long += 1
            continue
        rows.append(PairRow(chosen, rejected, shared_prompt_length(chosen, chosen_labels, rejected, rejected_labels)))
    return rows, too_long


def collate_pairs(rows: list[PairRow], pad_id: int, shared: bool = True) -> dict:
    """`shared`: one row per pair (`collate_shared`). Otherwise chosen sequences first, then rejected,
    right-padded into one (2B, L) batch."""
    if shared:
        return collate_shared([(r.chosen_ids, r.rejected_ids, r.shared) for r in rows], pad_id)
    sequences = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
    width = max(map(len, sequences))
    input_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    if "pair_segments" in batch:
        positions = torch.stack([batch["chosen_last"], batch["rejected_last"]], dim=1)
        mask = pair_attention_mask(model, batch["pair_segments"])
        scores = scores_at(model, batch["input_ids"], positions, attention_mask=mask, position_ids=batch["position_ids"])
        return scores[:, 0], scores[:, 1]
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def reward_loss(model, batch, margin: float = 0.0):
    chosen, rejected = pair_scores(model, batch)
    losses = pairwise_reward_loss(chosen, rejected, margin)
    return losses.sum(), torch.tensor(float(len(losses)), device=losses.device)


@torch.no_grad()
def evaluate_pairs(model, rows: list[PairRow], pad_id: int, batch_size: int, device, shared: bool = True) -> dict:
    """Accuracy (chosen above rejected), mean margin and mean scores over `rows`."""
    model.eval()
    chosen_all, rejected_all = [], []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(rows[i : i + batch_size], pad_id, shared).items()}
        chosen, rejected = pair_scores(model, batch)
        chosen_all.append(chosen.cpu())
        rejected_all.append(rejected.cpu())
    chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
    return {"pairs": len(rows), "accuracy": (chosen > rejected).float().mean().item(),
            "mean_margin": (chosen - rejected).mean().item(), "mean_chosen": chosen.mean().item(),
            "mean_rejected": rejected.mean().item()}  # fmt: skip


def prepare_model(cfg: RewardConfig, pad_id: int, device, mixed_precision: str = "no"):
    # Full fine-tuning keeps float32 master weights (bf16 only when asked): autocast does the low-precision compute.
    # A LoRA model's frozen base is stored as autocast computes it (`frozen_dtype`: bf16 on CPUs that compute it).
    dtype = master_dtype(cfg.dtype) if cfg.method == "full" else frozen_dtype(cfg.dtype, mixed_precision, device)
    model = load_model(cfg.model, dtype=dtype, device=device, head="score", pad_token_id=pad_id)
    if cfg.method == "lora":
        model = add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules,
                         task_type="SEQ_CLS", modules_to_save=["score"])
    return model


def run(cfg: RewardConfig) -> RecipeResult:
    run_ = begin_run(cfg, "reward")
    accelerator, out, main, log = run_.accelerator, run_.out, run_.main, run_.log
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.template, tokenizer)
    rows, eval_rows = preference_rows(cfg.data, template, cfg.train.max_len, cfg.train.seed, pairs_to_rows, log)

    pad_id = tokenizer.pad_token_id
    model = prepare_model(cfg, pad_id, accelerator.device, accelerator.mixed_precision)
    trainable, total = trainable_parameter_count(model)
    log(f"reward model from {cfg.model} ({cfg.method}): {trainable:,} trainable of {total:,} parameters")
    card = {"title": f"Corral reward model ({cfg.method}) of {cfg.model}", "recipe": "corral reward", "method": cfg.method,
            "data": data_of(cfg.data)}
    save = saver(tokenizer, template, card)
    shared = shared_prompt_path(cfg.train.shared_prompt, model, log)
    result = train(
        model, rows, collate_fn=partial(collate_pairs, pad_id=pad_id, shared=shared),
        loss_fn=partial(reward_loss, margin=cfg.margin),
        settings=cfg.train, output_dir=out, save_model=save, accelerator=accelerator, eval_rows=eval_rows,
        config=cfg.model_dump(mode="json"),
    )  # fmt: skip
    model_dir = out / "model"
    stats = None
    if main:
        if eval_rows:
            stats = evaluate_pairs(model, eval_rows, pad_id, cfg.train.batch_size, accelerator.device, shared)
        card["metrics"] = {"train loss": result.last_loss, "steps": result.steps,
                           **({f"held-out {k}": v for k, v in stats.items()} if stats else {})}  # fmt: skip
    result.save(model_dir)  # every process: under FSDP / ZeRO-3 the weights are gathered from all of them
    if main:
        if stats:
            append_line(result.metrics_path, json.dumps({"step": result.steps, **{f"eval_{k}": v for k, v in stats.items()}}))
            atomic_write_text(out / "eval.json", json.dumps(stats, indent=2) + "\n")
            log(f"held-out: accuracy {stats['accuracy']:.3f} on {stats['pairs']} pairs, mean margin "
                f"{stats['mean_margin']:.3f} (chosen {stats['mean_chosen']:.3f}, rejected {stats['mean_rejected']:.3f})")
        log(f"reward model: {model_dir}\nmetrics: {result.metrics_path}\nloss curve: {out / 'loss.png'}")
    accelerator.wait_for_everyone()
    return RecipeResult(model_dir, train_summary(result, eval=stats))


def read_scored(path: str, skip_invalid: bool) -> tuple[list, list]:
    """(conversations, pairs) of a file to score: one of them empty. Strict: conversations, else pairs (the error
    of both is raised when neither reads). `skip_invalid`: whichever keeps more records, its skips reported."""
    from corral.data.formats import DataError, read_conversations

    if not skip_invalid:
        try:
            return read_conversations(path)[0], []
        except DataError:
            return [], read_preferences(path)[0]
    read = {}
    for kind, reader in (("conversations", read_conversations), ("pairs", read_preferences)):
        try:
            read[kind] = reader(path, skip_invalid=True)
        except DataError as e:  # none of its records is valid
            read[kind] = ([], e)
    kind = max(read, key=lambda k: len(read[k][0]))
    records, report = read[kind]
    if not records:
        raise read["conversations"][1]
    print(report.summary())
    return (records, []) if kind == "conversations" else ([], records)


def score(cfg: RewardScoreConfig):
    """Print (or write) the reward of each conversation's last reply, or of both sides of each preference pair."""
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.template, tokenizer)
    pad_id = tokenizer.pad_token_id
    model = load_model(cfg.model, dtype=cfg.dtype, head="score", pad_token_id=pad_id)
    device = next(model.parameters()).device
    conversations, pairs = read_scored(cfg.data, cfg.skip_invalid)
    items = [(c.source, template.render_with_masks(c)[0], None) for c in conversations]
    items += [(p.source, render_reply(template, p.prompt, p.chosen), render_reply(template, p.prompt, p.rejected))
              for p in pairs]  # fmt: skip
    records = []
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i : i + cfg.batch_size]
        sequences = [ids for _, ids, _ in chunk] + [ids for _, _, ids in chunk if ids is not None]
        width = max(map(len, sequences))
        batch = {"input_ids": torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], device=device),
                 "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)}
        with torch.no_grad():
            scores = sequence_scores(model, **batch).tolist()
        for j, (source, _, rejected) in enumerate(chunk):
            record = {"source": source, "score": round(scores[j], 4)}
            if rejected is not None:
                record = {"source": source, "chosen": round(scores[j], 4), "rejected": round(scores[len(chunk) + j], 4)}
            records.append(record)
    lines = [json.dumps(r) for r in records]
    if cfg.output:
        atomic_write_text(cfg.output, "\n".join(lines) + "\n")
        print(f"wrote {len(records)} scores to {cfg.output}")
    else:
        print("\n".join(lines))
    return records


