"""The OpenAI-compatible server, started for real on 127.0.0.1 and driven by the official openai client."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from tests.conftest import ServerProcess

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_lora_dir):
    votes = tmp_path_factory.mktemp("votes") / "votes.jsonl"
    proc = ServerProcess(["--model", f"tiny={tiny_model_dir}", "--model", f"tuned={tiny_lora_dir}",
                          "--api-key", KEY, "--votes", str(votes), "--max_tokens", "16"])
    proc.votes = votes
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def ask(client, content, model="tiny", **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          temperature=0, **kwargs)


def test_models_and_health(server, client):
    assert sorted(m.id for m in client.models.list()) == ["tiny", "tuned"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_chat_matches_local_engine_and_reports_usage(client, tiny_model_dir, tiny_tokenizer):
    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template
    from corral.generate.chat import with_template_stops
    from corral.generate.engine import TransformersEngine
    from corral.generate.sampling import SamplingParams
    from corral.models.load import load_model

    reply = ask(client, "Who are you?", max_tokens=12)
    template = get_template("auto", tiny_tokenizer)
    prompt = template.render(Conversation.from_pairs(("user", "Who are you?")))
    engine = TransformersEngine(load_model(str(tiny_model_dir)), tiny_tokenizer)
    (local,), = engine.generate([prompt], with_template_stops(SamplingParams(max_new_tokens=12), template))
    assert reply.choices[0].message.content == local.text
    assert reply.choices[0].finish_reason == local.finish_reason
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(local.token_ids)
    assert reply.usage.total_tokens == len(prompt) + len(local.token_ids)


def test_streaming_chat_equals_non_streaming(client):
    whole = ask(client, "Tell me about Corral.", max_tokens=16)
    chunks = list(ask(client, "Tell me about Corral.", max_tokens=16, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_completions_stream_and_not(client):
    whole = client.completions.create(model="tiny", prompt="The assistant", max_tokens=10, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The assistant", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    many = client.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=3, temperature=0.9, n=2, seed=1)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]


def test_stop_strings_and_n_with_seed(client):
    base = ask(client, "Hello there", max_tokens=16).choices[0].message.content
    assert len(base) > 4
    stop = base[2:4]
    cut = ask(client, "Hello there", max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    a = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=3, seed=7,
                                       temperature=1.0, max_tokens=8)
    b = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=3, seed=7,
                                       temperature=1.0, max_tokens=8)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 3


def test_lora_adapter_served_beside_its_base(client, tiny_lora_dir, tiny_tokenizer):
    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template
    from corral.generate.chat import with_template_stops
    from corral.generate.engine import TransformersEngine
    from corral.generate.sampling import SamplingParams
    from corral.models.load import load_model

    tuned = ask(client, "Who are you?", model="tuned", max_tokens=12).choices[0].message.content
    base = ask(client, "Who are you?", model="tiny", max_tokens=12).choices[0].message.content
    template = get_template("auto", tiny_tokenizer)
    engine = TransformersEngine(load_model(str(tiny_lora_dir)), tiny_tokenizer)
    prompt = template.render(Conversation.from_pairs(("user", "Who are you?")))
    (local,), = engine.generate([prompt], with_template_stops(SamplingParams(max_new_tokens=12), template))
    assert tuned == local.text != base


def test_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", top_p=0)
    assert e.value.status_code == 400 and e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "hi", model="nope")
    assert e.value.body["code"] == "model_not_found"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    missing = httpx.get(server.url + "/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": KEY}).status_code == 401  # no scheme
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_a_sampling_value_the_engine_refuses_is_a_400_naming_it(client):
    # Within the wire format's limits but out of the sampler's: its SamplingError names the field.
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", seed=2**64)
    assert e.value.status_code == 400 and e.value.body["param"] == "seed"
    assert e.value.body["message"].startswith("seed: ")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, n=2, seed=2**64 - 1)
    assert e.value.body["param"] == "seed"


def test_the_handlers_answer_without_http(tiny_model_dir, tiny_tokenizer):
    """`serve/serving.py` is plain async functions: called here directly, on an engine in this process."""
    import asyncio
    from dataclasses import replace

    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template
    from corral.generate.chat import generate_replies
    from corral.generate.engine import TransformersEngine
    from corral.generate.sampling import SamplingParams
    from corral.models.load import load_model
    from corral.serve import serving
    from corral.serve.models import ServedModel
    from corral.serve.protocol import APIError, ChatRequest

    template = get_template("auto", tiny_tokenizer)
    engine = TransformersEngine(load_model(str(tiny_model_dir)), tiny_tokenizer)
    (expected,) = generate_replies(engine, template, [Conversation.from_pairs(("user", "Who are you?"))],
                                   SamplingParams(max_new_tokens=8))
    state = serving.Serving({"tiny": ServedModel("tiny", engine.start(), template, None, 0)})
    req = ChatRequest(model="tiny", messages=[{"role": "user", "content": "Who are you?"}], temperature=0, max_tokens=8)

    async def answers():
        whole = await serving.chat_completions(state, req)
        chunks = await serving.chat_completions(state, req.model_copy(update={"stream": True}))
        streamed = [c async for c in chunks.bodies]
        return whole, "".join(c["choices"][0]["delta"].get("content", "") for c in streamed if c["choices"])

    try:
        whole, streamed = asyncio.run(answers())
        with pytest.raises(APIError) as e:
            no_default = replace(state, limits=serving.Limits(default_max_tokens=0))  # no max_tokens: 0 tokens
            asyncio.run(serving.chat_completions(no_default, req.model_copy(update={"max_tokens": None})))
    finally:
        engine.close()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"].strip() == expected
    assert streamed == whole["choices"][0]["message"]["content"]
    assert e.value.status == 400 and e.value.param == "max_tokens"  # the engine's max_new_tokens, by its wire name
    assert [m["id"] for m in serving.list_models(state)["data"]] == ["tiny"]


def test_32_concurrent_streams_all_complete_with_single_request_outputs(client):
    prompts = [f"Question number {i}: {'why ' * (i % 7)}?" for i in range(32)]
    alone = [ask(client, p, max_tokens=12).choices[0].message.content for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(32)

    def one(i):
        try:
            start.wait()
            stream = ask(client, prompts[i], max_tokens=12, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 32
    assert [results[i] for i in range(32)] == alone


def test_arena_vote_is_appended(server):
    vote = {"prompt": "p", "model_a": "tiny", "model_b": "tuned", "reply_a": "ra", "reply_b": "rb", "vote": "b"}
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(server.url + "/v1/arena/vote", json=vote, headers=headers).status_code == 200
    assert httpx.post(server.url + "/v1/arena/vote", json={**vote, "vote": "maybe"}, headers=headers).status_code == 400
    forged = httpx.post(server.url + "/v1/arena/vote", json={**vote, "model_a": "gpt-9"}, headers=headers)
    assert forged.status_code == 400 and forged.json()["error"]["param"] == "model_a"
    assert httpx.post(server.url + "/v1/arena/vote", json={**vote, "vote": "tie"}, headers=headers).status_code == 200
    record, tie = [json.loads(line) for line in server.votes.read_text().splitlines()]
    assert tie["vote"] == "tie" and tie["chosen"] is None and tie["replies"] == {"a": "ra", "b": "rb"}
    assert record["chosen"] == "rb" and record["rejected"] == "ra"
    assert record["models"] == {"chosen": "tuned", "rejected": "tiny"} and record["prompt"] == "p"


# ---------------------------------------------------------------------------------------------- logprobs
def forward_logprobs(model_dir, prompt_ids, reply_ids):
    import torch

    from corral.models.load import load_model

    model = load_model(str(model_dir))
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + reply_ids])).logits[0, len(prompt_ids) - 1:-1].float()
    return logits.log_softmax(-1)


def greedy_ids(model_dir, tokenizer, prompt_ids, max_new_tokens, template=None):
    """The reply ids the server's greedy decode produces (the same engine, in this process)."""
    from corral.generate.chat import with_template_stops
    from corral.generate.engine import TransformersEngine
    from corral.generate.sampling import SamplingParams
    from corral.models.load import load_model

    params = SamplingParams(max_new_tokens=max_new_tokens)
    params = with_template_stops(params, template) if template else params
    ((choice,),) = TransformersEngine(load_model(str(model_dir)), tokenizer).generate([prompt_ids], params)
    return choice.token_ids


