"""Tool calling in data, templates and masks: readers for OpenAI and ShareGPT (LLaMA-Factory) tool records and
their errors, the exact renderings of chatml (Hermes/Qwen2.5), llama3 (Llama 3.1 JSON) and auto (a Qwen2.5-like
chat_template), which tokens are trained, the prefix property, the exported Jinja, parsing replies back into
calls, and the call body's JSON schema."""

import json

import jsonschema
import pytest

from corral.chat.conversation import Conversation, Message, ToolCall
from corral.chat.templates import IGNORE_INDEX, TEMPLATES, TemplateError, get_template
from corral.chat.tools import (
    ParsedReply, ToolError, call_body_schema, call_prefix, call_suffix, check_tools, parse_tool_calls, tool_style,
)
from corral.data.formats import DataError, read_conversations

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.", '
                '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')
TIME_JSON = WEATHER_JSON.replace("get_weather", "get_time").replace("Current weather", "Local time")
HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    f"signatures within <tools></tools> XML tags:\n<tools>\n{WEATHER_JSON}\n{TIME_JSON}\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
FINAL = "Sunny, 18°C; it is 14:05."


def two_step(system: str | None = "Be brief.", text: str = "Now the time.", ids=("call_1", "call_2")) -> Conversation:
    """Call, result, a second call (with `text`), its result, the answer."""
    messages = [Message("system", system)] if system is not None else []
    return Conversation(messages + [
        Message("user", "Weather in Paris, and the time?"),
        Message("assistant", "", [ToolCall(ids[0], "get_weather", {"city": "Paris"})]),
        Message("tool", "18°C, sunny", tool_call_id=ids[0]),
        Message("assistant", text, [ToolCall(ids[1], "get_time", {"city": "Paris"})]),
        Message("tool", "14:05", tool_call_id=ids[1]),
        Message("assistant", FINAL),
    ], tools=[WEATHER, TIME])  # fmt: skip


def llama3_two_step(system: str | None = "Be brief.") -> Conversation:
    return two_step(system, text="")  # llama3 writes one call and nothing else per turn


def parallel() -> Conversation:
    return Conversation([
        Message("user", "Weather and time in Paris?"),
        Message("assistant", "Checking both.", [ToolCall("call_1", "get_weather", {"city": "Paris"}),
                                                ToolCall("call_2", "get_time", {"city": "Paris"})]),
        Message("tool", "18°C, sunny", tool_call_id="call_1"),
        Message("tool", "14:05", tool_call_id="call_2"),
        Message("assistant", FINAL),
    ], tools=[WEATHER, TIME])  # fmt: skip


# A Qwen2.5-style chat_template (its tool handling verbatim; its default system prompt is this test model's).
QWEN25 = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a tiny test model.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# Llama 3.1's tool handling (its chat_template, shortened: no builtin tools, a fixed date).
LLAMA31 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools %}{%- set first_user_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON "
    "for a function call with its proper arguments that best answers the given prompt.\\n\\n' }}"
    "{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}"
    "{{- 'Do not use variables.\\n\\n' }}{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}{%- if not message.tool_calls | length == 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set tool_call = message.tool_calls[0].function %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}{{- '}' }}"
    "{{- '<|eot_id|>' }}{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = QWEN25
    return tok


def trained_texts(tokenizer, labels: list[int]) -> list[str]:
    spans, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


CHATML_TWO_STEP = (
    f"<|im_start|>system\nBe brief.\n\n{HERMES_TOOLS}<|im_end|>\n<|im_start|>user\nWeather in Paris, and the time?"
    '<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response><|im_end|>\n"
    '<|im_start|>assistant\nNow the time.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n'
    "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n14:05\n</tool_response><|im_end|>\n"
    f"<|im_start|>assistant\n{FINAL}<|im_end|>\n"
)
LLAMA3_TOOLS = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    'best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
    + "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in (WEATHER, TIME))
)
LLAMA3_TWO_STEP = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
    f"<|end_header_id|>\n\n{LLAMA3_TOOLS}Weather in Paris, and the time?<|eot_id|><|start_header_id|>assistant"
    '<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|><|start_header_id|>ipython'
    "<|end_header_id|>\n\n18°C, sunny<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    '{"name": "get_time", "parameters": {"city": "Paris"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n'
    f"14:05<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{FINAL}<|eot_id|>"
)


