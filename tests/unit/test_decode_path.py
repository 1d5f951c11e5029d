"""The engine's decode path on its pre-allocated slot cache (generate/kv.py): same tokens as transformers'
`generate`, rows joining, leaving and reusing places without seeing another row's cache."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import build_model
from tests.unit.test_engine import hf_greedy

from corral.generate.engine import TransformersEngine
from corral.generate.sampling import SamplingParams

LENGTHS = (3, 17, 8, 40, 1, 25, 12, 6, 30)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_model(len(tiny_tokenizer)).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(10, len(tiny_tokenizer), (n,), generator=g).tolist() for n in LENGTHS]


def counting_backend():
    """A torch.compile backend that runs each traced graph as it is, and the list of the graphs it was given
    (dynamo's caches cleared first, so every graph is built anew)."""
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    return graphs, counting


def run(engine):
    while engine.has_work():
        engine.step()


def test_the_slot_cache_is_the_default_and_its_greedy_tokens_are_generates(model, tiny_tokenizer, prompts):
    """Nine rows of different lengths (rows rounded up to 16), one reply crossing the first 256 columns (the
    buffers double mid-reply, the rows' caches copied over): every reply is what `generate` gives alone."""
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    assert engine._slots is not None
    budgets = [24] * len(prompts)
    budgets[3] = 230  # 40 prompt tokens + 230: past 256 columns
    streams = [engine.submit(p, SamplingParams(max_new_tokens=b)) for p, b in zip(prompts, budgets)]
    run(engine)
    assert engine._slots.capacity() == (16, 512)  # 9 rows -> 16, 271 columns -> 512
    for prompt, budget, stream in zip(prompts, budgets, streams):
        (choice,) = stream.collect()
        assert choice.token_ids == hf_greedy(model, prompt, budget)


def test_slot_and_dynamic_caches_give_the_same_replies_and_logprobs(model, tiny_tokenizer, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5, logprobs=2, repetition_penalty=1.2)
    slots = TransformersEngine(model, tiny_tokenizer, stop_token_ids=()).generate(prompts, params)
    dynamic_engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=(), kv_cache="dynamic")
    assert dynamic_engine._slots is None
    dynamic = dynamic_engine.generate(prompts, params)
    for (a,), (b,) in zip(slots, dynamic):
        assert a.token_ids == b.token_ids
        assert [e.token_id for e in a.logprobs] == [e.token_id for e in b.logprobs]
        assert [e.logprob for e in a.logprobs] == pytest.approx([e.logprob for e in b.logprobs], abs=1e-4)


def test_a_finished_rows_place_is_reused_and_its_new_tenant_sees_nothing_of_the_old(model, tiny_tokenizer, prompts):
    """Row 0 finishes first; the last row moves into its place and a new request fills the last: rows change
    places mid-reply, and every reply is still what it is alone."""
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=(), max_batch=4)
    first = [engine.submit(p, SamplingParams(max_new_tokens=b)) for p, b in zip(prompts[:4], (3, 20, 20, 20))]
    for _ in range(4):
        engine.step()
    assert len(engine._seqs) == 3 and engine._seqs[0].stream is first[3]  # the last row took the finished one's place
    assert engine._slots.capacity()[0] == 8  # 4 rows and the one spare (kv.py) -> 8
    late = engine.submit(prompts[4], SamplingParams(max_new_tokens=15))  # a prompt of 1 token into a used place
    engine.step()
    assert engine._slots.rows == 4 and engine._slots.capacity()[0] == 8  # no new buffer rows: the place was reused
    run(engine)
    for prompt, budget, stream in zip(prompts, (3, 20, 20, 20, 15), [*first, late]):
        (choice,) = stream.collect()
        assert choice.token_ids == hf_greedy(model, prompt, budget)
    assert engine._cache is None and engine._slots.rows == 0


def test_seeded_sampling_does_not_depend_on_rows_joining_and_leaving(model, tiny_tokenizer, prompts):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11)
    (alone,), = TransformersEngine(model, tiny_tokenizer, stop_token_ids=()).generate([prompts[1]], params)
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    stream = engine.submit(prompts[1], params)
    others = [engine.submit(p, SamplingParams(max_new_tokens=3, temperature=1.0)) for p in prompts[2:5]]
    for _ in range(5):
        engine.step()
    others += [engine.submit(p, SamplingParams(max_new_tokens=6, temperature=0.7, seed=3)) for p in prompts[5:]]
    run(engine)
    assert stream.collect()[0].token_ids == alone.token_ids


