"""Preference pairs as one sequence (the prompt once, then both replies): the same losses and gradients as two
sequences, for the reward model and DPO / IPO / SimPO, and a mask that keeps the rejected reply from the chosen one."""

from __future__ import annotations

import copy

import pytest
import torch

from corral.chat.conversation import Conversation
from corral.chat.templates import IGNORE_INDEX, get_template
from corral.data.preference import CHOSEN, PADDING, PROMPT, REJECTED, PreferencePair, collate_shared
from corral.models.forward import pair_attention_mask, shared_prompt_path, takes_pair_mask

TOL = {"rtol": 1e-5, "atol": 1e-5}


def preference_pairs() -> list[PreferencePair]:
    """Unequal lengths both ways (so rows pad), replies that begin alike, and a multi-turn prompt whose earlier
    assistant turn is a trained target inside the shared part."""
    two_turns = Conversation.from_pairs(("user", "Hi there"), ("assistant", "Hello!"), ("user", "Who are you?"))
    return [
        PreferencePair(Conversation.from_pairs(("user", "Hi there")), "Hello! Thank you for asking, I am well.", "No."),
        PreferencePair(Conversation.from_pairs(("user", "Who are you?")), "I am Corral's model.",
                       "I am not going to say, and you cannot make me say it either."),
        PreferencePair(two_turns, "I am a tiny test model.", "Go away."),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def template(tiny_tokenizer):
    return get_template("chatml", tiny_tokenizer)


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss, *rest = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), trainable_grads(model), rest


def assert_same_grads(shared: dict, two: dict):
    """To 1e-5 of each gradient's largest entry: the two layouts sum in a different order, and fp32 backward
    through IPO's squared loss leaves a few 1e-5 of relative rounding on entries of size 3."""
    assert shared.keys() == two.keys() and len(shared) > 0
    for name in two:
        scale = max(1.0, two[name].abs().max().item())
        torch.testing.assert_close(shared[name], two[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_collated_row_layout():
    # chosen = prompt [10, 11, 12] + [20, 21], rejected = prompt + [30, 31, 32]; targets already shifted.
    chosen, rejected = [10, 11, 12, 20, 21], [10, 11, 12, 30, 31, 32]
    chosen_targets = [IGNORE_INDEX, IGNORE_INDEX, 20, 21, IGNORE_INDEX]
    rejected_targets = [IGNORE_INDEX, IGNORE_INDEX, 30, 31, 32, IGNORE_INDEX]
    batch = collate_shared([(chosen, rejected, 3), ([10, 40], [10, 50], 1)], pad_id=0,
                           targets=[(chosen_targets, rejected_targets), ([IGNORE_INDEX] * 2, [IGNORE_INDEX] * 2)])
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32], [10, 40, 50, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 1, 2, 3, 4, 5, 6]]
    assert batch["pair_segments"].tolist() == [[PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3,
                                               [PROMPT, CHOSEN, REJECTED] + [PADDING] * 5]
    assert batch["chosen_last"].tolist() == [4, 1] and batch["rejected_last"].tolist() == [7, 2]
    x = IGNORE_INDEX  # the last prompt token predicts the first token of both replies
    assert batch["chosen_targets"][0].tolist() == [x, x, 20, 21, x, x, x, x]
    assert batch["rejected_targets"][0].tolist() == [x, x, 30, x, x, 31, 32, x]


def test_shared_part_stops_at_the_final_reply(template):
    from corral.recipes.dpo import pairs_to_rows

    rows, _ = pairs_to_rows(preference_pairs(), template, 256)
    for row in rows:
        shared, chosen, rejected = row.shared, row.chosen, row.rejected
        assert chosen.input_ids[:shared] == rejected.input_ids[:shared]
        # The last shared token (the assistant header's end) predicts the first token of each reply; the one before
        # it predicts template text.
        assert chosen.targets[shared - 1] != IGNORE_INDEX and rejected.targets[shared - 1] != IGNORE_INDEX
        assert chosen.targets[shared - 2] == IGNORE_INDEX
    # Both replies of the second pair begin "I am": those tokens stay in each reply, not in the shared part.
    assert rows[1].chosen.input_ids[rows[1].shared] == rows[1].rejected.input_ids[rows[1].shared]
    assert any(t != IGNORE_INDEX for t in rows[2].chosen.targets[: rows[2].shared - 1])  # the earlier reply


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_mask_reaches_attention_unchanged_and_blocks_chosen_to_rejected(tiny_tokenizer, template, attention):
    from corral.recipes.dpo import collate_pairs, pairs_to_rows, reply_logps
    from tests.conftest import build_model

    model = build_model(len(tiny_tokenizer))
    model.config._attn_implementation = attention
    model.eval()
    rows, _ = pairs_to_rows(preference_pairs(), template, 256)
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        logps, _ = reply_logps(model, batch)
    hook.remove()
    expected = pair_attention_mask(model, batch["pair_segments"])
    assert expected.dtype == (torch.bool if attention == "sdpa" else torch.float32)
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    # A different chosen token changes the chosen reply's log-prob and leaves the rejected one's exactly as it was.
    changed = {k: v.clone() for k, v in batch.items()}
    at = int((batch["pair_segments"][0] == CHOSEN).nonzero()[1])
    changed["input_ids"][0, at] = (changed["input_ids"][0, at] + 7) % len(tiny_tokenizer)
    with torch.no_grad():
        after, _ = reply_logps(model, changed)
    half = len(rows)
    assert (after[0] - logps[0]).abs() > 1e-4
    torch.testing.assert_close(after[half:], logps[half:], rtol=0, atol=1e-6)


def test_flash_attention_and_sliding_windows_fall_back_to_two_sequences(tiny_tokenizer):
    from tests.conftest import build_model

    model = build_model(len(tiny_tokenizer))
    assert takes_pair_mask(model) and shared_prompt_path(True, model)
    assert not shared_prompt_path(False, model)
    model.config.sliding_window = 64  # a 4-D mask would replace the sliding window's
    assert not takes_pair_mask(model)
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"
    said = []
    assert not takes_pair_mask(model) and not shared_prompt_path(True, model, said.append)
    assert "two sequences" in said[0]


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tiny_tokenizer):
    from corral.models.load import load_model

    return load_model(str(tiny_model_dir), head="score", pad_token_id=tiny_tokenizer.pad_token_id, dtype="float32")