def test_chatml_renders_hermes_tools_calls_and_results_exactly(tiny_tokenizer):
    fmt = get_template("chatml", tiny_tokenizer)
    assert fmt.render_text(two_step(), add_generation_prompt=False) == CHATML_TWO_STEP
    # No system message: a system turn holding only the tools. Parallel calls: one block each, results in one turn.
    text = fmt.render_text(parallel(), add_generation_prompt=False)
    assert text == (
        f"<|im_start|>system\n{HERMES_TOOLS}<|im_end|>\n<|im_start|>user\nWeather and time in Paris?<|im_end|>\n"
        '<|im_start|>assistant\nChecking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response>\n<tool_response>\n14:05\n</tool_response>"
        f"<|im_end|>\n<|im_start|>assistant\n{FINAL}<|im_end|>\n"
    )


def test_llama3_renders_json_calls_and_ipython_results_exactly(tiny_tokenizer):
    fmt = get_template("llama3", tiny_tokenizer)
    assert fmt.render_text(llama3_two_step(), add_generation_prompt=False) == LLAMA3_TWO_STEP
    with pytest.raises(TemplateError, match="message 1: template 'llama3' writes one tool call per assistant turn .*"
                                            "2 parallel calls; use template=chatml"):
        fmt.render_with_masks(parallel())
    with pytest.raises(TemplateError, match="this turn has text and a call"):
        fmt.render_with_masks(two_step())


def test_auto_with_a_tool_capable_template_renders_as_qwen_does(qwen_tokenizer):
    fmt = get_template("auto", qwen_tokenizer)
    assert tool_style(fmt) == "auto-tools"
    assert fmt.render_text(two_step(), add_generation_prompt=False) == CHATML_TWO_STEP
    assert (call_prefix(fmt), call_suffix(fmt)) == ("<tool_call>\n", "\n</tool_call>")  # learned from a probe
    assert fmt.tool_wire.separator == "\n" and fmt.tool_wire.key == "arguments"


def test_auto_learns_llama31_bare_json_calls(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = LLAMA31
    fmt = get_template("auto", tok)
    wire = fmt.tool_wire
    assert (wire.prefix, wire.suffix, wire.key, wire.separator) == ("", "", "parameters", None)
    _, labels = fmt.render_with_masks(llama3_two_step())
    assert trained_texts(tok, labels) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        '{"name": "get_time", "parameters": {"city": "Paris"}}<|eot_id|>', f"{FINAL}<|eot_id|>"]  # fmt: skip
    reply = parse_tool_calls(fmt, '{"name": "get_time", "parameters": {"city": "Rome"}}')
    assert [(c.name, c.arguments) for c in reply.calls] == [("get_time", {"city": "Rome"})]
    with pytest.raises(TemplateError, match="chat_template refuses this conversation's tool use: .*single tool-calls"):
        fmt.render_with_masks(parallel())


@pytest.mark.parametrize("name", ["chatml", "llama3", "auto"])
def test_masks_train_calls_and_replies_only(tiny_tokenizer, qwen_tokenizer, name):
    tok = qwen_tokenizer if name == "auto" else tiny_tokenizer
    fmt = get_template(name, tok)
    conv = llama3_two_step() if name == "llama3" else two_step()
    _, labels = fmt.render_with_masks(conv)
    if name == "llama3":
        assert trained_texts(tok, labels) == [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
            '{"name": "get_time", "parameters": {"city": "Paris"}}<|eot_id|>', f"{FINAL}<|eot_id|>"]
    else:  # definitions, results, system and user text: none of it trained
        assert trained_texts(tok, labels) == [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
            'Now the time.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
            f"{FINAL}<|im_end|>"]  # fmt: skip