def test_eager_attention_gets_an_additive_mask(tiny_tokenizer, prompts):
    eager = build_model(len(tiny_tokenizer))
    eager.config._attn_implementation = "eager"
    eager.eval()
    engine = TransformersEngine(eager, tiny_tokenizer, stop_token_ids=())
    assert engine._slots is not None and engine._additive_mask
    results = engine.generate(prompts[:4], SamplingParams(max_new_tokens=10))
    for prompt, (choice,) in zip(prompts, results):
        assert choice.token_ids == hf_greedy(eager, prompt, 10)


def test_an_unknown_kv_cache_is_refused(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="kv_cache"):
        TransformersEngine(model, tiny_tokenizer, kv_cache="paged")


def test_a_compiled_decode_step_gives_generates_tokens_across_batch_buckets(model, tiny_tokenizer, prompts):
    """torch.compile traced with aot_eager (the graph capture and functionalisation of the in-place cache writes,
    without building C++): 3 rows (padded to 4), 6 after a join (to 8), then fewer as rows finish."""
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=(), compile="aot_eager")
    assert engine.compile_max_rows == 2  # the default: larger steps run eagerly (measured faster there)
    engine.compile_max_rows = 8
    compiled, rows = engine._compiled, []
    engine._compiled = lambda ids, *rest: rows.append(len(ids)) or compiled(ids, *rest)
    budgets = (12, 30, 9, 20, 16, 25)
    streams = [engine.submit(p, SamplingParams(max_new_tokens=b)) for p, b in zip(prompts[:3], budgets)]
    for _ in range(3):
        engine.step()
    streams += [engine.submit(p, SamplingParams(max_new_tokens=b)) for p, b in zip(prompts[3:6], budgets[3:])]
    run(engine)
    assert {4, 8, 2, 1} <= set(rows) <= {1, 2, 4, 8}  # every decode step after the first ran compiled, padded
    for prompt, budget, stream in zip(prompts, budgets, streams):
        assert stream.collect()[0].token_ids == hf_greedy(model, prompt, budget)


def test_steps_above_compile_max_rows_run_eagerly_with_the_same_tokens(model, tiny_tokenizer, prompts):
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=(), compile="aot_eager")
    compiled, rows = engine._compiled, []
    engine._compiled = lambda ids, *rest: rows.append(len(ids)) or compiled(ids, *rest)
    budgets = (6, 14, 10)  # 3 rows run eagerly; then 2 rows (bucket 2) and 1 row run compiled
    results = engine.generate(prompts[:3], [SamplingParams(max_new_tokens=b) for b in budgets])
    assert set(rows) == {1, 2} and rows.count(2) == 4 and rows.count(1) == 4
    for prompt, budget, (choice,) in zip(prompts, budgets, results):
        assert choice.token_ids == hf_greedy(model, prompt, budget)


def test_compile_needs_the_slot_cache(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="compile"):
        TransformersEngine(model, tiny_tokenizer, kv_cache="dynamic", compile=True)


def test_serve_dtype_auto_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch):
    from corral.config import ServeConfig
    from corral.recipes.serve import serving_dtype

    monkeypatch.setattr("corral.models.load.default_device", lambda: torch.device("cpu"))  # also on a GPU machine
    monkeypatch.setenv("CORRAL_CPU_BF16", "1")
    assert serving_dtype(ServeConfig()) == "bfloat16"
    assert serving_dtype(ServeConfig(dtype="float32")) == "float32"  # asked for: kept
    assert serving_dtype(ServeConfig(engine="vllm")) == "auto"  # vLLM picks its own
    monkeypatch.setenv("CORRAL_CPU_BF16", "0")
    assert serving_dtype(ServeConfig()) == "auto"  # load_model's: float32 on CPU


