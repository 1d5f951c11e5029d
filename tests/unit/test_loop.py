"""The training loop's invariants: accumulation, token normalisation, optimizers, schedule, outputs."""

import json
import math

import pytest
import torch

from corral.chat.conversation import Conversation
from corral.chat.templates import get_template
from corral.config import TrainConfig
from corral.data.clean import conversations_to_samples
from corral.data.pack import collate, single_rows
from corral.recipes.sft import sft_loss
from corral.train.harness import make_accelerator
from corral.train.loop import StepPlan, train
from corral.train.optim import Lion, make_optimizer
from tests.conftest import build_model


def rows_for(tokenizer, n=8):
    fmt = get_template("chatml", tokenizer)
    # Different reply lengths, so per-micro-batch averaging would weight tokens differently.
    convs = [Conversation.from_pairs(("user", f"Question {i}?"), ("assistant", "yes " * (1 + 5 * i))) for i in range(n)]
    samples, _ = conversations_to_samples(convs, fmt, 256)
    return single_rows(samples)


def run_steps(tokenizer, tmp_path, name, steps=1, **train_kwargs):
    torch.manual_seed(0)
    model = build_model(len(tokenizer))
    train_kwargs.setdefault("max_grad_norm", 0)
    settings = TrainConfig(max_steps=steps, lr=1e-2, warmup_ratio=0, schedule="constant", resume="never", **train_kwargs)
    result = train(
        model, rows_for(tokenizer), collate_fn=lambda r: collate(r, tokenizer.pad_token_id), loss_fn=sft_loss,
        settings=settings, output_dir=tmp_path / name, save_model=lambda m, p: m.save_pretrained(p),
        accelerator=make_accelerator("no"),
    )  # fmt: skip
    return model, result


def test_batch1_accum8_equals_batch8_accum1(tiny_tokenizer, tmp_path):
    # The rows have different numbers of target tokens, so averaging per micro-batch would differ.
    # A huge clip threshold makes the loop report the true gradient norm without changing it.
    a, ra = run_steps(tiny_tokenizer, tmp_path, "a", steps=2, batch_size=1, grad_accum=8, max_grad_norm=1e9)
    b, rb = run_steps(tiny_tokenizer, tmp_path, "b", steps=2, batch_size=8, grad_accum=1, max_grad_norm=1e9)
    rows_a = [json.loads(line) for line in ra.metrics_path.read_text().splitlines()]
    rows_b = [json.loads(line) for line in rb.metrics_path.read_text().splitlines()]
    for x, y in zip(rows_a, rows_b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-4), name  # Adam divides by tiny gradients: float noise is amplified


def test_step_plan_is_deterministic_and_covers_every_row():
    plan = StepPlan(num_rows=10, batch_size=2, grad_accum=1, world_size=1, seed=3)
    first_epoch = [r for s in range(5) for r in plan.step_rows(s)]
    assert sorted(first_epoch) == list(range(10))
    assert StepPlan(10, 2, 1, 1, 3).step_rows(7) == plan.step_rows(7)
    assert plan.total_steps(0, 2.0) == 10 and plan.total_steps(3, 2.0) == 3
    # Two processes split one step's rows; together they are the single-process step.
    two = StepPlan(num_rows=10, batch_size=1, grad_accum=2, world_size=2, seed=3)
    one = StepPlan(num_rows=10, batch_size=2, grad_accum=2, world_size=1, seed=3)
    both = [r for rank in range(2) for mb in two.micro_batches(4, rank) for r in mb]
    assert both == [r for mb in one.micro_batches(4, 0) for r in mb]


def test_metrics_and_loss_curve_are_written(tiny_tokenizer, tmp_path):
    _, result = run_steps(tiny_tokenizer, tmp_path, "m", steps=3, batch_size=2, save_every=1, save_total_limit=2)
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "seen_tokens", "elapsed_s"):
        assert all(key in r for r in rows), key
    # Each step's counts are those of its rows (the plan's seeded order; default seed 42), the lr the constant one.
    data, plan = rows_for(tiny_tokenizer), StepPlan(8, batch_size=2, grad_accum=1, world_size=1, seed=42)
    step_rows = [[data[i] for i in plan.step_rows(s)] for s in range(3)]
    assert [r["target_tokens"] for r in rows] == [sum(x.num_targets for x in rs) for rs in step_rows]
    tokens = [sum(len(x.input_ids) for x in rs) for rs in step_rows]
    assert [r["seen_tokens"] for r in rows] == [sum(tokens[: s + 1]) for s in range(3)]
    assert [r["lr"] for r in rows] == [1e-2] * 3
    assert (tmp_path / "m" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    kept = sorted(p.name for p in (tmp_path / "m" / "checkpoints").iterdir())
    assert kept == ["step-000002", "step-000003"]  # save_total_limit=2 keeps the newest


def test_lion_keeps_one_state_and_moves_by_sign():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([w], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    w.grad = torch.tensor([0.5, -0.1, 0.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([0.9, -1.9, 3.0]))
    assert list(opt.state[w]) == ["exp_avg"]
    adam = make_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw", 1e-3, 0.0, (0.9, 0.999))
    assert isinstance(adam, torch.optim.AdamW)


def test_lion_trains_the_loop(tiny_tokenizer, tmp_path):
    # Lion moves every weight by exactly lr per step (the sign of its momentum mix; no weight decay here): after
    # 5 steps each one is an odd multiple of lr away from its start. Adam or SGD in its place would not be.
    start = build_model(len(tiny_tokenizer))  # the weights run_steps starts from (same seed)
    model, result = run_steps(tiny_tokenizer, tmp_path, "lion", steps=5, batch_size=8, optimizer="lion")
    for (name, before), after in zip(start.named_parameters(), model.parameters()):
        moves = (after.detach() - before.detach()) / 1e-2
        assert torch.allclose(moves, moves.round(), atol=1e-3), name
        assert (moves.round().abs() % 2 == 1).all(), name
    # One step is all 8 rows: its loss is the starting model's mean token loss over them.
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    with torch.no_grad():
        total, count = sft_loss(start.eval(), collate(rows_for(tiny_tokenizer), tiny_tokenizer.pad_token_id))
    assert rows[0]["loss"] == pytest.approx(total.item() / float(count), rel=1e-5)


def test_cosine_schedule_warms_up_and_decays(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    settings = TrainConfig(max_steps=10, lr=1e-3, warmup_ratio=0.2, schedule="cosine", resume="never", batch_size=2)
    model = build_model(len(tiny_tokenizer))
    result = train(
        model, rows_for(tiny_tokenizer), collate_fn=lambda r: collate(r, tiny_tokenizer.pad_token_id),
        loss_fn=sft_loss, settings=settings, output_dir=tmp_path / "c", save_model=lambda m, p: m.save_pretrained(p),
        accelerator=make_accelerator("no"),
    )  # fmt: skip
    lrs = [json.loads(line)["lr"] for line in result.metrics_path.read_text().splitlines()]
    # Logged after each step's schedule step s = 1..10: linear warmup over round(0.2 * 10) = 2 steps, then
    # half a cosine from the peak down to 0 over the remaining 8.
    expected = [1e-3 * s / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(1, 11)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