@pytest.mark.parametrize("method", ["full", "lora-checkpointed"])
def test_reward_loss_and_gradients_equal_two_sequences(reward_model, tiny_tokenizer, template, method):
    from peft import LoraConfig, get_peft_model

    from corral.recipes.reward import collate_pairs, evaluate_pairs, pairs_to_rows, reward_loss

    model = copy.deepcopy(reward_model).train()
    torch.manual_seed(0)
    if method != "full":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                                                 modules_to_save=["score"], init_lora_weights=False))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    rows, _ = pairs_to_rows(preference_pairs(), template, 256)
    pad = tiny_tokenizer.pad_token_id
    shared_loss, shared_grads, _ = loss_and_grads(model, reward_loss, collate_pairs(rows, pad, shared=True))
    two_loss, two_grads, _ = loss_and_grads(model, reward_loss, collate_pairs(rows, pad, shared=False))
    torch.testing.assert_close(shared_loss, two_loss, **TOL)
    assert_same_grads(shared_grads, two_grads)
    shared_eval = evaluate_pairs(model, rows, pad, 2, "cpu", shared=True)
    assert shared_eval == pytest.approx(evaluate_pairs(model, rows, pad, 2, "cpu", shared=False), rel=1e-5, abs=1e-6)


def test_reward_of_rejected_ignores_the_chosen_reply(reward_model, tiny_tokenizer, template):
    from corral.recipes.reward import collate_pairs, pair_scores, pairs_to_rows

    rows, _ = pairs_to_rows(preference_pairs(), template, 256)
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    changed = {k: v.clone() for k, v in batch.items()}
    chosen = changed["pair_segments"] == CHOSEN
    changed["input_ids"][chosen] = (changed["input_ids"][chosen] + 3) % len(tiny_tokenizer)
    with torch.no_grad():
        (chosen_before, rejected_before), (chosen_after, rejected_after) = (pair_scores(reward_model, b) for b in (batch, changed))
    assert ((chosen_after - chosen_before).abs() > 1e-5).all()
    torch.testing.assert_close(rejected_after, rejected_before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo"])
def test_dpo_losses_stats_and_gradients_equal_two_sequences(tiny_model_dir, tiny_tokenizer, template, kind):
    from peft import LoraConfig, get_peft_model

    from corral.models.load import load_model
    from corral.recipes.dpo import collate_pairs, dpo_loss_fn, pairs_to_rows

    torch.manual_seed(0)  # the adapter's random start, whatever ran before
    policy = get_peft_model(load_model(str(tiny_model_dir), dtype="float32"),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    rows, _ = pairs_to_rows(preference_pairs(), template, 256)
    pad = tiny_tokenizer.pad_token_id
    loss_fn = lambda m, b: dpo_loss_fn(m, b, kind=kind, beta=0.5, label_smoothing=0.1, simpo_gamma=0.3)  # noqa: E731
    shared_loss, shared_grads, (n, shared_stats) = loss_and_grads(policy, loss_fn, collate_pairs(rows, pad, True))
    two_loss, two_grads, (_, two_stats) = loss_and_grads(policy, loss_fn, collate_pairs(rows, pad, False))
    torch.testing.assert_close(shared_loss, two_loss, **TOL)
    assert n.item() == len(rows)
    for name in two_stats:
        torch.testing.assert_close(shared_stats[name], two_stats[name], **TOL, msg=name)
    assert_same_grads(shared_grads, two_grads)


def test_dpo_references_agree_on_both_paths(tiny_model_dir, tiny_tokenizer, template):
    """The frozen copy (full fine-tuning), precomputed log-probs and the prompt cut short of the final reply (any
    shared length down to none is exact: only the prompt is run once), on the shared path as on two sequences."""
    from corral.models.load import load_model
    from corral.recipes.dpo import collate_pairs, dpo_loss_fn, evaluate_pairs, pairs_to_rows, precompute_reference

    policy = load_model(str(tiny_model_dir), dtype="float32")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02, alpha=1.0)  # differs from the reference
    reference = load_model(str(tiny_model_dir), dtype="float32").eval().requires_grad_(False)
    rows, _ = pairs_to_rows(preference_pairs(), template, 256)
    pad = tiny_tokenizer.pad_token_id
    loss_fn = lambda m, b: dpo_loss_fn(m, b, kind="dpo", beta=0.1, label_smoothing=0.0, simpo_gamma=0.0,  # noqa: E731
                                       ref_model=reference)
    frozen_loss, frozen_grads, _ = loss_and_grads(policy, loss_fn, collate_pairs(rows, pad, False))
    cut = [copy.copy(r) for r in rows]
    cut[0].shared, cut[1].shared = cut[0].shared - 4, 0  # fewer tokens run once: still the same computation
    for layout in (rows, cut):
        shared_loss, shared_grads, _ = loss_and_grads(policy, loss_fn, collate_pairs(layout, pad, True))
        torch.testing.assert_close(shared_loss, frozen_loss, **TOL)
        assert_same_grads(shared_grads, frozen_grads)
    precomputed = {}
    for shared in (True, False):
        precomputed[shared] = [copy.copy(r) for r in rows]
        precompute_reference(reference, precomputed[shared], pad, 2, "cpu", shared)
    for a, b in zip(precomputed[True], precomputed[False], strict=True):
        assert (a.ref_chosen, a.ref_rejected) == pytest.approx((b.ref_chosen, b.ref_rejected), rel=1e-6)
    pre_loss, _, _ = loss_and_grads(policy, lambda m, b: dpo_loss_fn(m, b, kind="dpo", beta=0.1, label_smoothing=0.0,
                                                                     simpo_gamma=0.0),
                                    collate_pairs(precomputed[True], pad, True))  # fmt: skip
    torch.testing.assert_close(pre_loss, frozen_loss, **TOL)
    assert evaluate_pairs(policy, rows, pad, 2, "cpu", reference, 0.1, shared=True) == pytest.approx(
        evaluate_pairs(policy, rows, pad, 2, "cpu", reference, 0.1, shared=False), rel=1e-5, abs=1e-5)