def test_matvec_linear_is_f_linear_with_float32_accumulation():
    """generate/compiled.py: the reduction the compiled step uses for 1-2 row products, on 1 and 2 rows, 2-D and
    3-D inputs, with and without a bias; in bf16 it accumulates in float32 and rounds once."""
    from corral.generate.compiled import matvec_linear

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    for x in (torch.randn(1, 64, generator=g), torch.randn(2, 1, 64, generator=g)):
        torch.testing.assert_close(matvec_linear(x, weight), torch.nn.functional.linear(x, weight),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(matvec_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias),
                                   rtol=1e-5, atol=1e-5)
        exact = torch.nn.functional.linear(x.bfloat16().float(), weight.bfloat16().float())
        got = matvec_linear(x.bfloat16(), weight.bfloat16())
        assert got.dtype == torch.bfloat16
        # Rounded once: within half a bf16 step of the float32 result (a step is 2**-7 relative), where rounding
        # float32 partial sums to bf16 would drift by several steps over 64 products.
        torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-6)


def test_the_matvec_mode_rewrites_linears_of_at_most_two_rows_only():
    from corral.generate.compiled import MATVEC_MAX, MatVec, matvec_linear

    assert MATVEC_MAX == 2
    layer = torch.nn.Linear(64, 32)
    calls = []
    original = torch.nn.functional.linear
    with MatVec():
        for rows in (1, 2, 3, 8):
            x = torch.randn(rows, 1, 64)
            out = layer(x)
            calls.append(torch.equal(out, matvec_linear(x, layer.weight, layer.bias)))
            assert torch.allclose(out, original(x, layer.weight, layer.bias), atol=1e-5)
    # Rows 1 and 2 through the reduction (bit-equal to it); 3 and 8 through F.linear itself, whose MKL sum
    # order differs in the last bits.
    assert calls[:2] == [True, True]
    assert torch.equal(layer(torch.ones(3, 64)), original(torch.ones(3, 64), layer.weight, layer.bias))


def test_one_compiled_graph_per_row_bucket_serves_every_width(model, tiny_tokenizer, prompts):
    """The step's width and the cache's size are dynamic in the compiled graph: a reply that grows the cache
    from 256 to 512 columns, then a second one, run on the one graph compiled for a 1-row step."""
    graphs, counting = counting_backend()
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=(), compile=counting)
    for prompt, budget in ((prompts[3], 260), (prompts[0], 30)):  # 40 + 260 tokens: past 256 columns
        (choice,), = engine.generate([prompt], SamplingParams(max_new_tokens=budget))
        assert choice.token_ids == hf_greedy(model, prompt, budget)
    assert engine._slots.capacity() == (2, 512)
    assert len(graphs) == 1


def test_the_inductor_compiled_step_gives_generates_tokens(tiny_tokenizer, prompts):
    """compile=True: inductor builds the step's C++ (the matrix-vector reductions included) with the system
    compiler; greedy replies of a 1-row and a 2-row batch, one growing past 256 columns, are generate's. One
    layer, two graphs: about 25 s with a cold inductor cache (CI), most of it building C++."""
    model = build_model(len(tiny_tokenizer), layers=1).eval()
    torch._dynamo.reset()
    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=(), compile=True)
    compiled, rows = engine._compiled, []
    engine._compiled = lambda ids, *rest: rows.append(len(ids)) or compiled(ids, *rest)
    budgets = (230, 20)
    results = engine.generate(prompts[3:5], [SamplingParams(max_new_tokens=b) for b in budgets])
    assert set(rows) == {1, 2}
    for prompt, budget, (choice,) in zip(prompts[3:5], budgets, results):
        assert choice.token_ids == hf_greedy(model, prompt, budget)


def test_warm_up_builds_both_row_buckets_before_any_request(model, tiny_tokenizer, prompts, caplog):
    graphs, counting = counting_backend()
    engine = TransformersEngine(model, tiny_tokenizer, compile=counting)
    with caplog.at_level("WARNING", logger="corral.generate.engine"):
        assert engine.warm_up() > 0 and len(graphs) == 2  # the 1-row and the 2-row step
    assert "run eagerly" not in caplog.text
    assert engine.default_stop_ids == frozenset({tiny_tokenizer.eos_token_id})  # restored
    params = [SamplingParams(max_new_tokens=b) for b in (9, 17)]
    results = engine.generate(prompts[:2], params)
    assert len(graphs) == 2  # nothing more to build
    for prompt, p, (choice,) in zip(prompts, params, results):
        expected = hf_greedy(model, prompt, p.max_new_tokens)  # the engine stops at eos, if it comes, included
        assert choice.token_ids == expected[: len(choice.token_ids)] and choice.token_ids


