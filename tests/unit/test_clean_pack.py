"""Long conversations split at turn boundaries; packing keeps samples apart and equals unpacked loss."""

import torch

from corral.chat.conversation import Conversation
from corral.chat.templates import IGNORE_INDEX, get_template
from corral.data.clean import conversations_to_samples, split_conversation
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
