"""The generation engine: continuous batching must give exactly what one-at-a-time generation gives."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import build_model

from corral.generate.chat import generate_replies
from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingError, SamplingParams
from corral.generate.types import BASE_ADAPTER

LENGTHS = (3, 17, 8, 40, 1, 25)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_model(len(tiny_tokenizer)).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, len(tiny_tokenizer), (n,), generator=g).tolist() for n in LENGTHS]


def hf_greedy(model, prompt, max_new_tokens, **kwargs):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=1, **kwargs)
    return out[0, len(prompt):].tolist()


def run_until_done(engine):
    while engine.has_work():
        engine.step()


def test_batched_greedy_equals_transformers_generate_alone(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    results = engine.generate(prompts, SamplingParams(max_new_tokens=24))
    for prompt, (choice,) in zip(prompts, results):
        assert choice.token_ids == hf_greedy(model, prompt, 24)
        assert choice.finish_reason == "length"


class ScaledLogits(torch.nn.Module):
    """A model whose logits are not its output head's plain product (as with logit scaling or capping)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = -out.logits  # greedy now takes the least likely token
        return out


def test_the_engine_runs_a_plain_output_head_itself_and_no_other(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    (fast,) = engine.generate(prompts[:1], SamplingParams(max_new_tokens=6))
    assert engine._head.weight is model.get_output_embeddings().weight  # checked against the model's logits, then used
    assert fast[0].token_ids == hf_greedy(model, prompts[0], 6)
    scaled = ScaledLogits(model)
    engine = TransformersEngine(scaled, tiny_tokenizer, stop_token_ids=())
    (own,) = engine.generate(prompts[:1], SamplingParams(max_new_tokens=6))
    assert engine._head.weight is False  # its own logits differ from head @ hidden: they are kept
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1]
    assert own[0].token_ids[0] == int(logits.argmin())


def test_requests_joining_and_leaving_a_running_batch(model, tiny_tokenizer, prompts):
    """Requests join mid-flight, rows retire at different steps, the batch is capped: outputs are unchanged."""
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=(), max_batch=3)
    budgets = [5, 30, 12, 20, 9, 16]
    streams = [engine.submit(p, SamplingParams(max_new_tokens=b)) for p, b in zip(prompts[:2], budgets)]
    for _ in range(4):
        engine.step()
    assert len(engine._seqs) == 2
    streams += [engine.submit(p, SamplingParams(max_new_tokens=b)) for p, b in zip(prompts[2:], budgets[2:])]
    sizes = []
    while engine.has_work():
        engine.step()
        sizes.append((len(engine._seqs), len(engine._waiting)))
    assert max(s for s, _ in sizes) == 3 and sizes[0][1] > 0  # capped at max_batch while others waited
    for prompt, budget, stream in zip(prompts, budgets, streams):
        (choice,) = stream.collect()
        assert choice.token_ids == hf_greedy(model, prompt, budget)
    assert engine._cache is None and not engine._seqs  # everything retired


def test_repetition_penalty_matches_transformers(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    results = engine.generate(prompts[:3], SamplingParams(max_new_tokens=20, repetition_penalty=1.5))
    for prompt, (choice,) in zip(prompts, results):
        assert choice.token_ids == hf_greedy(model, prompt, 20, repetition_penalty=1.5)


def test_stop_token_and_stop_string(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    reference = hf_greedy(model, prompts[1], 30)
    stop_token = reference[6]
    (choice,), = engine.generate([prompts[1]], SamplingParams(max_new_tokens=30, stop_token_ids=(stop_token,)))
    assert choice.finish_reason == "stop"
    assert choice.token_ids == reference[: reference.index(stop_token) + 1]

    full_text = tiny_tokenizer.decode(reference)
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    stream = engine.submit(prompts[1], SamplingParams(max_new_tokens=30, stop=(stop,)))
    run_until_done(engine)
    events = list(stream)
    text = "".join(e.text for e in events)
    assert text == full_text[: full_text.index(stop)]
    assert stop not in text and events[-1].finish_reason == "stop"


def test_streamed_deltas_add_up_to_the_text(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    stream = engine.submit(prompts[0], SamplingParams(max_new_tokens=15))
    run_until_done(engine)
    events = list(stream)
    assert len(events) == 15 and [e.finish_reason for e in events[:-1]] == [None] * 14
    assert "".join(e.text for e in events) == tiny_tokenizer.decode(hf_greedy(model, prompts[0], 15))


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=3, n=3)
    crowded = engine.generate(prompts[:3], params)[1]
    alone = engine.generate([prompts[1]], params)[0]
    assert [c.token_ids for c in crowded] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in alone}) == 3  # n replies differ
    top1 = engine.generate([prompts[2]], SamplingParams(max_new_tokens=10, temperature=0.8, top_k=1, seed=0))
    assert top1[0][0].token_ids == hf_greedy(model, prompts[2], 10)


