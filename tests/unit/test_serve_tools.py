"""Tool calling through the server (`tools`, `tool_choice`, streamed tool-call deltas), with the official openai client.

Forced calls (`required`, a named function) run on a real `corral serve` of the tiny random model with the
chatml template: constrained decoding makes the call well-formed and its arguments valid even for garbage
weights. What `auto` reads out of a reply cannot come from a random model, so those tests serve a scripted
engine (it "generates" a fixed text, token by token) through the same app, on a real port.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from corral.generate.types import EngineStats, Stream, TokenEvent
from tests.conftest import ServerProcess, app_in_thread

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["c", "f"]}}, "required": ["city", "days", "unit"]}  # fmt: skip
LOOKUP = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "exact": {"type": "boolean"}}, "required": ["id", "exact"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "lookup", "parameters": LOOKUP}}]
SCHEMAS = {"get_weather": WEATHER, "lookup": LOOKUP}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = ServerProcess(["--model", f"tiny={tiny_model_dir}", "--template", "chatml", "--max_tokens", "16"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def forced(client, tool_choice, **kwargs):
    return client.chat.completions.create(model="tiny", messages=kwargs.pop("messages", ASK), tools=TOOLS,
                                          tool_choice=tool_choice, temperature=0, max_tokens=120, **kwargs)


def only_call(message):
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    return call


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_is_well_formed_and_valid_against_its_schema(client, tool_choice):
    reply = forced(client, tool_choice)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = only_call(choice.message)
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_streamed_tool_call_deltas_assemble_to_the_non_streamed_call(client):
    choice = {"type": "function", "function": {"name": "lookup"}}
    whole = only_call(forced(client, choice).choices[0].message)
    # The official client's own stream assembly (ChatCompletionStreamState) over the deltas.
    with client.chat.completions.stream(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0,
                                        max_tokens=120) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    call = only_call(final.choices[0].message)
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"
    pieces = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(pieces) > 1  # the arguments streamed in fragments, as they were generated
    jsonschema.validate(json.loads(call.function.arguments), LOOKUP)


def test_two_step_agent_loop(client):
    """Send tools, get a forced call, run it here, send its result back, get an answer with tool_choice none."""
    first = forced(client, "required")
    call = only_call(first.choices[0].message)
    arguments = json.loads(call.function.arguments)
    result = {"tool": call.function.name, "echo": arguments, "forecast": "sunny"}  # "running" the tool locally
    # The reply's message object goes back as it came (the client serializes it), as agent code does.
    messages = [*ASK, first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    final = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=6)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert isinstance(answer.message.content, str)
    # The call and its result were rendered into the prompt: it is longer than the question with its tools.
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 20


def post(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 2,
                                                                 **body}, timeout=60)


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"x": {"type": "no-such-type"}}}}}]}, "tools.1.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": []}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "22C"}]},
     "messages.1.tool_call_id"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "tool", "content": "22C"}]}, "messages.1.tool_call_id"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                   {"role": "user", "content": "and?"}]}, "messages.2"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "[1]"}}]}]}, "messages.1.tool_calls.0.function.arguments"),
    ({"tools": TOOLS, "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "launch", "arguments": "{}"}}]}]}, "messages.1.tool_calls.0.function.name"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
], ids=["parameters_not_object", "parameters_bad_schema", "bad_function_name", "duplicate_name", "empty_tools",
        "unknown_named_function", "bad_tool_choice", "tool_choice_without_tools", "result_for_no_call",
        "result_without_id", "call_without_result", "arguments_not_object", "call_to_unknown_tool", "null_content",
        "json_format_with_tools"])
def test_bad_tool_requests_are_400_naming_the_field(server, body, param):
    r = post(server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_tools_on_a_template_without_a_tool_format_is_a_400(tiny_model_dir, tiny_tokenizer):
    from corral.chat.templates import get_template
    from corral.serve.protocol import APIError, ChatRequest
    from corral.serve.toolcalls import plan

    request = ChatRequest.model_validate({"model": "tiny", "messages": ASK, "tools": TOOLS})
    for name in ("vicuna_v1.1", "auto"):  # the tiny tokenizer's own chat_template renders no tools
        with pytest.raises(APIError) as refused:
            plan(request, get_template(name, tiny_tokenizer), "tiny")
        assert refused.value.status == 400 and refused.value.param == "tools"
        assert "no tool-calling format" in refused.value.message and "chatml" in refused.value.message


# ---------------------------------------------------------------------------------------------- auto, scripted
class ScriptedEngine:
    """An engine that "generates" the next scripted reply, one token (a few characters) per event."""

    max_len = 4096
    pad_id = 0

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.replies: list[str] = []

    def submit(self, prompt_ids, params, adapter=None, loop=None) -> Stream:
        text = self.replies.pop(0)
        stream = Stream(params.n, len(prompt_ids), loop)
        pieces = [text[k : k + 3] for k in range(0, len(text), 3)]
        for index in range(params.n):
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1
                stream._push(TokenEvent(index, piece, token_id=k, finish_reason="stop" if last else None))
            stream._finish_one()
        return stream

    def stats(self) -> EngineStats:
        return EngineStats(0, 0)

    def adapters(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def scripted(tiny_tokenizer):
    from corral.chat.templates import get_template
    from corral.serve.api import build_app
    from corral.serve.models import ServedModel

    engine = ScriptedEngine(tiny_tokenizer)
    app = build_app({"scripted": ServedModel("scripted", engine, get_template("chatml", tiny_tokenizer), None, 0)})
    with app_in_thread(app) as url:
        yield engine, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def scripted_ask(scripted, reply: str, stream: bool, **kwargs):
    engine, client = scripted
    engine.replies.append(reply)
    if not stream:
        return client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, **kwargs).choices[0]
    with client.chat.completions.stream(model="scripted", messages=ASK, tools=TOOLS, **kwargs) as events:
        for _ in events:
            pass
        return events.get_final_completion().choices[0]


CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "unit": "c"}}'
         '\n</tool_call>\n<tool_call>\n{"name": "lookup", "arguments": {"id": 7, "exact": true}}\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_reads_the_calls_the_model_wrote(scripted, stream):
    choice = scripted_ask(scripted, CALLS, stream)
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2, "unit": "c"}), ("lookup", {"id": 7, "exact": True})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_that_is_no_well_formed_call_stays_content(scripted, stream):
    for reply in ['I would <tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call> but no.',
                  'Call <tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # not one of the tools
                  "a < b, and <tool_ is only half a tag\n"]:
        choice = scripted_ask(scripted, reply, stream)
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert choice.message.content == reply


def test_parallel_tool_calls_false_keeps_the_first_call(scripted):
    choice = scripted_ask(scripted, CALLS, False, parallel_tool_calls=False)
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]


def test_tool_choice_none_reads_no_calls(scripted):
    choice = scripted_ask(scripted, CALLS, True, tool_choice="none")
    assert choice.finish_reason == "stop" and not choice.message.tool_calls and choice.message.content == CALLS


def test_reply_shaper_holds_back_a_partial_opening_tag(tiny_tokenizer):
    from corral.chat.templates import get_template
    from corral.serve.toolcalls import ReplyShaper, ToolPlan

    shaper = ReplyShaper(ToolPlan("auto", get_template("chatml", tiny_tokenizer), frozenset({"lookup"}), True))
    assert shaper.feed("Sure. <tool") == [{"content": "Sure."}]  # " <tool" may open a call: held
    assert shaper.feed("_c") == []
    deltas = shaper.feed('all>\n{"name": "lookup", "arguments": {"id": 1}}\n</tool_call>')
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": ""}
    assert deltas[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"id": 1}'}}]}
    assert shaper.finish() == [] and shaper.message()["content"] == "Sure."


def test_llama3_replies_are_one_json_call_or_text(tiny_tokenizer):
    from corral.chat.templates import get_template
    from corral.serve.toolcalls import ReplyShaper, ToolPlan

    def shaped(text: str, mode: str = "auto") -> dict:
        shaper = ReplyShaper(ToolPlan(mode, get_template("llama3", tiny_tokenizer), frozenset({"lookup"}), True))
        for k in range(0, len(text), 4):
            shaper.feed(text[k : k + 4])
        shaper.finish()
        return shaper.message()

    for mode in ("auto", "forced"):
        (call,) = shaped('{"name": "lookup", "parameters": {"id": 3}}', mode)["tool_calls"]
        assert call["function"] == {"name": "lookup", "arguments": '{"id": 3}'}
    assert shaped("Plain {answer}") == {"role": "assistant", "content": "Plain {answer}"}
    assert shaped('{"name": "lookup", "parameters": {"id"') == {"role": "assistant",
                                                               "content": '{"name": "lookup", "parameters": {"id"'}