@pytest.mark.parametrize("name", ["chatml", "llama3", "auto"])
def test_prompt_before_each_reply_is_a_token_prefix_with_tools(tiny_tokenizer, qwen_tokenizer, name):
    fmt = get_template(name, qwen_tokenizer if name == "auto" else tiny_tokenizer)
    convs = [llama3_two_step(), llama3_two_step(None)] if name == "llama3" else [two_step(), two_step(None), parallel()]
    for conv in convs:
        ids, labels = fmt.render_with_masks(conv)
        replies = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
        for i in replies:
            prompt_ids = fmt.render(Conversation(conv.messages[:i], tools=conv.tools))
            assert ids[: len(prompt_ids)] == prompt_ids, f"{name}: the prompt before message {i} is not a prefix"
            assert labels[len(prompt_ids)] != IGNORE_INDEX and labels[len(prompt_ids) - 1] == IGNORE_INDEX


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_exported_jinja_renders_tools_as_corral_does(tiny_tokenizer, name):
    fmt = get_template(name, tiny_tokenizer)
    convs = [llama3_two_step(), llama3_two_step(None)] if name == "llama3" else [two_step(), two_step(None), parallel()]
    for conv in convs:
        for messages in (conv.to_hf(), conv.to_openai()):  # arguments as dicts (HF) or JSON strings (OpenAI)
            text = tiny_tokenizer.apply_chat_template(messages, tools=conv.tools, chat_template=fmt.chat_template_jinja,
                                                      tokenize=False)  # fmt: skip
            assert text == fmt.render_text(conv, add_generation_prompt=False)
        prompt = Conversation(conv.messages[:-1], tools=conv.tools)  # ends with a tool result
        text = tiny_tokenizer.apply_chat_template(prompt.to_hf(), tools=prompt.tools, tokenize=False,
                                                  chat_template=fmt.chat_template_jinja, add_generation_prompt=True)
        assert text == fmt.render_text(prompt, add_generation_prompt=True)


@pytest.mark.parametrize("name", [n for n in TEMPLATES if TEMPLATES[n].tools is None])
def test_templates_without_tools_refuse_them_by_name(tiny_tokenizer, name):
    assert tool_style(name) is None
    with pytest.raises(TemplateError, match=f"template '{name}' cannot carry tool definitions, calls or results: "
                                            "use template=chatml"):
        get_template(name, tiny_tokenizer).render_with_masks(two_step())


def test_auto_refuses_tools_when_the_tokenizer_template_has_none(tiny_tokenizer):
    fmt = get_template("auto", tiny_tokenizer)
    assert tool_style(fmt) is None and parse_tool_calls(fmt, "<tool_call>x") == ParsedReply("<tool_call>x", [])
    with pytest.raises(TemplateError, match="chat_template does not render tools.*use template=chatml"):
        fmt.render_with_masks(two_step())
    with pytest.raises(ToolError, match="template 'auto' has no tool-call format"):
        call_prefix(fmt)


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_tool_calls_per_style(tiny_tokenizer):
    chatml, llama3 = get_template("chatml", tiny_tokenizer), get_template("llama3", tiny_tokenizer)
    one = parse_tool_calls(chatml, CALL)
    assert one.content == "" and [(c.name, c.arguments) for c in one.calls] == [("get_weather", {"city": "Paris"})]
    assert len(one.calls[0].id) == len("call_") + 24 and int(one.calls[0].id[5:], 16) >= 0
    two = parse_tool_calls(chatml, "Checking.\n" + CALL + "\n" + CALL.replace("get_weather", "get_time"))
    assert two.content == "Checking." and [c.name for c in two.calls] == ["get_weather", "get_time"]
    assert two.calls[0].id != two.calls[1].id
    unclosed = parse_tool_calls(chatml, CALL.removesuffix("\n</tool_call>"))  # stopped before the closing tag
    assert [c.name for c in unclosed.calls] == ["get_weather"]
    malformed = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    assert parse_tool_calls(chatml, malformed) == ParsedReply(malformed, [])
    wrong_shape = '<tool_call>\n{"function": "get_weather"}\n</tool_call>'  # valid JSON, not a call
    assert parse_tool_calls(chatml, wrong_shape) == ParsedReply(wrong_shape, [])
    assert parse_tool_calls(chatml, "Just text.") == ParsedReply("Just text.", [])
    ok = parse_tool_calls(llama3, ' {"name": "get_time", "parameters": {"city": "Rome"}, "id": "call_x"}')
    assert [(c.id, c.name, c.arguments) for c in ok.calls] == [("call_x", "get_time", {"city": "Rome"})]
    for text in ('{"name": "get_time", "parameters": [1]}', 'The answer is {"name": 1}', '{"name": "f", "param'):
        assert parse_tool_calls(llama3, text) == ParsedReply(text, [])
    # What rendering writes, parsing reads back.
    conv = parallel()
    reply = get_template("chatml", tiny_tokenizer).render_text(Conversation(conv.messages[:2], tools=conv.tools),
                                                               add_generation_prompt=False)  # fmt: skip
    body = reply.split("<|im_start|>assistant\n")[1].removesuffix("<|im_end|>\n")
    back = parse_tool_calls(chatml, body)
    assert back.content == "Checking both." and [(c.name, c.arguments) for c in back.calls] == [
        (c.name, c.arguments) for c in conv.messages[1].tool_calls]


