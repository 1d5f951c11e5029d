"""The generation engine: continuous batching must give exactly what one-at-a-time generation gives."""

from __future__ import annotations

from dataclasses import replace

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


# ---------------------------------------------------------------------------------------------- failures
def test_token_ids_outside_the_vocabulary_are_refused_at_submit(model, tiny_tokenizer):
    engine = TransformersEngine(model, tiny_tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    for bad in (rows, 99999999, -5, 10**20):
        with pytest.raises(ValueError, match=rf"^prompt: token id {bad} is outside the vocabulary \(0\.\.{rows - 1}\)"):
            engine.submit([5, bad, 6], SamplingParams(max_new_tokens=2))
    assert not engine.has_work()


def test_a_failing_prefill_fails_only_the_request_that_causes_it(model, tiny_tokenizer, prompts):
    """Rows already running keep going and the other admitted requests are answered: the admitted
    batch is bisected until the row that fails alone is found (here: prompts holding token 7)."""
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    forward = engine._forward

    def poisoned(input_ids, *args, **kwargs):
        if (input_ids == 7).any():
            raise RuntimeError("poisoned row")
        return forward(input_ids, *args, **kwargs)

    engine._forward = poisoned
    running = engine.submit(prompts[0], SamplingParams(max_new_tokens=12))
    engine.step()
    bad = engine.submit([3, 7, 4], SamplingParams(max_new_tokens=12))
    joining = [engine.submit(p, SamplingParams(max_new_tokens=12)) for p in prompts[1:4]]
    run_until_done(engine)
    with pytest.raises(RuntimeError, match="generation failed: RuntimeError: poisoned row"):
        bad.collect()
    for prompt, stream in zip([prompts[0], *prompts[1:4]], [running, *joining]):
        (choice,) = stream.collect()
        assert choice.token_ids == hf_greedy(model, prompt, 12)


def test_a_failing_decode_step_answers_every_running_row_and_the_engine_goes_on(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    streams = [engine.submit(p, SamplingParams(max_new_tokens=8)) for p in prompts[:2]]
    engine.step()
    decode = engine._decode
    engine._decode = lambda: (_ for _ in ()).throw(MemoryError("out of memory"))
    engine.step()
    engine._decode = decode
    for stream in streams:
        with pytest.raises(RuntimeError, match="MemoryError: out of memory"):
            stream.collect()
    ((after,),) = engine.generate(prompts[2:3], SamplingParams(max_new_tokens=8))
    assert after.token_ids == hf_greedy(model, prompts[2], 8)


# ---------------------------------------------------------------------------------------------- logprobs
def test_logprobs_are_the_models_log_softmax_at_each_reply_token(model, tiny_tokenizer, prompts):
    """Checked against a plain forward pass over prompt + reply, sampled rows included (temperature and
    penalties change what is drawn, never the reported distribution)."""
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    params = [SamplingParams(max_new_tokens=6, logprobs=3),
              SamplingParams(max_new_tokens=6, logprobs=0, temperature=1.3, seed=4, presence_penalty=1.5),
              SamplingParams(max_new_tokens=6)]  # fmt: skip
    results = engine.generate(prompts[:3], params)
    for prompt, (choice,), p in zip(prompts, results, params):
        if p.logprobs is None:
            assert choice.logprobs == []
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + choice.token_ids])).logits[0, len(prompt) - 1:-1].float()
        expected = logits.log_softmax(-1)
        assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
        for i, lp in enumerate(choice.logprobs):
            assert lp.logprob == pytest.approx(float(expected[i, lp.token_id]), abs=1e-4)
            top = expected[i].topk(p.logprobs)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_a_stop_token_has_no_logprob_entry(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    ((free,),) = engine.generate(prompts[:1], params)
    at = next(i for i, t in enumerate(free.token_ids) if i and t not in free.token_ids[:i])
    stop = free.token_ids[at]
    ((cut,),) = engine.generate(prompts[:1], replace(params, logprobs=1, stop_token_ids=(stop,)))
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[: at + 1]
    assert [lp.token_id for lp in cut.logprobs] == free.token_ids[:at]


# ---------------------------------------------------------------------------------------------- structured outputs
SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["A", "B", "tie"]},
        "scores": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
        "judge": {"type": "object", "properties": {"sure": {"type": "boolean"}}, "required": ["sure"],
                  "additionalProperties": False},
    },
    "required": ["verdict", "scores", "judge"],
    "additionalProperties": False,
}