def test_a_step_that_does_not_compile_fails_at_warm_up_with_the_reason(model, tiny_tokenizer):
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    torch._dynamo.reset()
    engine = TransformersEngine(model, tiny_tokenizer, compile=broken)
    expected = r"compile: the decode step did not compile \(.*no C\+\+ compiler found\); serve with compile=false"
    with pytest.raises(ValueError, match=expected):
        engine.warm_up()
    assert TransformersEngine(model, tiny_tokenizer).warm_up() == 0.0  # nothing to build without compile


def test_serve_prints_its_precision_at_start(monkeypatch):
    from corral.config import ServeConfig
    from corral.recipes.serve import precision_line, serving_dtype

    monkeypatch.setattr("corral.models.load.default_device", lambda: torch.device("cpu"))
    monkeypatch.setenv("CORRAL_CPU_BF16", "1")
    cfg = ServeConfig()
    assert precision_line(cfg, serving_dtype(cfg)) == (
        "engine transformers on cpu, weights in bfloat16 (dtype auto: this CPU computes bf16 natively)")
    monkeypatch.setenv("CORRAL_CPU_BF16", "0")
    assert precision_line(cfg, serving_dtype(cfg)) == (
        "engine transformers on cpu, weights in float32 (dtype auto: this CPU has no native bf16)")
    cfg = ServeConfig(dtype="float32", compile=True)
    assert precision_line(cfg, serving_dtype(cfg)) == (
        "engine transformers on cpu, weights in float32, decode steps of 1-2 rows compiled")


def test_a_started_engine_builds_its_graphs_in_its_own_thread(model, tiny_tokenizer, capsys):
    """serve/models.started: the warm-up's steps run in the engine's loop thread, as served requests will (its
    kernels' OpenMP threads then belong to that thread; warmed up in the main thread, serving ran at half speed)."""
    from corral.serve.models import started

    threads = []

    def recording(graph, example_inputs):
        threads.append(threading.current_thread().name)
        return graph.forward

    torch._dynamo.reset()
    engine = started(TransformersEngine(model, tiny_tokenizer, compile=recording), "tiny")
    try:
        assert threads == ["corral-engine", "corral-engine"]
        out = capsys.readouterr().out
        assert "compiling the decode step of tiny" in out and "compiled in" in out
    finally:
        engine.close()


def test_warm_up_says_so_when_the_model_keeps_its_own_head(model, tiny_tokenizer, caplog):
    """A model whose logits are not a plain head over the hidden state (the engine's check fails) never runs the
    compiled step, which computes the head itself: warm_up builds nothing and says why."""
    graphs, counting = counting_backend()
    engine = TransformersEngine(model, tiny_tokenizer, compile=counting)
    engine._head.weight = False  # as after a failed check
    with caplog.at_level("WARNING", logger="corral.generate.engine"):
        engine.warm_up()
    assert graphs == []
    assert "decode steps run eagerly" in caplog.text


def test_packed_linear_is_f_linear_and_follows_its_weight():
    """generate/packed.py: oneDNN's kernel on the packed copy is F.linear bit for bit in bf16 (the same kernel, less
    the rearranging) and within float32 rounding in float32 (oneDNN's summation order against MKL's); 2-D and 3-D
    inputs, with a bias; a weight changed in place is packed again; under autograd the plain F.linear runs."""
    from corral.generate.packed import PackedLinear

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 24)
    packed = PackedLinear(layer)
    for dtype in (torch.bfloat16, torch.float32):
        weight = (torch.randn(24, 48, generator=g) * 0.1).to(dtype)
        bias = torch.randn(24, generator=g).to(dtype)
        for shape in ((1, 48), (5, 48), (2, 3, 48)):
            x = torch.randn(*shape, generator=g).to(dtype)
            with torch.no_grad():
                got, want = packed.linear(x, weight, bias), F.linear(x, weight, bias)
            assert got.shape == want.shape and got.dtype == dtype
            if dtype == torch.bfloat16:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            weight.mul_(-2)  # an in-place update (an optimizer step): the next call packs the new values
            x = torch.randn(3, 48, generator=g).to(dtype)
            torch.testing.assert_close(packed.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 48, generator=g, requires_grad=True)
    with packed:  # autograd: the layer's own F.linear, and gradients reach the weight
        layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_packing_gives_linear_layers_a_forward_only_while_inside(model):
    """Entering gives each plain nn.Linear a packed forward (the same outputs), leaving takes it away, also after
    an error; a subclass of nn.Linear (bitsandbytes' 4-bit layers are) keeps its own."""
    from corral.generate.packed import PackedLinear

    class Own(torch.nn.Linear):
        pass

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), Own(8, 8)).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        want = net(x)
        packed = PackedLinear(net)
        with packed:
            assert "forward" in vars(net[0]) and "forward" not in vars(net[1])
            assert torch.equal(net(x), want)
        assert "forward" not in vars(net[0])
        with pytest.raises(KeyError), packed:
            raise KeyError("inside")
        assert "forward" not in vars(net[0])