def test_presence_penalty_changes_greedy_choice(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    plain = engine.generate([prompts[3]], SamplingParams(max_new_tokens=30))[0][0].token_ids
    penalised = engine.generate([prompts[3]], SamplingParams(max_new_tokens=30, presence_penalty=2.0, frequency_penalty=2.0))
    ids = penalised[0][0].token_ids
    assert len(set(ids)) >= len(set(plain))
    assert ids != plain


def test_cancel_and_context_limit(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=(), max_len=45)
    long_one = engine.submit(prompts[3], SamplingParams(max_new_tokens=100))  # 40-token prompt, context 45
    cancelled = engine.submit(prompts[0], SamplingParams(max_new_tokens=100))
    engine.step()
    cancelled.cancel()
    run_until_done(engine)
    (c,) = cancelled.collect()
    assert c.finish_reason == "cancelled" and len(c.token_ids) < 100
    (l,) = long_one.collect()
    assert l.finish_reason == "length" and len(prompts[3]) + len(l.token_ids) == 45
    with pytest.raises(ValueError, match="prompt"):
        engine.submit(list(range(10, 60)), SamplingParams())


def test_background_thread_serves_concurrent_submitters(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=()).start()
    try:
        streams = [engine.submit(p, SamplingParams(max_new_tokens=12)) for p in prompts]
        for prompt, stream in zip(prompts, streams):
            assert stream.collect()[0].token_ids == hf_greedy(model, prompt, 12)
    finally:
        engine.close()


def test_mixed_lora_adapters_in_one_batch(tiny_tokenizer, prompts):
    """Two LoRA adapters and the bare base share one model and one batch, each row with its own weights."""
    from peft import LoraConfig, get_peft_model

    base = build_model(len(tiny_tokenizer), seed=4)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                                adapter_name="one")
    peft_model.add_adapter("two", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    engine = TransformersEngine(peft_model, tiny_tokenizer, stop_token_ids=())
    params = SamplingParams(max_new_tokens=12)
    peft_model.set_adapter("two")
    streams = [engine.submit(prompts[1], params, adapter=a) for a in ("one", "two", BASE_ADAPTER, None)]
    run_until_done(engine)
    mixed = [s.collect()[0].token_ids for s in streams]
    expected = []
    for adapter in ("one", "two"):
        peft_model.set_adapter(adapter)
        expected.append(hf_greedy(peft_model, prompts[1], 12))
    with peft_model.disable_adapter():
        expected.append(hf_greedy(peft_model, prompts[1], 12))
    expected.append(expected[1])  # no adapter named: the model's active adapter ("two")
    assert mixed == expected
    assert len({tuple(e) for e in expected}) == 3  # the adapters really differ


def test_generate_replies_stops_at_the_template_end_of_turn(model, tiny_tokenizer):
    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template

    template = get_template("chatml", tiny_tokenizer)
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    conv = Conversation.from_pairs(("user", "hello"))
    engine = TransformersEngine(model, tiny_tokenizer)
    (reply,) = generate_replies(engine, template, [conv], SamplingParams(max_new_tokens=40))
    params = SamplingParams(max_new_tokens=40, stop_token_ids=(end_of_turn,))
    raw = engine.generate([template.render(conv)], params)[0][0]
    assert reply == raw.text.strip()


@pytest.mark.parametrize("fields, param", [
    ({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"), ({"n": 0}, "n"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": ("",)}, "stop"), ({"seed": 2**64}, "seed"),
    ({"seed": 2**64 - 2, "n": 3}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
])  # fmt: skip
def test_a_bad_sampling_value_raises_an_error_naming_its_parameter(fields, param):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**fields)
    assert e.value.param == param and str(e.value).startswith(f"{param}: ")
    assert isinstance(e.value, ValueError)  # callers that catch ValueError still do
    SamplingParams(seed=2**64 - 3, n=3)  # the largest seed whose n generators all fit (seed + i < 2**64)
    SamplingParams(seed=-(2**63))


def test_sampling_draws_follow_the_distribution():
    """Inverse-CDF draws: frequencies match softmax(logits / T), and tokens cut by top-k are never drawn."""
    from corral.generate.sampling import RowParams, sample_next

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    draws = 4000
    params = [SamplingParams(temperature=0.5, seed=0)]
    rows = RowParams.of(params * draws, "cpu")
    generators = [torch.Generator().manual_seed(i) for i in range(draws)]
    tokens = sample_next(logits.expand(draws, -1), rows, generators)
    freq = torch.bincount(tokens, minlength=5).float() / draws
    expected = (logits[0] / 0.5).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)  # about 4 standard errors at 4000 draws
    top2 = sample_next(logits.expand(draws, -1), RowParams.of([SamplingParams(temperature=1.0, top_k=2, seed=0)] * draws, "cpu"),
                       [torch.Generator().manual_seed(i) for i in range(draws)])  # fmt: skip
    assert set(top2.tolist()) == {0, 1}