def test_call_body_schema_accepts_a_right_call_and_rejects_a_wrong_one(tiny_tokenizer):
    tools = [WEATHER, TIME]
    hermes = call_body_schema([WEATHER, TIME], None)
    assert hermes == call_body_schema(get_template("chatml", tiny_tokenizer), tools)
    jsonschema.validate({"name": "get_time", "arguments": {"city": "Paris"}}, hermes)
    for wrong in ({"name": "get_time", "arguments": {}}, {"name": "nope", "arguments": {"city": "Paris"}},
                  {"name": "get_time", "parameters": {"city": "Paris"}}):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, hermes)
    named = call_body_schema("llama3", tools, "get_weather")
    assert list(named["properties"]) == ["name", "parameters"]
    jsonschema.validate({"name": "get_weather", "parameters": {"city": "Paris"}}, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "parameters": {"city": "Paris"}}, named)
    # The body rendering writes is valid under the schema, between the prefix and suffix the server constrains with.
    chatml = get_template("chatml", tiny_tokenizer)
    body = CALL.removeprefix(call_prefix(chatml)).removesuffix(call_suffix(chatml))
    jsonschema.validate(json.loads(body), call_body_schema(chatml, tools, "get_weather"))
    with pytest.raises(ToolError, match="no tool named 'nope'"):
        call_body_schema(chatml, tools, "nope")


@pytest.mark.parametrize("name, body", [
    ("chatml", '{"name": "get_time", "arguments": {"city": "Paris"}}'),
    ("llama3", '{"name": "get_time", "parameters": {"city": "Paris"}}')])  # fmt: skip
def test_the_servers_grammar_for_a_call_body_accepts_exactly_what_training_writes(tiny_tokenizer, name, body):
    """The server constrains a call's body with xgrammar (generate/structured.py, compact spacing): the body
    training renders must be a path through that grammar, and other spacing must not be."""
    from corral.generate.structured import Grammars, ResponseFormat

    fmt = get_template(name, tiny_tokenizer)
    call = Message("assistant", "", [ToolCall("call_1", "get_time", {"city": "Paris"})])
    rendered = fmt.render_text(Conversation([Message("user", "Time?"), call], tools=[WEATHER, TIME]), False)
    assert call_prefix(fmt) + body + call_suffix(fmt) in rendered
    grammars = Grammars(tiny_tokenizer, len(tiny_tokenizer))
    schema = ResponseFormat.json_schema(call_body_schema(fmt, [WEATHER, TIME]))
    for text, accepted in ((body, True), (body.replace(": ", ":"), False)):
        matcher = grammars.matcher(schema, frozenset(fmt.stop_token_ids))
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(matcher.accept_token(t) for t in ids) == accepted
        if accepted:  # complete: only the end-of-turn may follow
            assert matcher.accept_token(fmt.stop_token_ids[-1]) and matcher.is_terminated()