def test_an_engine_on_packed_weights_gives_the_same_tokens(model, tiny_tokenizer, prompts):
    """pack_weights=True: prefill, eager decode steps and the output head run on packed copies (made once, when the
    engine starts), and the bf16 replies are the plain engine's, token for token (the same oneDNN kernel)."""
    import copy

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    params = SamplingParams(max_new_tokens=10, repetition_penalty=1.1)
    plain = TransformersEngine(bf16, tiny_tokenizer, stop_token_ids=()).generate(prompts, params)
    engine = TransformersEngine(bf16, tiny_tokenizer, stop_token_ids=(), pack_weights=True)
    assert engine.packs and engine._head.linear is not None
    made = dict(engine._packed._copies)
    packed = engine.generate(prompts, params)
    assert [c.token_ids for (c,) in packed] == [c.token_ids for (c,) in plain]
    linears = {id(m.weight) for m in bf16.modules() if isinstance(m, torch.nn.Linear)}
    assert set(made) == linears  # every linear weight, the head's included, packed at start
    assert all(engine._packed._copies[k][3] is made[k][3] for k in made)  # and never again
    assert not any("forward" in vars(m) for m in bf16.modules())  # the model is left as it was


def test_pack_weights_auto_packs_only_what_fits_in_half_the_free_memory(model, tiny_tokenizer, monkeypatch, caplog):
    from corral.generate.packed import packed_bytes

    need = packed_bytes(model)
    assert need == sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    free = type("Memory", (), {"available": 2 * need})
    monkeypatch.setattr("psutil.virtual_memory", lambda: free)
    assert TransformersEngine(model, tiny_tokenizer, pack_weights="auto").packs
    free.available = 2 * need - 1
    assert not TransformersEngine(model, tiny_tokenizer, pack_weights="auto").packs
    assert "pack_weights: auto leaves the weights unpacked" in caplog.text
    assert not TransformersEngine(model, tiny_tokenizer).packs  # the engine's default: off (training's rollouts)
    with pytest.raises(ValueError, match="pack_weights: 'yes' is not one of"):
        TransformersEngine(model, tiny_tokenizer, pack_weights="yes")


def test_chat_picks_its_dtype_as_serve_does(monkeypatch):
    from corral.config import ChatConfig
    from corral.recipes.serve import precision_line, serving_dtype

    monkeypatch.setattr("corral.models.load.default_device", lambda: torch.device("cpu"))
    monkeypatch.setenv("CORRAL_CPU_BF16", "1")
    assert serving_dtype(ChatConfig()) == "bfloat16"
    assert precision_line(ChatConfig(), "bfloat16") == (
        "engine transformers on cpu, weights in bfloat16 (dtype auto: this CPU computes bf16 natively)")
    monkeypatch.setenv("CORRAL_CPU_BF16", "0")
    assert serving_dtype(ChatConfig()) == "auto"


def test_a_started_engine_says_its_weights_are_packed(model, tiny_tokenizer, capsys):
    from corral.serve.models import started

    engine = started(TransformersEngine(model, tiny_tokenizer, pack_weights=True), "tiny")
    engine.close()
    assert f"tiny: linear weights packed for oneDNN (+{engine.packed_mb:.0f} MB)" in capsys.readouterr().out


def test_the_engine_names_the_cache_as_the_model_forward_does(model, tiny_tokenizer, prompts):
    """transformers 5.25 renamed the forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40):
    the engine passes whichever the model's forward takes, so a step warns of nothing."""
    import inspect
    import warnings

    engine = TransformersEngine(model, tiny_tokenizer, stop_token_ids=())
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert engine._cache_kwarg == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        (reply,) = engine.generate(prompts[:1], SamplingParams(max_new_tokens=3))
    assert len(reply[0].token_ids) == 3
