"""`corral dpo`: direct preference optimisation (DPO, IPO or SimPO) on preference pairs.

Each pair is rendered twice by the chat template, exactly as SFT renders a trained reply: the
prompt, then the chosen (or rejected) reply and its end-of-turn. By default (`train.shared_prompt`)
the pair runs as one sequence, the shared prompt once and then both replies, with a mask that keeps
the rejected reply from seeing the chosen one (`data.preference.collate_shared`); otherwise as the
two sequences. A reply's log-prob is summed over those trained tokens only (the same masks as SFT),
with the output head run on those positions only. The reference is the starting model: with LoRA,
the same weights with the adapter disabled (no second copy in memory); with full fine-tuning, a frozen copy, or log-probs computed once before
training (`precompute_ref`). Per step the loop logs the loss and, per pair, the implicit reward
accuracy, chosen/rejected rewards, their margin and a KL estimate (mean log pi/pi_ref of the replies).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import partial

import torch

from corral.atomic import append_line, atomic_write_text
from corral.chat.conversation import Conversation, Message
from corral.chat.templates import get_template
from corral.config import DPOConfig
from corral.data.clean import to_sample
from corral.data.pack import Row, collate, single_rows
from corral.data.preference import PreferencePair, collate_shared, shared_prompt_length
from corral.models.adapters import add_lora, is_adapter, trainable_parameter_count
from corral.models.forward import final_hidden, output_head, pair_attention_mask, shared_prompt_path, unwrap
from corral.models.load import frozen_dtype, load_model, load_tokenizer, master_dtype
from corral.recipes.runs import RecipeResult, begin_run, data_of, saver, preference_rows, train_summary
from corral.train.loop import train
from corral.train.losses import preference_loss, sequence_logps


@dataclass
class PairRow:
    chosen: Row
    rejected: Row
    shared: int = 0  # leading tokens both sides share (the prompt): run once on the shared-prompt path
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    num_targets: int = 1  # the loop normalises by pairs

    @property
    def input_ids(self) -> list[int]:  # token count for throughput metrics: both sequences, whichever path runs
        return self.chosen.input_ids + self.rejected.input_ids


def pairs_to_rows(pairs: list[PreferencePair], template, max_len: int) -> tuple[list[PairRow], int]:
    """Rows, and the number of pairs dropped because a side is longer than max_len."""
    rows, too_long = [], 0
    for pair in pairs:
        rendered = [template.render_with_masks(Conversation(pair.prompt.messages + [Message("assistant", reply)]))
                    for reply in (pair.chosen, pair.rejected)]  # fmt: skip
        sides = [to_sample(ids, labels, pair.source) for ids, labels in rendered]
        if max(len(s.input_ids) for s in sides) > max_len:
            too_long += 1
            continue
        chosen, rejected = single_rows(sides)
        rows.append(PairRow(chosen, rejected, shared_prompt_length(*rendered[0], *rendered[1])))
    return rows, too_long


def collate_pairs(rows: list[PairRow], pad_id: int, shared: bool = True) -> dict:
    """`shared`: one row per pair (`collate_shared`); otherwise chosen rows first, then rejected, in one batch.
    Precomputed reference log-probs ride along, chosen first."""
    if shared:
        batch = collate_shared([(r.chosen.input_ids, r.rejected.input_ids, r.shared) for r in rows], pad_id,
                               targets=[(r.chosen.targets, r.rejected.targets) for r in rows])
    else:
        batch = collate([r.chosen for r in rows] + [r.rejected for r in rows], pad_id)
    if rows[0].ref_chosen is not None:
        batch["ref_logps"] = torch.tensor([r.ref_chosen for r in rows] + [r.ref_rejected for r in rows])
    return batch


def reply_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed reply log-probs and (2B,) trained-token counts, chosen sides first, for either batch layout."""
    if "pair_segments" not in batch:
        hidden = final_hidden(model, batch["input_ids"], batch["position_ids"])
        return sequence_logps(hidden, output_head(model), batch["targets"])
    mask = pair_attention_mask(model, batch["pair_segments"])
    hidden = final_hidden(model, batch["input_ids"], batch["position_ids"], mask)
    head = output_head(model)
    (chosen, chosen_n), (rejected, rejected_n) = (sequence_logps(hidden, head, batch[f"{side}_targets"])
                                                  for side in ("chosen", "rejected"))  # fmt: skip
    return torch.cat([chosen, rejected]), torch.cat([chosen_n, rejected_n])


