"""The one registry of conversation templates.

A template turns a Conversation into a list of text *segments*, each marked trained or not. The
same segments serve inference (`render`, ending with the generation prompt) and training
(`render_with_masks`, labels on assistant replies and their end-of-turn token): masks are built
while rendering, never recovered afterwards by splitting strings. Each segment is tokenized on its
own, so the inference rendering of the first k turns is a token prefix of the training rendering
by construction: no "tokenization mismatch" at turn boundaries.

Registered templates are declarations (TemplateSpec). `auto` uses the tokenizer's own Jinja
`chat_template`, segmented by rendering growing prefixes of the conversation. A registered
template also exports itself as Jinja (`chat_template_jinja`), which is saved with checkpoints so
that plain transformers/vLLM format prompts exactly as Corral trained them.

Tool use (chat/tools.py): `chatml` writes Hermes/Qwen2.5 `<tool_call>` blocks, `llama3` Llama 3.1's JSON
calls, `auto` whatever the tokenizer's template does with `tools=`; every other template refuses a
conversation with tools. A call's text and its end-of-turn are trained like a reply; tool definitions and
results are template text, never trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from corral.chat.conversation import Conversation, Message, ToolCall, next_roles
from corral.chat.tools import (
    TOOL_FORMATS, ToolError, Wire, check_tools, dumps, render_call, render_calls, tools_text,
)

IGNORE_INDEX = -100

Segment = tuple[str, bool]  # (text, trained)


class TemplateError(ValueError):
    """A conversation or tokenizer does not fit the chosen template."""


@dataclass(frozen=True)
class TemplateSpec:
    """A template as a declaration. `{content}` is the message text; `{bos}`/`{eos}` the tokenizer's tokens."""

    name: str
    user: str  # format of a user message
    assistant_prompt: str  # opens an assistant turn: the generation prompt (not trained)
    reply: str  # format of an assistant reply plus its end-of-turn (trained)
    after_reply: str = ""  # template text after a reply (not trained)
    system: str = "{content}"  # format of a system message
    default_system: str | None = None  # used when the conversation has none
    start: str = ""  # once at the beginning
    system_in_first_user: str | None = None  # llama2 puts the system prompt inside the first user message
    stop: tuple[str, ...] = ("{eos}",)  # end-of-turn strings: generation stops there
    doc: str = ""
    tools: str | None = None  # the tool-calling style (chat/tools.py TOOL_FORMATS), None: no tools


TEMPLATES: dict[str, TemplateSpec] = {
    spec.name: spec
    for spec in [
        TemplateSpec(
            name="vicuna_v1.1",
            start="{bos}",
            system="{content} ",
            default_system=(
                "A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions."
            ),
            user="USER: {content} ",
            assistant_prompt="ASSISTANT:",
            reply=" {content}{eos}",
            doc="Vicuna / FastChat v1.1",
        ),
        TemplateSpec(
            name="alpaca",
            start="{bos}",
            system="{content}\n\n",
            default_system=(
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request."
            ),
            user="### Instruction:\n{content}\n\n",
            assistant_prompt="### Response:\n",
            reply="{content}{eos}",
            after_reply="\n\n",
            doc="Stanford Alpaca / Alpaca-LoRA",
        ),
        TemplateSpec(
            name="chatml",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_prompt="<|im_start|>assistant\n",
            reply="{content}<|im_end|>",
            after_reply="\n",
            stop=("<|im_end|>",),
            doc="ChatML (SmolLM2, Qwen, many others); tools as Hermes / Qwen2.5 <tool_call> blocks",
            tools="hermes",
        ),
        TemplateSpec(
            name="llama2",
            user="{bos}[INST] {content} [/INST]",
            system_in_first_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
            assistant_prompt="",
            reply=" {content} {eos}",
            doc="Llama 2 chat",
        ),
        TemplateSpec(
            name="llama3",
            start="<|begin_of_text|>",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
            reply="{content}<|eot_id|>",
            stop=("<|eot_id|>",),
            doc="Llama 3 / 3.1 instruct; tools as Llama 3.1 JSON calls, one per turn",
            tools="llama3",
        ),
    ]
}

TEMPLATE_NAMES = (*TEMPLATES, "auto")


