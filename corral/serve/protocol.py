"""The OpenAI wire format: pydantic requests, response builders and the error body.

Every request field is either implemented or refused: an unknown field, a field this server does not
implement (`logit_bias`, `functions`, ...) and a value of the wrong type (`"16"` for an integer: no
coercion) are a 400 whose `param` names the field, as OpenAI answers. A few fields that carry no
instruction for the model (`user`, `metadata`, `store`, `service_tier`) are accepted and have no effect.
Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and `tool` messages)
is a chat-completions field set; the legacy completions refuse it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.generate.sampling import MAX_TOP_LOGPROBS, SamplingParams
from corral.generate.structured import ResponseFormat

MAX_SEED = 2**63 - 1
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the reply always follows the schema (constrained decoding), strict or not


class ResponseFormatField(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self

    def engine_format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat("json_object")
        return ResponseFormat("json_schema", json.dumps(self.json_schema.schema_))


# Fields OpenAI defines that this server does not implement: refused by name, never silently ignored.
NOT_IMPLEMENTED = {
    "tools": "tool calling is only for chat completions (/v1/chat/completions)",
    "tool_choice": "tool calling is only for chat completions (/v1/chat/completions)",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "logit_bias": "logit_bias is not supported by this server",
    "suffix": "suffix (insertion) is not supported by this server",
    "audio": "audio output is not supported by this server",
    "prediction": "predicted outputs are not supported by this server",
    "web_search_options": "web search is not supported by this server",
    "reasoning_effort": "this server's models have no reasoning effort setting",
}


class _Request(BaseModel):
    model_config = STRICT
    IMPLEMENTED: ClassVar[frozenset[str]] = frozenset()  # fields of NOT_IMPLEMENTED a subclass implements

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions that vLLM accepts too (through the client's extra_body).
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    # Accepted, without effect on the reply.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Refused when given (see NOT_IMPLEMENTED).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    suffix: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    @model_validator(mode="after")
    def _refuse_what_is_not_implemented(self):
        for field, why in NOT_IMPLEMENTED.items():
            if field not in self.IMPLEMENTED and getattr(self, field, None) is not None:
                raise APIError(400, f"{field}: {why}", param=field)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed with stream=true", param="stream_options")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    def top_logprobs_asked(self) -> int | None:
        return None

    def response_format_asked(self) -> ResponseFormat | None:
        return None

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, stop=self.stop_strings, n=self.n, seed=self.seed,
            logprobs=self.top_logprobs_asked(), response_format=self.response_format_asked(),
        )  # fmt: skip


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a function's name


class FunctionCallField(BaseModel):
    """A call an assistant message made: `arguments` is a JSON text, as OpenAI sends it."""

    model_config = STRICT
    name: str = Field(min_length=1)
    arguments: str


class ToolCallField(BaseModel):
    model_config = STRICT
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallField


class ChatMessage(BaseModel):
    """One message. `content` may be null only on an assistant message that makes `tool_calls`; a `tool`
    message answers one call (`tool_call_id`). `name` is accepted on every role (OpenAI's participant name)."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallField] | None = None
    tool_call_id: str | None = None
    # What an assistant message assembled by a client from a reply may carry back; nothing for the model.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; none: no arguments
    strict: bool | None = None  # the arguments always follow the schema when the call is forced, strict or not


class ToolDefinition(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition

    def openai(self) -> dict:
        """The definition as the chat template renders it (fields the client left out stay out)."""
        return self.model_dump(exclude_none=True)


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Request):
    IMPLEMENTED: ClassVar[frozenset[str]] = frozenset({"tools", "tool_choice"})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormatField | None = None
    tools: list[ToolDefinition] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per reply

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise APIError(400, "max_completion_tokens: give it or max_tokens, not both", param="max_completion_tokens")
        return self

    @model_validator(mode="after")
    def _tools_fit_together(self):
        if self.tools is None:
            if self.tool_choice is not None:
                raise APIError(400, "tool_choice: only allowed when tools are given", param="tool_choice")
            return self
        names = [t.function.name for t in self.tools]
        for i, tool in enumerate(self.tools):
            if tool.function.name in names[:i]:
                raise APIError(400, f"tools[{i}].function.name: '{tool.function.name}' is defined twice",
                               param=f"tools.{i}.function.name")
            check_parameters(tool.function.parameters, f"tools[{i}].function.parameters", f"tools.{i}.function.parameters")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise APIError(400, f"tool_choice.function.name: no tool named '{self.tool_choice.function.name}' "
                                f"(tools: {', '.join(names)})", param="tool_choice.function.name")  # fmt: skip
        if self.response_format is not None and self.response_format.type != "text" and self.tool_mode != "none":
            raise APIError(400, "response_format: a JSON response format cannot be combined with tools "
                                "(use tool_choice 'none', or leave response_format out)", param="response_format")
        return self

    @property
    def tool_mode(self) -> str | None:
        """None without tools; else "none", "auto", "required" or "named" (tool_choice naming one function)."""
        if self.tools is None:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def forced_function(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def response_format_asked(self) -> ResponseFormat | None:
        return self.response_format.engine_format() if self.response_format else None


def check_parameters(schema: dict | None, where: str, param: str) -> None:
    """A function's `parameters`: a JSON schema of an object that xgrammar can compile (what a forced call
    is decoded under), else a 400 naming the field."""
    if schema is None:
        return
    if schema.get("type", "object") != "object":
        raise APIError(400, f"{where}: must be a JSON schema of an object (\"type\": \"object\"), got type "
                            f"{json.dumps(schema.get('type'))}", param=param)  # fmt: skip
    properties = schema.get("properties", {})
    if not isinstance(properties, dict) or not all(isinstance(v, (dict, bool)) for v in properties.values()):
        raise APIError(400, f"{where}.properties: must map each argument's name to its JSON schema", param=param)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise APIError(400, f"{where}.required: must be a list of argument names", param=param)
    try:
        import xgrammar as xgr

        xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    except Exception as e:  # xgrammar raises RuntimeError/ValueError with its reason
        reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e)).strip()  # its C++ log prefix
        raise APIError(400, f"{where}: not a JSON schema this server can use: {reason}", param=param) from None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=16)

    @model_validator(mode="after")
    def _prompt_and_best_of(self):
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of: only best_of equal to n is supported", param="best_of")
        return self

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class Vote(BaseModel):
    """An arena vote from the web page: which of two anonymous replies to one prompt was better."""

    model_config = STRICT
    prompt: str = Field(min_length=1)
    model_a: str
    model_b: str
    reply_a: str
    reply_b: str
    vote: Literal["a", "b", "tie", "both_bad"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, id_: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    body = {"id": id_, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