def test_check_tools_names_the_field(tiny_tokenizer):
    conv = two_step()
    check_tools(conv, "req")
    unknown = Conversation(conv.messages[:3], tools=[TIME])
    with pytest.raises(ToolError, match=r"^req: field 'messages\[2\].tool_calls\[0\].function.name': 'get_weather' "
                                        r"is not one of the tools \(get_time\)"):
        check_tools(unknown, "req")
    no_id = Conversation(conv.messages[:3] + [Message("tool", "18°C")], tools=conv.tools)
    check_tools(no_id)  # one call open: the result answers it
    unanswered = Conversation(conv.messages[:3] + [Message("user", "Well?")], tools=conv.tools)
    with pytest.raises(ToolError, match=r"field 'messages\[3\]': call 'call_1' \(messages\[2\].tool_calls\[0\]\) "
                                        "has no result"):
        check_tools(unanswered)
    with pytest.raises(TemplateError, match="chats.jsonl:3: field 'messages\\[4\\].tool_call_id': call 'call_1' was "
                                            "already answered"):
        again = Message("tool", "again", tool_call_id="call_1")
        bad = Conversation(conv.messages[:4] + [again], source="chats.jsonl:3", tools=conv.tools)
        get_template("chatml", tiny_tokenizer).render(bad)