def check_conversation(conv: Conversation, for_training: bool) -> None:
    """Roles must be: optional system, then user/assistant alternating from user, where an assistant message
    with tool calls is followed by their results (`tool` messages) and then the assistant's next turn. Tool
    use must fit together (tools.check_tools)."""
    where = f"{conv.source}: " if conv.source else ""
    turns = conv.turns
    if not turns:
        raise TemplateError(f"{where}conversation has no user or assistant messages")
    previous = None
    for i, m in enumerate(turns):
        expected = next_roles(previous)
        if m.role not in expected:
            raise TemplateError(f"{where}message {i}: expected role {' or '.join(repr(r) for r in expected)}, "
                                f"got '{m.role}'")
        previous = m
    last = turns[-1].role
    if for_training and last != "assistant":
        raise TemplateError(f"{where}a training conversation must end with an assistant reply")
    if not for_training and last not in ("user", "tool"):
        raise TemplateError(f"{where}a prompt must end with a user message (or tool results)")
    if conv.uses_tools:
        try:
            check_tools(conv, conv.source)
        except ToolError as e:
            raise TemplateError(str(e)) from None


class _Renderer:
    """Shared rendering over `segments()`: the only code that turns segments into ids and labels."""

    tokenizer: object

    def segments(self, conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
        raise NotImplementedError

    def render_text(self, conv: Conversation, add_generation_prompt: bool = True) -> str:
        check_conversation(conv, for_training=not add_generation_prompt)
        return "".join(text for text, _ in self.segments(conv, add_generation_prompt))

    def added_system_text(self) -> str:
        """The text this template adds to a conversation with no system message, beyond what an empty system
        message gives: a default system prompt (SmolLM2's own template, vicuna_v1.1's), or "" when there is none."""
        import difflib

        probe = ("user", "corral-probe")
        bare = self.render_text(Conversation.from_pairs(probe), add_generation_prompt=True)
        empty = self.render_text(Conversation.from_pairs(probe, system=""), add_generation_prompt=True)
        ops = difflib.SequenceMatcher(a=empty, b=bare, autojunk=False).get_opcodes()
        return "".join(bare[j1:j2] for tag, _, _, j1, j2 in ops if tag in ("insert", "replace")).strip()

    def render(self, conv: Conversation) -> list[int]:
        """Token ids of a prompt (conversation ending with a user message) plus the generation prompt."""
        check_conversation(conv, for_training=False)
        ids, _ = self._encode(self.segments(conv, add_generation_prompt=True))
        return ids

    def render_with_masks(self, conv: Conversation) -> tuple[list[int], list[int]]:
        """(input_ids, labels): labels are IGNORE_INDEX except on assistant replies and their end-of-turn."""
        check_conversation(conv, for_training=True)
        return self._encode(self.segments(conv, add_generation_prompt=False))

    def _encode(self, segments: list[Segment]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in merge_segments(segments):
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return ids, labels


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """The units a rendering tokenizes one by one: adjacent segments with the same trained flag joined, empty
    ones left out. A rendering's ids are its units' ids in order (data/clean.py counts lengths that way)."""
    merged: list[Segment] = []
    for text, trained in segments:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def _fill(fmt: str, content: str) -> str:
    # str.replace, not str.format: message text may contain braces.
    return fmt.replace("{content}", content)


class SpecFormat(_Renderer):
    """A registered TemplateSpec bound to a tokenizer ({bos}/{eos} resolved, special tokens checked)."""

    def __init__(self, spec: TemplateSpec, tokenizer):
        self.name = spec.name
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token or ""
        eos = tokenizer.eos_token
        fields = {
            k: getattr(spec, k)
            for k in ("user", "assistant_prompt", "reply", "after_reply", "system", "start", "system_in_first_user")
        }
        if any("{eos}" in (v or "") for v in fields.values()) and not eos:
            raise TemplateError(f"template '{spec.name}' ends replies with the eos token, but the tokenizer has none")

        def resolve(text):
            return None if text is None else text.replace("{bos}", bos).replace("{eos}", eos or "")

        resolved = {k: resolve(v) for k, v in fields.items()}
        self.spec = TemplateSpec(
            name=spec.name, default_system=spec.default_system, stop=tuple(resolve(s) for s in spec.stop),
            tools=spec.tools, **resolved,
        )
        self._check_special_tokens()
        self.stop_strings = list(self.spec.stop)
        self.stop_token_ids = sorted(
            {tid for s in self.stop_strings if len(tid_list := self._ids(s)) == 1 for tid in tid_list}
            | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        )
        self.chat_template_jinja = _spec_to_jinja(self.spec)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_special_tokens(self) -> None:
        # Markers like <|im_start|> must be single tokens, or the model never saw this template.
        markers = [s for s in self.spec.stop] + (["<|im_start|>"] if "<|im_start|>" in self.spec.user else [])
        markers += ["<|start_header_id|>"] if "<|start_header_id|>" in self.spec.user else []
        for marker in markers:
            if marker.startswith("<") and marker.endswith(">") and len(self._ids(marker)) != 1:
                raise TemplateError(
                    f"template '{self.name}' needs '{marker}' as one token, but this tokenizer splits it "
                    f"into {len(self._ids(marker))}: the model was not trained with this template. "
                    f"Use template=auto (the tokenizer's own) or another of {', '.join(TEMPLATE_NAMES)}."
                )

    def segments(self, conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
        spec = self.spec
        style = TOOL_FORMATS[spec.tools] if spec.tools else None
        if conv.uses_tools and style is None:
            where = f"{conv.source}: " if conv.source else ""
            raise TemplateError(f"{where}template '{self.name}' cannot carry tool definitions, calls or results: "
                                "use template=chatml (Hermes/Qwen2.5 style), llama3 (Llama 3.1 JSON calls), or auto "
                                "with a tokenizer whose chat_template supports tools")
        system = conv.system if conv.system is not None else spec.default_system
        if style is not None and conv.tools and style.place == "system":
            system = (system + style.system_join if system else "") + tools_text(style, conv.tools)
        segs: list[Segment] = [(spec.start, False)]
        if system and spec.system_in_first_user is None:
            segs.append((_fill(spec.system, system), False))
        turns = conv.turns
        for i, message in enumerate(turns):
            if message.role == "user":
                content = message.content
                if i == 0 and system and spec.system_in_first_user is not None:
                    content = spec.system_in_first_user.replace("{system}", system).replace("{content}", content)
                if i == 0 and style is not None and conv.tools and style.place == "first_user":
                    content = tools_text(style, conv.tools) + content
                segs.append((_fill(spec.user, content), False))
            elif message.role == "tool":
                first = turns[i - 1].role != "tool"
                last = i + 1 == len(turns) or turns[i + 1].role != "tool"
                text = (style.result_open if first else "") + _fill(style.result, message.content)
                segs.append((text + (style.result_close if last else ""), False))
            else:
                reply = message.content
                if message.tool_calls:
                    reply = self._calls_text(conv, i, message, style.wire)
                segs += [
                    (spec.assistant_prompt, False),
                    (_fill(spec.reply, reply), True),
                    (spec.after_reply, False),
                ]
        if add_generation_prompt:
            segs.append((spec.assistant_prompt, False))
        return segs

    def _calls_text(self, conv: Conversation, i: int, message: Message, wire: Wire) -> str:
        """An assistant turn's text and calls as this template writes them (refusing what its style cannot)."""
        if wire.separator is None and (len(message.tool_calls) > 1 or message.content):
            where = f"{conv.source}: " if conv.source else ""
            what = f"{len(message.tool_calls)} parallel calls" if len(message.tool_calls) > 1 else "text and a call"
            raise TemplateError(f"{where}message {i}: template '{self.name}' writes one tool call per assistant turn "
                                f"and nothing else (Llama 3.1's JSON tool calling), but this turn has {what}; "
                                "use template=chatml for parallel calls, or split them into turns")
        return render_calls(wire, message.content, message.tool_calls)


def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal


def _spec_to_jinja(spec: TemplateSpec) -> str:
    """The same template as a Jinja chat_template, for transformers' apply_chat_template and vLLM. A template
    with a tool style also renders `tools=` and HF-shaped messages (`tool_calls` with `function.arguments`
    as a dict or a JSON string, role `tool`) as Corral does."""
    user_pre, user_post = spec.user.split("{content}")
    reply_pre, reply_post = spec.reply.split("{content}")
    sys_pre, sys_post = spec.system.split("{content}")
    q = _jinja_str
    style = TOOL_FORMATS[spec.tools] if spec.tools else None
    first_content = "message['content']"
    if style is not None and style.place == "first_user":
        first_content = "(tools_text if tools else '') + message['content']"
    if spec.system_in_first_user is not None:
        siu_pre, rest = spec.system_in_first_user.split("{system}")
        siu_mid, siu_post = rest.split("{content}")
        first_user = (
            f"{{{{ {q(user_pre + siu_pre)} + system + {q(siu_mid)} + message['content'] + {q(siu_post + user_post)} }}}}"
        )
        system_block = ""
    else:
        first_user = f"{{{{ {q(user_pre)} + {first_content} + {q(user_post)} }}}}"
        system_block = f"{{%- if system -%}}{{{{ {q(sys_pre)} + system + {q(sys_post)} }}}}{{%- endif -%}}"
    default = q(spec.default_system) if spec.default_system is not None else "none"
    tools_setup, assistant, tool_branch = "", "message['content']", ""
    if style is not None:
        tojson = f"tojson(indent={style.indent})" if style.indent is not None else "tojson"
        tools_setup = (
            "{%- set ns = namespace(text='') -%}{%- for tool in (tools or []) -%}"
            f"{{%- set ns.text = ns.text + {q(style.before)} + (tool | {tojson}) + {q(style.after)} -%}}"
            f"{{%- endfor -%}}{{%- set tools_text = {q(style.head)} + ns.text + {q(style.tail)} -%}}"
        )
        if style.place == "system":
            system_block = (
                f"{{%- if tools -%}}{{{{ {q(sys_pre)} + (system + {q(style.system_join)} if system else '') + "
                f"tools_text + {q(sys_post)} }}}}{{%- elif system -%}}{{{{ {q(sys_pre)} + system + {q(sys_post)} }}}}"
                "{%- endif -%}"
            )
        wire = style.wire
        # A call's body as tools.dumps writes it: '{"name": ' + name + ', "<key>": ' + arguments + '}'.
        opening, middle, closing = wire.prefix + '{"name": ', ', "' + wire.key + '": ', "}" + wire.suffix
        single = "" if wire.separator is not None else (
            "{%- if message['tool_calls'] | length > 1 -%}{{ raise_exception("
            f"{q(f'template {spec.name} writes one tool call per assistant turn')}) }}}}{{%- endif -%}}"
        )  # fmt: skip
        assistant = (
            f"{single}{{%- if message['tool_calls'] -%}}"
            f"{{%- if message['content'] -%}}{{{{ message['content'] + {q(wire.after_content)} }}}}{{%- endif -%}}"
            "{%- for call in message['tool_calls'] -%}"
            "{%- set f = call['function'] if call['function'] is defined else call -%}"
            f"{{%- if not loop.first -%}}{{{{ {q(wire.separator or '')} }}}}{{%- endif -%}}"
            f"{{{{ {q(opening)} + (f['name'] | tojson) + {q(middle)} + "
            f"(f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson)) + {q(closing)} }}}}"
            "{%- endfor -%}"
            "{%- else -%}{{ message['content'] }}{%- endif -%}"
        )
        result_pre, result_post = style.result.split("{content}")
        tool_branch = (
            "{%- elif message['role'] == 'tool' -%}"
            "{%- if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool' -%}"
            f"{{{{ {q(style.result_open)} }}}}{{%- endif -%}}"
            f"{{{{ {q(result_pre)} + message['content'] + {q(result_post)} }}}}"
            "{%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' -%}"
            f"{{{{ {q(style.result_close)} }}}}{{%- endif -%}}"
        )
    return (
        f"{{{{ {q(spec.start)} }}}}"
        f"{tools_setup}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {default} -%}}{{%- set loop_messages = messages -%}}{{%- endif -%}}"
        f"{system_block}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{%- if loop.first and system -%}}{first_user}"
        + (f"{{%- elif loop.first -%}}{{{{ {q(user_pre)} + {first_content} + {q(user_post)} }}}}"
           if first_content != "message['content']" else "")
        + f"{{%- else -%}}{{{{ {q(user_pre)} + message['content'] + {q(user_post)} }}}}{{%- endif -%}}"
        f"{tool_branch}"
        f"{{%- else -%}}{{{{ {q(spec.assistant_prompt + reply_pre)} }}}}{assistant if style else ''}"
        + ("" if style else "{{ message['content'] }}")
        + f"{{{{ {q(reply_post + spec.after_reply)} }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {q(spec.assistant_prompt)} }}}}{{%- endif -%}}"
    )


class TokenizerFormat(_Renderer):
    """`auto`: the tokenizer's own Jinja chat_template, segmented by rendering growing prefixes.

    For the i-th assistant reply, the text added between `messages[:i]` with a generation prompt and
    `messages[:i+1]` holds the reply; the reply plus the special token right after it (the
    end-of-turn) is trained, the rest is template text. A template whose renderings are not
    prefixes of each other cannot be trained on safely and is refused with a clear error.

    Rendering every prefix costs the square of the conversation's length. Most templates render each
    message on its own (its role's header, the content as it is, a footer; the first message may carry a
    default system prompt), and then every prefix's rendering is a sum of per-message blocks: `_turn_model`
    learns those blocks once, from the template's renderings of every prefix of two marker conversations
    (with and without a system message), and a conversation is rendered once, its real rendering checked
    against the blocks' sum; the segments are then what the prefix renderings would give. A template that
    does anything else (drops or rewrites earlier turns, depends on the content, trims it, ...) fails the
    learning or the check, and its conversations take the prefix renderings as before.

    Tools: when the template renders `tools=` (its source mentions tools and a probe tool changes the
    output), conversations with tools are rendered with `tools=conv.tools` and HF-shaped messages, always by
    prefix renderings; an assistant turn with calls is trained from its first character to its end-of-turn.
    The call format (`tool_wire`, for parse_tool_calls and constrained decoding) is learned from a probe
    call's rendering: a JSON body `{"name", <key>: {...}}` written as tools.dumps writes it between fixed
    texts; a template that writes calls otherwise still trains, but has no wire (None).
    """

    name = "auto"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "template 'auto' needs the tokenizer's chat_template, and this tokenizer has none; "
                f"choose one of {', '.join(TEMPLATES)}"
            )
        self.tokenizer = tokenizer
        self.chat_template_jinja = tokenizer.chat_template
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        self._special_tokens = sorted((s for s in specials if s), key=len, reverse=True)
        self._turn_model = self._learn_turn_model()
        probe = Conversation.from_pairs(("user", "Hi"), ("assistant", "Hello"))
        end = [text for text, trained in self.segments(probe, False) if trained][0][len("Hello") :]
        self.stop_strings = [end] if end else []
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if end and len(end_ids := tokenizer(end, add_special_tokens=False)["input_ids"]) == 1:
            ids |= set(end_ids)
        self.stop_token_ids = sorted(ids)
        self.supports_tools = self._renders_tools()
        self.tool_wire = self._learn_tool_wire() if self.supports_tools else None

    def _apply(self, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(
            [m.to_hf() for m in messages], tools=tools or None, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )  # fmt: skip

    def _refusing(self, where: str, messages: list[Message], add_generation_prompt: bool, tools: list[dict]) -> str:
        """`_apply` with tools, where the template's own refusal (Llama 3.1's of parallel calls, say) is a
        TemplateError naming the conversation rather than a Jinja traceback."""
        try:
            return self._apply(messages, add_generation_prompt, tools)
        except Exception as e:  # raise_exception() in the template, or a message shape it cannot render
            raise TemplateError(f"{where}the tokenizer's chat_template refuses this conversation's tool use: "
                                f"{type(e).__name__}: {e}") from None

    def _renders_tools(self) -> bool:
        """Whether the chat template renders tool definitions: it mentions them, and a probe tool changes the
        rendering of a one-message conversation."""
        if "tools" not in str(self.chat_template_jinja):
            return False
        probe = [Message("user", "corral-probe")]
        try:
            return self._apply(probe, True, [PROBE_TOOL]) != self._apply(probe, True)
        except Exception:  # a template that fails on tools does not support them
            return False

    def _learn_tool_wire(self) -> Wire | None:
        """The call format, from the renderings of a probe call (one, two, and one after text)."""
        user = Message("user", "corral-probe")
        prompt = self._apply([user], True, [PROBE_TOOL])
        end = self.stop_strings[0] if self.stop_strings else ""

        def reply(content: str, calls: list[ToolCall]) -> str | None:
            try:
                full = self._apply([user, Message("assistant", content, calls)], False, [PROBE_TOOL])
            except Exception:
                return None
            if not full.startswith(prompt):
                return None
            added = full[len(prompt) :]
            return added[: added.find(end)] if end and end in added else added.rstrip()

        one = reply("", [PROBE_CALLS[0]])
        if one is None:
            return None
        found = None
        for key in ("arguments", "parameters"):
            body = dumps({"name": PROBE_CALLS[0].name, key: PROBE_CALLS[0].arguments})
            if one.count(body) == 1:
                found = key, body
        if found is None:
            return None
        key, body = found
        prefix, suffix = one.split(body)
        wire = Wire(prefix.lstrip(), suffix, key, separator=None, after_content="")
        two = reply("", PROBE_CALLS)
        first, second = (render_call(wire, call) for call in PROBE_CALLS)
        if two is not None and two.lstrip().startswith(first) and two.endswith(second):
            wire = Wire(wire.prefix, suffix, key, separator=two.lstrip()[len(first) : len(two.lstrip()) - len(second)])
        text = reply("corral-probe-text", [PROBE_CALLS[0]])
        if text is not None and text.startswith("corral-probe-text") and text.endswith(first):
            wire = Wire(wire.prefix, suffix, key, wire.separator, text[len("corral-probe-text") : -len(first)])
        return wire

    def _learn_turn_model(self) -> dict | None:
        """Per-message blocks (role, header, footer) and the generation prompt, for conversations with and
        without a system message, or None when the template's renderings are not such sums."""
        model = {}
        for has_system in (False, True):
            roles = (["system"] if has_system else []) + ["user", "assistant"] * 3
            markers = [f"\u2063corral-probe-{k}\u2063" for k in range(len(roles))]
            messages = [Message(role, marker) for role, marker in zip(roles, markers)]  # type: ignore[arg-type]
            blocks, previous, generation = [], "", None
            for k in range(1, len(messages) + 1):
                try:
                    plain, prompt = self._apply(messages[:k], False), self._apply(messages[:k], True)
                except Exception:  # a template that refuses a probe (roles it does not know): prefix renderings
                    return None
                if not plain.startswith(previous) or not prompt.startswith(plain):
                    return None
                if generation is None:
                    generation = prompt[len(plain) :]
                block = plain[len(previous) :]
                if prompt[len(plain) :] != generation or any(
                        block.count(m) != (m == markers[k - 1]) for m in markers):  # fmt: skip
                    return None
                header, footer = block.split(markers[k - 1])
                blocks.append((roles[k - 1], header, footer))
                previous = plain
            steady = 2 + has_system  # from the second user turn on, every exchange renders alike
            if blocks[steady : steady + 2] != blocks[steady + 2 : steady + 4]:
                return None
            model[has_system] = {"blocks": blocks, "steady": steady, "generation": generation}
        return model

    def _blocks(self, messages: list[Message]) -> tuple[list[str], str] | None:
        """Each message's block by the turn model, and the generation prompt; None where it has none."""
        family = self._turn_model[messages[0].role == "system"]
        blocks, known, steady = [], family["blocks"], family["steady"]
        for j, message in enumerate(messages):
            k = j if j < len(known) else steady + (j - steady) % 2
            role, header, footer = known[k]
            if role != message.role:
                return None
            blocks.append(header + message.content + footer)
        return blocks, family["generation"]

    def _reply_segments(self, where: str, i: int, head: str, added: str, content: str) -> list[Segment]:
        """The segments of assistant reply i: `head` (template text since the last reply), then within
        `added` (the text the reply's turn adds) the reply and the end-of-turn token after it, trained."""
        at = added.find(content) if content else -1
        if at < 0 and content.strip():
            content = content.strip()
            at = added.find(content)
        if not content:  # an empty reply (a model that ended its turn at once) sits before the end token
            ends = [added.find(tok) for tok in self._special_tokens if tok and tok in added]
            at = min(ends) if ends else len(added.rstrip())
        if at < 0:
            raise TemplateError(f"{where}the chat_template does not reproduce assistant reply {i} verbatim")
        rest = added[at + len(content) :]
        end = next((tok for tok in self._special_tokens if rest.startswith(tok)), "")
        return [(head + added[:at], False), (content + end, True), (rest[len(end) :], False)]

    def _call_segments(self, head: str, added: str) -> list[Segment]:
        """The segments of an assistant turn with calls: what the turn adds, from its first non-blank character
        to the end-of-turn token, is trained."""
        body = added.lstrip()
        lead = added[: len(added) - len(body)]
        end = self.stop_strings[0] if self.stop_strings else ""
        cut = body.find(end) + len(end) if end and end in body else len(body.rstrip())
        return [(head + lead, False), (body[:cut], True), (body[cut:], False)]

    def segments(self, conv: Conversation, add_generation_prompt: bool) -> list[Segment]:
        where = f"{conv.source}: " if conv.source else ""
        messages = conv.messages
        tools = conv.tools or None
        if conv.uses_tools and not self.supports_tools:
            raise TemplateError(f"{where}the tokenizer's chat_template does not render tools, so this conversation's "
                                "tool definitions, calls or results cannot be formatted: use template=chatml "
                                "(Hermes/Qwen2.5 style) or llama3 (Llama 3.1 JSON calls)")
        if self._turn_model is not None and messages and not conv.uses_tools:
            found = self._segments_by_blocks(where, messages, add_generation_prompt)
            if found is not None:
                return found
        apply = self._apply if tools is None else lambda m, generation: self._refusing(where, m, generation, tools)
        segs: list[Segment] = []
        done = ""  # text already segmented
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = apply(messages[:i], True)
            full = apply(messages[: i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    f"{where}the tokenizer's chat_template renders turn {i} differently once later turns are "
                    "added (not a prefix), so labels cannot be placed safely; choose a registered template"
                )
            if message.tool_calls:
                segs += self._call_segments(prompt[len(done) :], full[len(prompt) :])
            else:
                segs += self._reply_segments(where, i, prompt[len(done) :], full[len(prompt) :], message.content)
            done = full
        final = apply(messages, add_generation_prompt)
        if not final.startswith(done):
            raise TemplateError(f"{where}the tokenizer's chat_template is not prefix-consistent")
        segs.append((final[len(done) :], False))
        return segs

    def _segments_by_blocks(self, where: str, messages: list[Message], add_generation_prompt: bool):
        """`segments` from one rendering: the prefix renderings are sums of the turn model's blocks (prompt i:
        blocks before i and the generation prompt; full i: blocks up to i). None (take the prefix renderings)
        when the conversation's real rendering is not the blocks' sum, or a reply's block does not start
        with the generation prompt (the prefix renderings then say what is wrong)."""
        found = self._blocks(messages)
        if found is None:
            return None
        blocks, generation = found
        joined = "".join(blocks)
        if self._apply(messages, add_generation_prompt) != joined + (generation if add_generation_prompt else ""):
            return None
        segs: list[Segment] = []
        done = start = 0  # offsets into `joined`: the end of the text segmented, the start of block i
        for i, message in enumerate(messages):
            block = blocks[i]
            if message.role == "assistant":
                if not block.startswith(generation):
                    return None
                segs += self._reply_segments(where, i, joined[done:start] + generation, block[len(generation) :],
                                             message.content)  # fmt: skip
                done = start + len(block)
            start += len(block)
        segs.append((joined[done:] + (generation if add_generation_prompt else ""), False))
        return segs


PROBE_TOOL = {"type": "function", "function": {
    "name": "corral_probe", "description": "A probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}  # fmt: skip
PROBE_CALLS = [ToolCall("call_probe1", "corral_probe", {"x": "corral-probe-1"}),
               ToolCall("call_probe2", "corral_probe", {"x": "corral-probe-2"})]  # fmt: skip


def get_template(name: str, tokenizer) -> SpecFormat | TokenizerFormat:
    """Bind a template by name (`auto`: the tokenizer's own) to a tokenizer."""
    if name == "auto":
        return TokenizerFormat(tokenizer)
    if name not in TEMPLATES:
        raise TemplateError(f"unknown template '{name}'; known: {', '.join(TEMPLATE_NAMES)}")
    return SpecFormat(TEMPLATES[name], tokenizer)