def test_chat_logprobs_match_a_forward_pass_streamed_or_not(client, tiny_model_dir, tiny_tokenizer):
    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template

    reply = ask(client, "Who are you?", max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    template = get_template("auto", tiny_tokenizer)
    prompt = template.render(Conversation.from_pairs(("user", "Who are you?")))
    reply_ids = greedy_ids(tiny_model_dir, tiny_tokenizer, prompt, 6, template)
    reply_ids = reply_ids[:len(content)]  # a stop token has no entry
    assert [e.token for e in content] == [tiny_tokenizer.decode([i]) for i in reply_ids]
    expected = forward_logprobs(tiny_model_dir, prompt, reply_ids)
    for i, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(expected[i, reply_ids[i]]), abs=1e-4)
        top = expected[i].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tiny_tokenizer.decode([j]) for j in top.indices.tolist()]
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    chunks = list(ask(client, "Who are you?", max_tokens=6, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_completion_logprobs_are_openais_legacy_layout(client, tiny_model_dir, tiny_tokenizer):
    whole = client.completions.create(model="tiny", prompt="The assistant", max_tokens=5, temperature=0, logprobs=2)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text and len(lp.token_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    prompt = tiny_tokenizer("The assistant")["input_ids"]
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny", prompt="The assistant", max_tokens=5, temperature=0, logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs]  # fmt: skip
    assert [s.token_logprobs[0] for s in streamed] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [s.text_offset[0] for s in streamed] == lp.text_offset
    reply_ids = greedy_ids(tiny_model_dir, tiny_tokenizer, prompt, 5)
    assert lp.tokens == [tiny_tokenizer.decode([i]) for i in reply_ids]
    expected = forward_logprobs(tiny_model_dir, prompt, reply_ids)
    assert lp.token_logprobs == pytest.approx([float(expected[i, t]) for i, t in enumerate(reply_ids)], abs=1e-4)


# ---------------------------------------------------------------------------------------------- structured outputs
def test_json_schema_replies_validate_while_free_requests_share_the_batch(client):
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["answer", "tags", "meta"],
              "properties": {"answer": {"enum": ["yes", "no"]},
                             "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
                             "meta": {"type": "object", "required": ["n"], "additionalProperties": False,
                                      "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}  # fmt: skip
    free_alone = ask(client, "Question?", max_tokens=12).choices[0].message.content
    results, errors = {}, []

    def constrained(i):
        try:
            results[i] = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Answer {i}"}], max_tokens=120, temperature=1.0,
                seed=i, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def free():
        try:
            results["free"] = ask(client, "Question?", max_tokens=12).choices[0].message.content
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=constrained, args=(i,)) for i in range(3)] + [threading.Thread(target=free)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for i in range(3):
        choice = results[i].choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert results["free"] == free_alone


def test_metrics_count_the_tokens_a_reply_reports(server, client):
    headers = {"Authorization": f"Bearer {KEY}"}

    def counters():
        text = httpx.get(server.url + "/metrics", headers=headers).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    assert httpx.get(server.url + "/metrics").status_code == 401
    before = counters()
    reply = ask(client, "Count me", max_tokens=7)
    after = counters()
    assert after["corral:prompt_tokens_total"] - before["corral:prompt_tokens_total"] == reply.usage.prompt_tokens
    assert after["corral:generation_tokens_total"] - before["corral:generation_tokens_total"] == reply.usage.completion_tokens
    assert after["corral:e2e_request_latency_seconds_count"] == before["corral:e2e_request_latency_seconds_count"] + 1
    label = f'corral:request_success_total{{finished_reason="{reply.choices[0].finish_reason}"}}'
    assert after[label] == before.get(label, 0) + 1
    ok = 'corral:http_requests_total{method="POST",path="/v1/chat/completions",status="200"}'
    assert after[ok] == before.get(ok, 0) + 1
    assert after["corral:num_requests_running"] == 0 and after["corral:num_requests_waiting"] == 0
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # with a key: no model names