def test_json_schema_rows_validate_and_share_a_batch_with_free_rows(model, tiny_tokenizer, prompts):
    """A random model under the schema's mask still writes JSON that parses and validates; the free
    rows decoded in the same steps are exactly what they are alone."""
    import json

    import jsonschema

    from corral.generate.structured import ResponseFormat

    engine = TransformersEngine(model, tiny_tokenizer)  # eos stops: the grammar ends on it
    constrained = SamplingParams(max_new_tokens=200, response_format=ResponseFormat.json_schema(SCHEMA), seed=3,
                                 temperature=1.0)
    free = SamplingParams(max_new_tokens=10)
    results = engine.generate(prompts[:4], [constrained, free, constrained, free])
    for i in (0, 2):
        (choice,) = results[i]
        assert choice.finish_reason == "stop" and choice.token_ids[-1] == tiny_tokenizer.eos_token_id
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    alone = TransformersEngine(model, tiny_tokenizer).generate([prompts[1], prompts[3]], free)
    assert [r[0].token_ids for r in (results[1], results[3])] == [a[0].token_ids for a in alone]


def test_json_object_replies_parse_as_objects(model, tiny_tokenizer, prompts):
    import json

    from corral.generate.structured import ResponseFormat

    engine = TransformersEngine(model, tiny_tokenizer)
    results = engine.generate(prompts[:2], SamplingParams(max_new_tokens=300, response_format=ResponseFormat("json_object"),
                                                          temperature=0.8, seed=11))
    for (choice,) in results:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
        else:  # a random model may write a long object: what it wrote is still a valid JSON prefix
            assert choice.finish_reason == "length" and choice.text.startswith("{")


def test_a_schema_xgrammar_cannot_compile_is_a_value_error_naming_response_format(model, tiny_tokenizer, prompts):
    from corral.generate.structured import ResponseFormat

    engine = TransformersEngine(model, tiny_tokenizer)
    with pytest.raises(ValueError, match="^response_format: "):
        engine.submit(prompts[0], SamplingParams(response_format=ResponseFormat("json_schema", '{"type": "nonsense"}')))


def test_logprobs_under_a_response_format_list_only_allowed_alternatives(model, tiny_tokenizer, prompts):
    """With 3 allowed tokens, top_logprobs=5 gives at most 3 alternatives, none of them -inf (JSON has no -inf)."""
    import math

    from corral.generate.structured import ResponseFormat

    engine = TransformersEngine(model, tiny_tokenizer)
    schema = {"type": "object", "properties": {"v": {"enum": ["A", "B", "C"]}}, "required": ["v"],
              "additionalProperties": False}
    ((choice,),) = engine.generate(prompts[:1], SamplingParams(max_new_tokens=40, logprobs=5,
                                                               response_format=ResponseFormat.json_schema(schema)))
    assert choice.finish_reason == "stop" and choice.text in ('{"v": "A"}', '{"v": "B"}', '{"v": "C"}')
    assert all(math.isfinite(v) for lp in choice.logprobs for _, v in lp.top)
    assert min(len(lp.top) for lp in choice.logprobs) < 5  # some step allowed fewer than 5 tokens
    assert all(math.isclose(sum(math.exp(v) for _, v in lp.top), 1, abs_tol=1e-4) for lp in choice.logprobs
               if len(lp.top) < 5)  # the allowed tokens carry the whole (masked) distribution


def test_vllm_logprob_entries_become_ours_ranked_and_cut_at_top():
    """vLLM gives per token {id: Logprob(logprob, rank)}: the sampled token plus the top ones (the sampled
    one may rank below them). Plain Python: runs without vLLM."""
    from types import SimpleNamespace as Logprob

    from corral.generate.types import TokenLogprob
    from corral.generate.vllm import _logprob

    step = {7: Logprob(logprob=-3.0, rank=4), 1: Logprob(logprob=-0.5, rank=1), 2: Logprob(logprob=-1.5, rank=2)}
    assert _logprob([step], 0, 7, 2) == TokenLogprob(7, -3.0, ((1, -0.5), (2, -1.5)))
    assert _logprob([step], 0, 7, 0) == TokenLogprob(7, -3.0, ())
    assert _logprob([step], 0, 7, None) is None and _logprob(None, 0, 7, 2) is None
