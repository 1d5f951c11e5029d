"""Long conversations split at turn boundaries (the same pieces as growing one exchange at a time, in linear
time, the last exchange kept); packing keeps samples apart and equals unpacked loss."""

import pytest
import torch

from corral.chat.conversation import Conversation
from corral.chat.templates import IGNORE_INDEX, get_template
from corral.data.clean import conversations_to_samples, plan_pieces, split_conversation, split_long
from corral.data.pack import collate, pack_rows, single_rows
from corral.recipes.sft import sft_loss
from tests.conftest import build_model


def long_conversation(turns: int, reply_words: int = 12) -> Conversation:
    pairs = []
    for i in range(turns):
        pairs += [("user", f"Question number {i}?"), ("assistant", " ".join(f"answer{i}" for _ in range(reply_words)))]
    return Conversation.from_pairs(*pairs, system="Be helpful.")


def test_long_conversation_is_split_between_exchanges(tiny_tokenizer):
    fmt = get_template("chatml", tiny_tokenizer)
    conv = long_conversation(8)
    full_len = len(fmt.render_with_masks(conv)[0])
    max_len = full_len // 3
    samples, truncated, dropped = split_conversation(conv, fmt, max_len)
    assert len(samples) >= 3 and truncated == 0 and dropped == 0
    texts = [tiny_tokenizer.decode(s.input_ids) for s in samples]
    for s, text in zip(samples, texts):
        assert len(s.input_ids) <= max_len
        assert text.startswith("<|im_start|>system\nBe helpful.")  # every piece keeps the system prompt
    # Every reply is trained exactly once, whole.
    for i in range(8):
        reply = " ".join(f"answer{i}" for _ in range(12))
        assert sum(reply in t for t in texts) == 1


def test_single_overlong_reply_is_truncated_and_counted(tiny_tokenizer):
    fmt = get_template("chatml", tiny_tokenizer)
    convs = [long_conversation(1, reply_words=200), long_conversation(1, reply_words=3)]
    samples, report = conversations_to_samples(convs, fmt, max_len=64)
    assert report.truncated == 1 and report.samples == 2 and report.dropped == 0
    assert all(len(s.input_ids) <= 64 for s in samples)
    assert "1 truncated" in report.summary()


def test_targets_are_labels_shifted_per_sample(tiny_tokenizer):
    fmt = get_template("chatml", tiny_tokenizer)
    conv = long_conversation(1, reply_words=2)
    ids, labels = fmt.render_with_masks(conv)
    (sample,), _ = conversations_to_samples([conv], fmt, 512)
    assert sample.targets == labels[1:] + [IGNORE_INDEX]
    assert sample.input_ids == ids


def test_packing_restarts_positions_and_fills_rows(tiny_tokenizer):
    fmt = get_template("chatml", tiny_tokenizer)
    convs = [long_conversation(1 + i % 3, reply_words=3 + i) for i in range(12)]
    samples, _ = conversations_to_samples(convs, fmt, 256)
    rows = pack_rows(samples, 256)
    assert len(rows) < len(samples)
    assert sum(len(r.input_ids) for r in rows) == sum(len(s.input_ids) for s in samples)
    assert sum(r.num_targets for r in rows) == sum(s.num_targets for s in samples)
    segments = []  # each packed sample's length, read from where the positions restart at 0
    for r in rows:
        assert len(r.input_ids) <= 256
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert starts[0] == 0
        for begin, end in zip(starts, starts[1:] + [len(r.position_ids)]):
            assert r.position_ids[begin:end] == list(range(end - begin))  # 0, 1, 2... within each sample
            segments.append(end - begin)
    assert sorted(segments) == sorted(len(s.input_ids) for s in samples)  # every sample once, whole


def test_packed_loss_equals_unpacked_loss(tiny_tokenizer):
    fmt = get_template("chatml", tiny_tokenizer)
    convs = [long_conversation(1 + i % 3, reply_words=2 + 3 * i) for i in range(10)]
    samples, _ = conversations_to_samples(convs, fmt, 512)
    model = build_model(len(tiny_tokenizer), layers=2).eval()
    pad = tiny_tokenizer.pad_token_id
    packed = pack_rows(samples, 512)
    assert len(packed) < len(samples)  # the test must really pack
    with torch.no_grad():
        loss_packed, n_packed = sft_loss(model, collate(packed, pad))
        loss_single, n_single = sft_loss(model, collate(single_rows(samples), pad))
        # and each sample alone, unpadded: the reference
        alone = [sft_loss(model, collate([r], pad)) for r in single_rows(samples)]
    ref = sum(l for l, _ in alone) / sum(n for _, n in alone)
    assert n_packed == n_single == sum(n for _, n in alone)
    assert abs(loss_packed / n_packed - ref) < 1e-5
    assert abs(loss_single / n_single - ref) < 1e-5