@torch.no_grad()
def reference_logps(model, batch, ref_model=None) -> torch.Tensor:
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if ref_model is not None:
        return reply_logps(ref_model, batch)[0]
    with unwrap(model).disable_adapter():  # LoRA: the base itself is the reference
        return reply_logps(model, batch)[0]


def dpo_loss_fn(model, batch, *, kind: str, beta: float, label_smoothing: float, simpo_gamma: float, ref_model=None):
    logps, counts = reply_logps(model, batch)
    half = logps.shape[0] // 2
    if kind == "simpo":
        averaged = logps / counts.clamp(min=1)
        losses, chosen_r, rejected_r = preference_loss(averaged[:half], averaged[half:], None, None, beta, kind,
                                                       label_smoothing, simpo_gamma)
        log_ratio = torch.zeros_like(logps)
    else:
        ref = reference_logps(model, batch, ref_model)
        losses, chosen_r, rejected_r = preference_loss(logps[:half], logps[half:], ref[:half], ref[half:], beta, kind,
                                                       label_smoothing)
        log_ratio = (logps - ref).detach()
    stats = {
        "reward_accuracy": (chosen_r > rejected_r).float().sum(),
        "reward_chosen": chosen_r.sum(),
        "reward_rejected": rejected_r.sum(),
        "reward_margin": (chosen_r - rejected_r).sum(),
        "kl_estimate": (log_ratio[:half] + log_ratio[half:]).sum() / 2,
    }
    return losses.sum(), torch.tensor(float(half), device=losses.device), stats


@torch.no_grad()
def evaluate_pairs(model, rows: list[PairRow], pad_id: int, batch_size: int, device, ref_model=None, beta: float = 0.1,
                   shared: bool = True) -> dict:
    """Held-out: the policy's log-prob margin (chosen - rejected), and the implicit reward accuracy and margin."""
    model.eval()
    logp_margin, reward_margin, correct = [], [], 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(rows[i : i + batch_size], pad_id, shared).items()}
        logps, _ = reply_logps(model, batch)
        ref = reference_logps(model, batch, ref_model) if (ref_model is not None or is_adapter(unwrap(model))
                                                           or "ref_logps" in batch) else logps
        half = logps.shape[0] // 2
        logp_margin.append((logps[:half] - logps[half:]).cpu())
        rewards = beta * (logps - ref)
        reward_margin.append((rewards[:half] - rewards[half:]).cpu())
        correct += int((rewards[:half] > rewards[half:]).sum())
    model.train()
    logp_margin, reward_margin = torch.cat(logp_margin), torch.cat(reward_margin)
    return {"pairs": len(rows), "logp_margin": logp_margin.mean().item(), "reward_margin": reward_margin.mean().item(),
            "reward_accuracy": correct / max(len(rows), 1)}  # fmt: skip


@torch.no_grad()
def precompute_reference(model, rows: list[PairRow], pad_id: int, batch_size: int, device, shared: bool = True) -> None:
    """Reference log-probs of every row, computed once with the starting weights."""
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        logps, _ = reply_logps(model, {k: v.to(device) for k, v in collate_pairs(chunk, pad_id, shared).items()})
        for j, row in enumerate(chunk):
            row.ref_chosen, row.ref_rejected = logps[j].item(), logps[len(chunk) + j].item()
    model.train()


