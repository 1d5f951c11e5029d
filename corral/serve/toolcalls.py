"""Tool calls in served replies: what a request's tools do to the prompt and the sampling, and how a
reply's text becomes OpenAI's `content` and `tool_calls`, streamed or whole.

`tool_choice` "none" and "auto" generate freely from a prompt that carries the tools; "auto" then reads
the calls the model wrote (the template's own format, `chat/tools.py`). "required" and a named function
are forced: the prompt ends with the call's opening text (`call_prefix`, as if the model had written
it) and the rest is decoded under the JSON schema of one call's body (`call_body_schema`), through the
same response-format path as `response_format: json_schema`, so the call is always well-formed and its
arguments valid under the function's schema, whatever the weights. A forced reply is one call.

`ReplyShaper` turns a reply's text, piece by piece, into OpenAI deltas; the non-streamed reply is the
same shaper fed the whole text, so a stream assembled by the client equals the reply sent whole. For
"auto", text that could be the start of a call's opening tag is held back until it is clear; a call is
sent once its block is complete (its id and name, then its arguments), and a block that does not parse
as a call is sent as text. A forced call streams its arguments as they are generated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from corral.chat.tools import call_body_schema, call_prefix, new_call_id, parse_tool_calls, tool_names, wire_of
from corral.generate.sampling import SamplingParams
from corral.generate.structured import ResponseFormat
from corral.serve.protocol import APIError, ChatRequest

# The head of a forced call's body, up to where its arguments object starts: '{"name": "f", "arguments": '.
_BODY_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools: `mode` "none" | "auto" | "forced", the template and the names of the
    tools (for reading calls), the text appended to the prompt, and the forced call's body schema."""

    mode: str
    template: object
    names: frozenset[str]
    parallel: bool
    prompt_suffix: str = ""
    body_schema: dict | None = None


def plan(req: ChatRequest, template, model: str) -> ToolPlan | None:
    """The request's tool plan (None without tools); a 400 when the model's template cannot carry tools."""
    mode = req.tool_mode
    if mode is None:
        return None
    if wire_of(template) is None:
        name = getattr(template, "name", "?")
        raise APIError(400, f"tools: model '{model}' is served with template '{name}', which has no tool-calling "
                            "format; serve it with template=chatml (Hermes/Qwen2.5 tool calls), llama3, or auto on "
                            "a tokenizer whose chat_template renders tools", param="tools")  # fmt: skip
    parallel = req.parallel_tool_calls is not False
    tools = [t.openai() for t in req.tools]
    names = frozenset(tool_names(tools))
    if mode in ("none", "auto"):
        return ToolPlan(mode, template, names, parallel)
    schema = call_body_schema(template, tools, req.forced_function)
    return ToolPlan("forced", template, names, parallel, call_prefix(template), schema)


def forced_sampling(params: SamplingParams, tool_plan: ToolPlan | None) -> SamplingParams:
    """A forced call's body is decoded under its JSON schema, as `response_format: json_schema` is."""
    if tool_plan is None or tool_plan.body_schema is None:
        return params
    return replace(params, response_format=ResponseFormat.json_schema(tool_plan.body_schema))