def test_packed_samples_do_not_attend_to_each_other(tiny_tokenizer):
    """Changing the first packed sample must not change the second sample's hidden states."""
    from corral.models.forward import final_hidden

    model = build_model(len(tiny_tokenizer)).eval()
    a, b, a2 = [5, 6, 7, 8], [9, 10, 11], [40, 41, 42, 43]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        h1 = final_hidden(model, torch.tensor([a + b]), pos)
        h2 = final_hidden(model, torch.tensor([a2 + b]), pos)
        hb = final_hidden(model, torch.tensor([b]), torch.tensor([[0, 1, 2]]))
    assert torch.allclose(h1[0, 4:], h2[0, 4:], atol=1e-6)
    assert torch.allclose(h1[0, 4:], hb[0], atol=1e-5)


def reference_pieces(conv: Conversation, fmt, max_len: int) -> list[tuple[list[int], list[int]]]:
    """The rule the splitter keeps: grow each piece one exchange at a time, rendering every candidate, and
    start a new piece at the first exchange that overflows. (Corral's old splitter did exactly this, at a
    cost quadratic in the number of turns.)"""
    ids, labels = fmt.render_with_masks(conv)
    if len(ids) <= max_len:
        return [(ids, labels)]
    system = [conv.messages[0]] if conv.system is not None else []
    turns = conv.turns
    pieces, current = [], []
    for exchange in [turns[i : i + 2] for i in range(0, len(turns), 2)]:
        candidate = current + exchange
        if current and len(fmt.render_with_masks(Conversation(system + candidate))[0]) > max_len:
            pieces.append(current)
            current = list(exchange)
        else:
            current = candidate
    pieces.append(current)
    return [fmt.render_with_masks(Conversation(system + piece)) for piece in pieces]


class CountingFormat:
    """A template wrapper that counts what is rendered."""

    def __init__(self, fmt):
        self.fmt, self.calls, self.tokens = fmt, 0, 0

    def render_with_masks(self, conv):
        ids, labels = self.fmt.render_with_masks(conv)
        self.calls += 1
        self.tokens += len(ids)
        return ids, labels


def varied_conversation(rng, exchanges: int, system: bool) -> Conversation:
    pairs = []
    for i in range(exchanges):
        pairs += [("user", " ".join(f"q{i}w{j}" for j in range(rng.randint(1, 12)))),
                  ("assistant", " ".join(f"a{i}x{j}" for j in range(rng.choice([1, 3, 8, 20, 60]))))]
    return Conversation.from_pairs(*pairs, system="You are terse." if system else None)


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1.1", "alpaca", "llama2", "llama3", "auto"])
def test_split_pieces_match_growing_one_exchange_at_a_time(tiny_tokenizer, template):
    import random

    fmt = get_template(template, tiny_tokenizer)
    rng = random.Random(template)
    for k in range(12):
        conv = varied_conversation(rng, rng.randint(1, 14), system=k % 2 == 0)
        for max_len in (40, 90, 200):
            got = [piece for _, _, piece in plan_pieces(conv, fmt, max_len)]
            assert got == reference_pieces(conv, fmt, max_len), (template, k, max_len)


def test_split_work_is_linear_in_the_number_of_turns(tiny_tokenizer):
    """Rendering every growing candidate costs (turns per piece)^2; the splitter renders about two candidates per
    piece, so the tokens it renders stay a small multiple of the conversation's, however many turns a piece has."""
    fmt = get_template("chatml", tiny_tokenizer)
    rendered = {}
    for turns in (100, 200):
        conv = long_conversation(turns, reply_words=2)
        full = len(fmt.render_with_masks(conv)[0])
        counting = CountingFormat(fmt)
        pieces = plan_pieces(conv, counting, full // 3)
        assert len(pieces) >= 3
        rendered[turns] = counting.tokens
        assert counting.tokens < 4 * full, (counting.tokens, full)
        assert counting.calls <= 3 * len(pieces) + 3
    assert rendered[200] < 2.3 * rendered[100]  # linear: twice the turns, about twice the work
    old = CountingFormat(fmt)
    reference_pieces(long_conversation(100, reply_words=2), old, full_len := len(fmt.render_with_masks(
        long_conversation(100, reply_words=2))[0]) // 3)
    assert old.tokens > 10 * full_len  # what the old rule cost on the same conversation


def test_last_exchange_is_kept_when_it_is_the_one_that_overflows(tiny_tokenizer):
    """FastChat's split_long_conversation drops the final exchange when adding it overflows the piece."""
    fmt = get_template("chatml", tiny_tokenizer)
    conv = Conversation.from_pairs(("user", "One?"), ("assistant", "first reply"), ("user", "Two?"),
                                   ("assistant", "second reply"), ("user", "Three?"),
                                   ("assistant", " ".join(["the last long reply"] * 8)))  # fmt: skip
    max_len = max(len(fmt.render_with_masks(Conversation(conv.messages[:4]))[0]),
                  len(fmt.render_with_masks(Conversation(conv.messages[4:]))[0]))
    assert len(fmt.render_with_masks(conv)[0]) > max_len
    samples, truncated, dropped = split_conversation(conv, fmt, max_len)
    texts = [tiny_tokenizer.decode(s.input_ids) for s in samples]
    assert len(samples) == 2 and truncated == 0 and dropped == 0
    assert "the last long reply" in texts[1] and "first reply" in texts[0] and "second reply" in texts[0]
    pieces, too_long = split_long(conv, fmt, max_len)
    assert [len(p.turns) for p in pieces] == [4, 2] and too_long == 0