def run(cfg: DPOConfig) -> RecipeResult:
    run_ = begin_run(cfg, "dpo")
    accelerator, out, main, log = run_.accelerator, run_.out, run_.main, run_.log
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.template, tokenizer)
    rows, eval_rows = preference_rows(cfg.data, template, cfg.train.max_len, cfg.train.seed, pairs_to_rows, log)

    device = accelerator.device
    # Full fine-tuning keeps float32 master weights (bf16 only when asked): autocast does the low-precision compute;
    # its reference is a copy of them, so that at step 0 it gives the policy's own log-probs (bf16 weights would
    # not: the residual stream would round). A LoRA base, which is also the reference, is stored as autocast
    # computes it (`frozen_dtype`: bf16 on CPUs that compute it natively).
    frozen = frozen_dtype(cfg.dtype, accelerator.mixed_precision, device)
    dtype = master_dtype(cfg.dtype) if cfg.method == "full" else frozen
    model = load_model(cfg.model, dtype=dtype, device=device)
    if is_adapter(model):
        raise ValueError(f"model={cfg.model} is an adapter folder; merge it first (corral merge) to train on top of it")
    pad_id = tokenizer.pad_token_id
    shared = shared_prompt_path(cfg.train.shared_prompt, model, log)
    ref_model = None
    needs_ref = cfg.loss != "simpo"
    if needs_ref and (cfg.precompute_ref or cfg.method == "full"):
        if cfg.precompute_ref:
            precompute_reference(model, rows + eval_rows, pad_id, cfg.train.batch_size, device, shared)
            log(f"reference log-probs precomputed for {len(rows) + len(eval_rows)} pairs")
        else:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.method == "lora":
        model = add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    trainable, total = trainable_parameter_count(model)
    reference = ("none (SimPO)" if not needs_ref else "precomputed" if cfg.precompute_ref
                 else "frozen copy" if ref_model is not None else "base with the adapter disabled")
    log(f"policy {cfg.model} ({cfg.method}): {trainable:,} trainable of {total:,} parameters; reference: {reference}")
    before = (evaluate_pairs(model, eval_rows, pad_id, cfg.train.batch_size, device, ref_model, cfg.beta, shared)
              if eval_rows and main else None)

    card = {"title": f"Corral DPO ({cfg.method}) of {cfg.model}", "recipe": "corral dpo", "method": cfg.method,
            "data": data_of(cfg.data), "loss": cfg.loss, "beta": cfg.beta}
    save = saver(tokenizer, template, card)
    loss_fn = partial(dpo_loss_fn, kind=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                      simpo_gamma=cfg.simpo_gamma, ref_model=ref_model)
    result = train(model, rows, collate_fn=partial(collate_pairs, pad_id=pad_id, shared=shared), loss_fn=loss_fn,
                   settings=cfg.train, output_dir=out, save_model=save, accelerator=accelerator, eval_rows=eval_rows,
                   config=cfg.model_dump(mode="json"))
    model_dir = out / "model"
    stats = None
    if main:
        after = (evaluate_pairs(model, eval_rows, pad_id, cfg.train.batch_size, device, ref_model, cfg.beta, shared)
                 if eval_rows else None)
        card["metrics"] = {"train loss": result.last_loss, "steps": result.steps,
                           **({f"held-out {k}": v for k, v in after.items()} if after else {})}  # fmt: skip
    result.save(model_dir)  # every process: under FSDP / ZeRO-3 the weights are gathered from all of them
    if main:
        if eval_rows:
            stats = {"before": before, "after": after}
            append_line(result.metrics_path, json.dumps({"step": result.steps, **{f"eval_{k}": v for k, v in after.items()}}))
            atomic_write_text(out / "eval.json", json.dumps(stats, indent=2) + "\n")
            log(f"held-out ({after['pairs']} pairs): log-prob margin chosen-rejected {before['logp_margin']:.3f} -> "
                f"{after['logp_margin']:.3f}; implicit reward accuracy {after['reward_accuracy']:.3f}, "
                f"margin {after['reward_margin']:.3f}")
        log(f"model: {model_dir}\nmetrics: {result.metrics_path}\nloss curve: {out / 'loss.png'}")
    accelerator.wait_for_everyone()
    return RecipeResult(model_dir, train_summary(result, eval=stats))