class ReplyShaper:
    """One reply's text, fed piece by piece (`feed`, then `finish`), as OpenAI deltas: `{"content": ...}` and
    `{"tool_calls": [...]}`. `content` and `calls` are the whole reply's, for the non-streamed message."""

    def __init__(self, tool_plan: ToolPlan):
        self.plan = tool_plan
        wire = wire_of(tool_plan.template)
        self.opening = wire.prefix.strip()  # "" for llama3's bare JSON call
        self.closing = wire.suffix.strip()
        self.text = ""  # what was fed and not yet sent or decided on
        self.content = ""
        self.calls: list[dict] = []  # OpenAI tool_calls, arguments as JSON text
        self.in_call = False  # auto: inside an opened call block
        self.held_whitespace = ""  # auto: trailing whitespace before what may be a call (dropped if it is)
        self.bare_json: bool | None = None  # auto, llama3: whether the reply is one JSON call (decided at its start)
        self.forced_sent = 0  # forced: characters of the arguments already sent

    # ------------------------------------------------------------------ public
    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if self.plan.mode == "forced":
            return self._forced(final=False)
        if self.plan.mode == "none":
            return self._say(self._take(len(self.text)))
        return self._auto(final=False)

    def finish(self) -> list[dict]:
        if self.plan.mode == "forced":
            return self._forced(final=True)
        if self.plan.mode == "none":
            return self._say(self._take(len(self.text)))
        return self._auto(final=True)

    def message(self) -> dict:
        """The non-streamed assistant message: content (null when only calls were made) and tool_calls."""
        message = {"role": "assistant", "content": self.content if (self.content or not self.calls) else None}
        if self.calls:
            message["tool_calls"] = self.calls
        return message

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason

    # ------------------------------------------------------------------ helpers
    def _take(self, n: int) -> str:
        taken, self.text = self.text[:n], self.text[n:]
        return taken

    def _say(self, text: str) -> list[dict]:
        if not text:
            return []
        self.content += text
        return [{"content": text}]

    def _call_deltas(self, name: str, arguments: str, call_id: str | None = None) -> list[dict]:
        """A new call: its id, type and name with empty arguments, then (if any) its arguments."""
        index = len(self.calls)
        call_id = call_id or new_call_id()
        self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        deltas = [{"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}]  # fmt: skip
        if arguments:
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        return deltas

    # ------------------------------------------------------------------ forced: the text is one call's body
    def _forced(self, final: bool) -> list[dict]:
        if not self.calls:
            head = _BODY_HEAD.match(self.text)
            if head is None:  # the name is still being written (or the reply was cut inside it)
                return self._say(self._take(len(self.text))) if final else []
            self._take(head.end())
            deltas = self._call_deltas(json.loads(head.group(1)), "")
        else:
            deltas = []
        # The body's own closing brace ends the text: hold back a last "}" (and whitespace) until the end.
        complete = final and self._body_complete()
        keep = len(re.search(r"\}?\s*$", self.text).group()) if not final or complete else 0
        fresh = self.text[self.forced_sent : len(self.text) - keep]
        if fresh:
            self.forced_sent += len(fresh)
            self.calls[0]["function"]["arguments"] += fresh
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": fresh}}]})
        return deltas

    def _body_complete(self) -> bool:
        arguments = self.text[: len(self.text) - len(re.search(r"\}?\s*$", self.text).group())]
        try:
            return isinstance(json.loads(arguments), dict) and self.text.rstrip().endswith("}")
        except ValueError:
            return False

    # ------------------------------------------------------------------ auto: text, with calls in it
    def _auto(self, final: bool) -> list[dict]:
        if not self.opening:
            return self._auto_bare_json(final)
        deltas: list[dict] = []
        while True:
            if self.in_call:  # a block ends at its closing tag (a format without one: at the next call, or the end)
                mark = self.closing or self.opening
                end = self.text.find(mark, len(self.opening))
                if end < 0 and not final:
                    return deltas
                block = self._take(len(self.text) if end < 0 else end + len(self.closing))
                deltas += self._block(block)
                self.in_call = False
                continue
            start = self.text.find(self.opening)
            if start >= 0:
                deltas += self._text(self._take(start))
                self.in_call = True
                continue
            if final:
                deltas += self._text(self._take(len(self.text)), final=True)
                return deltas
            # Hold back what could be the start of the opening tag, and the whitespace before it.
            hold = next((k for k in range(min(len(self.opening) - 1, len(self.text)), 0, -1)
                         if self.text.endswith(self.opening[:k])), 0)  # fmt: skip
            deltas += self._text(self._take(len(self.text) - hold))
            return deltas

    def _text(self, text: str, final: bool = False) -> list[dict]:
        """Plain text. Trailing whitespace waits for what follows: more text (then it is sent), a call (then
        it is dropped, as parse_tool_calls strips it) or the end (kept only if the reply made no call)."""
        text = self.held_whitespace + text
        if final:
            self.held_whitespace = ""
            return self._say(text.rstrip() if self.calls else text)
        stripped = text.rstrip()
        self.held_whitespace = text[len(stripped) :]
        return self._say(stripped)

    def _block(self, block: str) -> list[dict]:
        """One call block: a call if it parses as a call of one of this request's tools, else text."""
        parsed = parse_tool_calls(self.plan.template, block)
        call = parsed.calls[0] if len(parsed.calls) == 1 and not parsed.content else None
        if call is not None and call.name not in self.plan.names:
            call = None  # a function the request does not offer is no call of this request
        if not self.plan.parallel and self.calls:
            return []  # parallel_tool_calls=false: after the first call, further blocks are left out
        if call is None:
            text, self.held_whitespace = self.held_whitespace + block, ""
            return self._say(text)
        self.held_whitespace = ""
        return self._call_deltas(call.name, json.dumps(call.arguments, ensure_ascii=False), call.id)

    def _auto_bare_json(self, final: bool) -> list[dict]:
        """llama3: the whole reply is one JSON call or plain text; a reply that starts like JSON is held whole."""
        if self.bare_json is None:
            start = self.text.lstrip()
            if not start and not final:
                return []
            self.bare_json = start.startswith(("{", "<|python_tag|>"))
        if not self.bare_json:
            return self._say(self._take(len(self.text)))
        if not final:
            return []
        text = self._take(len(self.text))
        parsed = parse_tool_calls(self.plan.template, text)
        if not parsed.calls or parsed.calls[0].name not in self.plan.names:
            return self._say(text)
        call = parsed.calls[0]
        return self._call_deltas(call.name, json.dumps(call.arguments, ensure_ascii=False), call.id)
