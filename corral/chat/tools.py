"""Tool calling: how each template writes tool definitions, calls and results, and how a reply's calls are read back.

A template carries tools in one *style*: `hermes` (chatml: Hermes / Qwen2.5 `<tool_call>` blocks, several per
reply), `llama3` (Llama 3.1's JSON tool calling: the reply is one bare `{"name", "parameters"}` object), or
`auto-tools` (template=auto on a tokenizer whose own chat template renders `tools=`; its call wrapper is
learned by rendering a probe call). Rendering (templates.py), parsing (`parse_tool_calls`) and constrained
decoding (`call_prefix` + a JSON body valid under `call_body_schema` + `call_suffix`) all use the one `Wire`
of a style, so what the server constrains a model to write is byte for byte what SFT trained it on.

A call's JSON body is `json.dumps({"name": ..., <key>: arguments}, ensure_ascii=False)` with json's default
separators (", " and ": "), which is what transformers' `tojson` filter writes in Qwen's and Llama's templates.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from corral.chat.conversation import Conversation, ToolCall


class ToolError(ValueError):
    """Tool definitions, calls or results that do not fit together; the message names where and the field."""


@dataclass(frozen=True)
class Wire:
    """How one style writes a call: `prefix` + JSON body + `suffix`, the body's arguments under `key`;
    `separator` between parallel calls (None: one call per reply), `after_content` between text and the calls."""

    prefix: str
    suffix: str
    key: str
    separator: str | None = "\n"
    after_content: str = "\n"


WIRES = {
    "hermes": Wire("<tool_call>\n", "\n</tool_call>", "arguments"),
    "llama3": Wire("", "", "parameters", separator=None, after_content=""),
}

# Qwen2.5's system text (its chat template's words), with the definitions one JSON object a line in between.
HERMES_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
# Llama 3.1's words for custom tools in the first user message (its chat template, tools_in_user_message).
LLAMA3_TOOLS_HEAD = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


@dataclass(frozen=True)
class ToolFormat:
    """Where and how a registered template writes tool definitions and results, beside its Wire.

    The definitions: `head`, then for each tool `before` + its JSON (indented by `indent`) + `after`, then
    `tail`; placed in the system message after the system prompt and `system_join` (`place="system"`), or
    before the first user message's text (`place="first_user"`). A run of consecutive results renders as
    `result_open`, each result in `result` (`{content}` is its text), then `result_close`. templates.py
    renders from these and exports them as Jinja, so both agree."""

    wire: Wire
    place: str
    head: str
    tail: str = ""
    before: str = ""
    after: str = ""
    indent: int | None = None
    system_join: str = "\n\n"
    result_open: str = ""
    result: str = "{content}"
    result_close: str = ""


TOOL_FORMATS = {
    "hermes": ToolFormat(WIRES["hermes"], "system", HERMES_TOOLS_HEAD, HERMES_TOOLS_TAIL, before="\n",
                         result_open="<|im_start|>user", result="\n<tool_response>\n{content}\n</tool_response>",
                         result_close="<|im_end|>\n"),
    "llama3": ToolFormat(WIRES["llama3"], "first_user", LLAMA3_TOOLS_HEAD, after="\n\n", indent=4,
                         result="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"),
}  # fmt: skip


def dumps(value) -> str:
    """JSON as every template here writes it (transformers' `tojson`): non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False)


def new_call_id() -> str:
    """A call id in OpenAI's form: `call_` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


def tools_text(style: ToolFormat, tools: list[dict]) -> str:
    """The tool definitions as a registered template writes them."""
    return style.head + "".join(style.before + json.dumps(tool, ensure_ascii=False, indent=style.indent) + style.after
                                for tool in tools) + style.tail  # fmt: skip


def render_call(wire: Wire, call: ToolCall) -> str:
    """One call as the model writes it: prefix, JSON body, suffix."""
    return wire.prefix + dumps({"name": call.name, wire.key: call.arguments}) + wire.suffix


def render_calls(wire: Wire, content: str, calls: list[ToolCall]) -> str:
    """An assistant reply with calls, up to (not including) its end-of-turn: the text, then each call."""
    text = wire.separator.join(render_call(wire, call) for call in calls) if wire.separator is not None else (
        render_call(wire, calls[0]))  # fmt: skip
    return (content + wire.after_content if content else "") + text


# ------------------------------------------------------------------------------------------------- style
def tool_style(template) -> str | None:
    """How `template` (a bound template from get_template, or a registered template's name) carries tools:
    "hermes" (chatml), "llama3", "auto-tools" (template=auto whose chat_template renders tools), or None."""
    if isinstance(template, str):
        from corral.chat.templates import TEMPLATES

        spec = TEMPLATES.get(template)
        return spec.tools if spec is not None else None
    spec = getattr(template, "spec", None)
    if spec is not None:
        return spec.tools
    return "auto-tools" if getattr(template, "supports_tools", False) else None


def wire_of(template) -> Wire | None:
    """The Wire of `template`'s style; None when it carries no tools or (auto) its call format is not one
    Corral can read: a JSON body with a name and an arguments object between fixed texts."""
    style = tool_style(template)
    if style == "auto-tools":
        return getattr(template, "tool_wire", None)
    return WIRES.get(style) if style else None


def _wire_or_error(template) -> Wire:
    wire = wire_of(template)
    if wire is None:
        name = template if isinstance(template, str) else getattr(template, "name", "?")
        raise ToolError(f"template '{name}' has no tool-call format Corral can write or read: use template=chatml "
                        "(Hermes/Qwen2.5 style), llama3, or auto with a tokenizer whose chat_template supports tools")
    return wire


def call_prefix(template) -> str:
    """The text that opens one call in `template`'s style: "<tool_call>\\n" (hermes), "" (llama3's bare JSON)."""
    return _wire_or_error(template).prefix


def call_suffix(template) -> str:
    """The text that closes one call: "\\n</tool_call>" (hermes), "" (llama3)."""
    return _wire_or_error(template).suffix


def call_body_schema(template, tools: list[dict] | None = None, name: str | None = None) -> dict:
    """The JSON schema of one call's body in `template`'s style: `{"name": <the function>, <key>: <its
    parameters schema>}`, where the key is "arguments" (hermes, and most auto templates) or "parameters"
    (llama3). The key depends on the style, so the template comes first: `call_body_schema(template, tools,
    name)`; `call_body_schema(tools, name)` is the hermes body. `name` fixes the function (tool_choice naming
    one); None allows any of `tools` (one schema per function, under anyOf, so the arguments must fit the
    function named). Properties are listed name first: constrained decoding writes them in that order."""
    if isinstance(template, list):  # call_body_schema(tools, name): the hermes key
        template, tools, name = "chatml", template, tools
    key = _wire_or_error(template).key
    functions = [function_of(tool) for tool in tools or []]
    if name is not None:
        named = [f for f in functions if f.get("name") == name]
        if not named:
            known = ", ".join(str(f.get("name")) for f in functions) or "none"
            raise ToolError(f"no tool named '{name}' (tools: {known})")
        functions = named
    if not functions:
        raise ToolError("no tools to call")

    def body(function: dict) -> dict:
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": function["name"]}, key: parameters},
                "required": ["name", key], "additionalProperties": False}

    return body(functions[0]) if len(functions) == 1 else {"anyOf": [body(f) for f in functions]}


def function_of(tool: dict) -> dict:
    """The function inside an OpenAI tool definition (`tool["function"]`), or the bare function itself."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def tool_names(tools: list[dict]) -> list[str]:
    return [str(function_of(tool).get("name")) for tool in tools]


# ------------------------------------------------------------------------------------------------- parse
@dataclass
class ParsedReply:
    """A generated reply split into its text and its calls (in the order written)."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)


def _call_from_body(text: str, key: str) -> ToolCall | None:
    """The call a JSON body writes, or None when it is not `{"name": str, key: object}` (arguments given as a
    JSON string of an object are taken too: some models write them so)."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
        return None
    arguments = body.get(key, body.get("arguments", body.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    call_id = body.get("id") if isinstance(body.get("id"), str) and body.get("id") else new_call_id()
    return ToolCall(call_id, body["name"], arguments)


def parse_tool_calls(template, text: str) -> ParsedReply:
    """Split a generated assistant reply (without its end-of-turn) into text and calls, per `template`'s
    style. hermes: every well-formed `<tool_call>...</tool_call>` block is a call (a last block the model
    did not close counts too) and the rest is the content; llama3: the whole reply is one JSON call, or it
    is all content. Text that is not a well-formed call stays in `content`; model output never raises.
    Ids are `call_<24 hex>` unless the body gives an "id"."""
    wire = wire_of(template)
    if wire is None:
        return ParsedReply(text, [])
    if not wire.prefix.strip():  # a bare JSON body (llama3): the whole reply, or no call
        body = text.strip().removeprefix("<|python_tag|>").strip()
        call = _call_from_body(body, wire.key) if body.startswith("{") else None
        return ParsedReply("", [call]) if call else ParsedReply(text, [])
    opening, closing = wire.prefix.strip(), wire.suffix.strip()
    pattern = re.compile(re.escape(opening) + r"(.*?)(?:" + re.escape(closing) + "|$)" if closing else
                         re.escape(opening) + "(.*?)(?=" + re.escape(opening) + "|$)", re.DOTALL)  # fmt: skip
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for match in pattern.finditer(text):
        call = _call_from_body(match.group(1).strip(), wire.key)
        if call is None:
            continue
        kept.append(text[position : match.start()])
        position = match.end()
        calls.append(call)
        if wire.separator is None:
            break
    if not calls:
        return ParsedReply(text, [])
    kept.append(text[position:])
    return ParsedReply("".join(kept).strip(), calls)


# ------------------------------------------------------------------------------------------------- check
def check_tools(conv: Conversation, where: str = "", list_field: str = "messages", shift: int = 0) -> None:
    """Check that a conversation's tool use fits together, or raise ToolError naming `where` and the field:
    each call's arguments are a JSON object and (when the conversation has tools) it names one of them; call
    ids are unique; every `tool` message answers a call made before it and not yet answered (by
    `tool_call_id`; without one, the one call open, when exactly one is); and every call is answered before
    the conversation moves on (a user message or the end of the results). Fields are named
    `{list_field}[i]...` with i the message's index plus `shift` (a reader that inserted a system message
    passes -1)."""
    prefix = f"{where}: " if where else ""
    names = set(tool_names(conv.tools))
    for k, tool in enumerate(conv.tools):
        function = function_of(tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolError(f"{prefix}field 'tools[{k}].function.name': missing (each tool is "
                            '{"type": "function", "function": {"name", "description", "parameters"}})')
    open_calls: dict[str, str] = {}  # id -> the field that made the call
    answered: dict[str, str] = {}  # id -> the field that answered it
    made: set[str] = set()
    for i, message in enumerate(conv.messages):
        at = f"{list_field}[{i + shift}]"
        if message.role == "tool":
            call_id = message.tool_call_id
            if not call_id:
                if len(open_calls) != 1:
                    what = "no call is open" if not open_calls else f"{len(open_calls)} calls are open"
                    raise ToolError(f"{prefix}field '{at}': a tool result without a tool_call_id, and {what} "
                                    "before it")
                continue_id = next(iter(open_calls))
                answered[continue_id] = at
                del open_calls[continue_id]
                continue
            if call_id in answered:
                raise ToolError(f"{prefix}field '{at}.tool_call_id': call '{call_id}' was already answered "
                                f"(by {answered[call_id]})")
            if call_id not in open_calls:
                raise ToolError(f"{prefix}field '{at}.tool_call_id': no call '{call_id}' was made before this result")
            answered[call_id] = at
            del open_calls[call_id]
            continue
        if open_calls:
            call_id, by = next(iter(open_calls.items()))
            raise ToolError(f"{prefix}field '{at}': call '{call_id}' ({by}) has no result before this message")
        for j, call in enumerate(message.tool_calls):
            field_name = f"{at}.tool_calls[{j}]"
            if message.role != "assistant":
                raise ToolError(f"{prefix}field '{field_name}': only an assistant message makes calls")
            if not isinstance(call.arguments, dict):
                raise ToolError(f"{prefix}field '{field_name}.function.arguments': expected a JSON object, "
                                f"got {type(call.arguments).__name__}")
            if names and call.name not in names:
                raise ToolError(f"{prefix}field '{field_name}.function.name': '{call.name}' is not one of the "
                                f"tools ({', '.join(sorted(names))})")
            if call.id in made:
                raise ToolError(f"{prefix}field '{field_name}.id': call id '{call.id}' is used twice")
            made.add(call.id)
            open_calls[call.id] = field_name