# ------------------------------------------------------------------------------------------------- readers
OPENAI_RECORD = {"id": "w1", "tools": [WEATHER, TIME], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
    {"role": "assistant", "content": "Now the time.", "tool_calls": [
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    {"role": "assistant", "content": FINAL}]}  # fmt: skip
SHAREGPT_RECORD = {"system": "Be brief.", "tools": json.dumps([WEATHER["function"], TIME]), "conversations": [
    {"from": "human", "value": "Weather in Paris, and the time?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": "18°C, sunny"},
    {"from": "gpt", "value": "Now the time."},  # the text a function_call right after it comes with
    {"from": "function_call", "value": {"name": "get_time", "arguments": '{"city": "Paris"}'}},
    {"from": "observation", "value": "14:05"},
    {"from": "gpt", "value": FINAL}]}  # fmt: skip


def write(path, *records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def without_ids(conv: Conversation) -> list[tuple]:
    return [(m.role, m.content, [(c.name, c.arguments) for c in m.tool_calls]) for m in conv.messages]


def test_readers_take_openai_and_sharegpt_tool_records(tmp_path, tiny_tokenizer):
    (oa, sg), report = read_conversations(write(tmp_path / "chats.jsonl", OPENAI_RECORD, SHAREGPT_RECORD))
    assert report.kept == 2 and not report.unused
    assert oa.tools == [WEATHER, TIME] and sg.tools == [WEATHER, TIME]  # bare functions normalised
    assert without_ids(oa) == without_ids(sg) == without_ids(two_step())
    assert [m.tool_call_id for m in oa.messages if m.role == "tool"] == ["call_1", "call_2"]
    # ShareGPT's results get the ids of the calls they answer.
    assert [m.tool_call_id for m in sg.messages if m.role == "tool"] == [
        m.tool_calls[0].id for m in sg.messages if m.tool_calls]
    assert get_template("chatml", tiny_tokenizer).render_text(oa, add_generation_prompt=False) == CHATML_TWO_STEP
    # Both writers round-trip, ids and all.
    back, _ = read_conversations(write(tmp_path / "back.jsonl", {"messages": oa.to_openai(), "tools": oa.tools},
                                       sg.to_sharegpt(), parallel().to_sharegpt()))  # fmt: skip
    assert back[0].messages == oa.messages and back[1].messages == sg.messages and back[1].tools == sg.tools
    assert back[2].messages == parallel().messages


BAD_RECORDS = [
    ("openai arguments", OPENAI_RECORD,
     lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city"),
     "field 'messages[2].tool_calls[0].function.arguments': not JSON"),
    ("openai no call", OPENAI_RECORD, lambda r: r["messages"][3].update(tool_call_id="call_9"),
     "field 'messages[3].tool_call_id': no call 'call_9' was made before this result"),
    ("openai unknown", OPENAI_RECORD, lambda r: r["messages"][4]["tool_calls"][0]["function"].update(name="get_date"),
     "field 'messages[4].tool_calls[0].function.name': 'get_date' is not one of the tools (get_time, get_weather)"),
    ("openai twice", OPENAI_RECORD, lambda r: r["messages"].insert(4, dict(r["messages"][3])),
     "field 'messages[4].tool_call_id': call 'call_1' was already answered (by messages[3])"),
    ("sharegpt arguments", SHAREGPT_RECORD, lambda r: r["conversations"][1].update(value='{"name": "get_weather", '
                                                                                        '"arguments": "{city"}'),
     "field 'conversations[1].value.arguments': not JSON"),
    ("sharegpt no call", SHAREGPT_RECORD, lambda r: r["conversations"].insert(3, {"from": "observation", "value": "?"}),
     "field 'conversations[3]': an observation with no unanswered function_call before it"),
    ("sharegpt unknown", SHAREGPT_RECORD, lambda r: r["conversations"][4].update(value={"name": "get_date"}),
     "field 'conversations[4].value.name': 'get_date' is not one of the tools (get_time, get_weather)"),
    ("sharegpt twice", SHAREGPT_RECORD, lambda r: [t.update(value={"id": "c1", "name": "get_time"}) for t in
                                                   (r["conversations"][1], r["conversations"][4])],
     "field 'conversations[4].value.id': call id 'c1' is used twice"),
]  # fmt: skip


@pytest.mark.parametrize("name, record, spoil, message", BAD_RECORDS, ids=[case[0] for case in BAD_RECORDS])
def test_bad_tool_records_name_file_line_and_field(tmp_path, name, record, spoil, message):
    bad = json.loads(json.dumps(record))
    spoil(bad)
    path = write(tmp_path / "chats.jsonl", record, bad)
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:2: {message}")
    convs, report = read_conversations(path, skip_invalid=True)  # the same machinery as every other bad record
    assert len(convs) == 1 and report.summary().count(message) == 1


def test_long_tool_conversations_split_between_exchanges_never_inside_one(tiny_tokenizer):
    from corral.data.clean import conversations_to_samples

    fmt = get_template("chatml", tiny_tokenizer)
    first, again = two_step(None), two_step(None, ids=("call_3", "call_4"))
    conv = Conversation(first.messages + again.messages, tools=first.tools)
    whole = len(fmt.render_with_masks(conv)[0])
    samples, report = conversations_to_samples([conv], fmt, whole - 5)
    assert report.split == 1 and len(samples) == 2
    piece_ids = fmt.render_with_masks(Conversation(first.messages, tools=first.tools))[0]
    assert samples[0].input_ids == piece_ids  # the first exchange whole: call, result, call, result, answer


def test_data_inspect_shows_tool_turns_with_trained_highlighting(tmp_path, tiny_model_dir, tiny_tokenizer, capsys,
                                                                 monkeypatch):
    from corral.cli import main
    from corral.data.clean import conversations_to_samples
    from corral.recipes.data import highlight

    path = write(tmp_path / "chats.jsonl", OPENAI_RECORD, SHAREGPT_RECORD, {"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})  # fmt: skip
    monkeypatch.setenv("COLUMNS", "1000")  # one line per line: rich wraps at the terminal's width
    assert main(["data", "inspect", path, "--model", str(tiny_model_dir), "--template", "chatml",
                 "--max_len", "2048"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert ("tool use: 2 of 3 conversations, 4 calls (0 turns with parallel calls), 4 results; functions defined: "
            "get_weather (2 calls), get_time (2 calls)") in out
    assert "<tool_response>\n18°C, sunny\n</tool_response>" in out and '{"name": "get_time", "arguments"' in out
    (sample,), _ = conversations_to_samples([two_step()], get_template("chatml", tiny_tokenizer), 4096)
    text = highlight(tiny_tokenizer, sample.input_ids, sample.targets)
    green = [text.plain[span.start : span.end] for span in text.spans if span.style == "bold green"]
    assert "".join(green) == "".join(trained_texts(tiny_tokenizer, [IGNORE_INDEX] + sample.targets[:-1]))
    assert "".join(green).startswith("<tool_call>") and "18°C, sunny" in text.plain and "Current weather" in text.plain
    assert not any("18°C, sunny" in piece or "Current weather" in piece for piece in green)  # results, definitions
