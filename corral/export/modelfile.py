"""An Ollama Modelfile for an exported GGUF: `FROM`, a Go `TEMPLATE` that renders conversations as
Corral's template does, its stop strings, and sampling defaults.

Ollama formats prompts with Go's text/template over `.Messages`, not with the Jinja chat_template in
the file. Any template Corral uses can be written as the text that comes between messages: what
opens the conversation (before a first system or user message), what comes between a system
message and a user one, a user and an assistant one, an assistant and a user one, and what closes
it (the generation prompt after a user message, the end of turn after an assistant one). Each
message's content goes in between, untouched. For a registered template these pieces come from its
declaration; for `auto` (the tokenizer's own Jinja) they are read off renderings of sample
conversations, which is Ollama's own best effort for templates it does not know, and the Modelfile
says so. Either way the pieces are checked by rendering sample conversations both ways.

The template is written without Go's whitespace trimming (`{{-`), so every newline in it is one the
model sees.
"""

from __future__ import annotations

import json
from dataclasses import astuple, dataclass

from corral.chat.conversation import Conversation
from corral.chat.templates import TEMPLATES, SpecFormat, TemplateError, TemplateSpec, get_template
from corral.export import ExportError


@dataclass(frozen=True)
class Transitions:
    """The text between messages; see the module docstring."""

    open_system: str
    open_user: str
    system_user: str
    user_assistant: str
    assistant_user: str
    close_user: str  # ends with the generation prompt
    close_assistant: str


def _split(fmt: str, name: str) -> tuple[str, str]:
    before, _, after = fmt.partition(name)
    return before, after


def spec_transitions(spec: TemplateSpec) -> Transitions:
    """From a registered template's pieces ({bos}/{eos} already resolved, as `SpecFormat.spec` has them)."""
    sys_pre, sys_post = _split(spec.system, "{content}")
    user_pre, user_post = _split(spec.user, "{content}")
    reply_pre, reply_post = _split(spec.reply, "{content}")
    default = spec.default_system
    if spec.system_in_first_user is None:
        open_system, system_user = spec.start + sys_pre, sys_post + user_pre
        open_user = spec.start + (sys_pre + default + sys_post if default else "") + user_pre
    else:  # llama2: the system prompt opens the first user message
        in_user_pre, rest = _split(spec.system_in_first_user, "{system}")
        in_user_mid, in_user_post = _split(rest, "{content}")
        if in_user_post:
            raise ExportError(f"template '{spec.name}': text after the first user message's content cannot be "
                              "written as an Ollama template")
        open_system, system_user = spec.start + user_pre + in_user_pre, in_user_mid
        open_user = spec.start + user_pre + (in_user_pre + default + in_user_mid if default else "")
    return Transitions(
        open_system=open_system, open_user=open_user, system_user=system_user,
        user_assistant=user_post + spec.assistant_prompt + reply_pre,
        assistant_user=reply_post + spec.after_reply + user_pre,
        close_user=user_post + spec.assistant_prompt, close_assistant=reply_post + spec.after_reply,
    )  # fmt: skip


# Sample messages: words a template copies verbatim and that occur nowhere in its own text.
_SYSTEM, _USER1, _REPLY1, _USER2 = "sampleinstructionzq", "samplequestionzq", "sampleanswerzq", "samplefollowupzq"


def _between(text: str, before: str | None, after: str | None) -> str:
    start = text.index(before) + len(before) if before else 0
    end = text.index(after, start) if after else len(text)
    return text[start:end]


def rendered_transitions(template) -> Transitions:
    """Read off the template's renderings of sample conversations (for `auto`: the tokenizer's Jinja)."""
    def render(*pairs, system=None, prompt=True):
        return template.render_text(Conversation.from_pairs(*pairs, system=system), add_generation_prompt=prompt)

    try:  # any failure of a template Corral did not write (a Jinja error among them) means: no translation
        with_system = render(("user", _USER1), system=_SYSTEM)
        turns = render(("user", _USER1), ("assistant", _REPLY1), ("user", _USER2))
        reply = render(("user", _USER1), ("assistant", _REPLY1), prompt=False)
        return Transitions(
            open_system=_between(with_system, None, _SYSTEM), open_user=_between(turns, None, _USER1),
            system_user=_between(with_system, _SYSTEM, _USER1), user_assistant=_between(turns, _USER1, _REPLY1),
            assistant_user=_between(turns, _REPLY1, _USER2), close_user=_between(turns, _USER2, None),
            close_assistant=_between(reply, _REPLY1, None),
        )  # fmt: skip
    except Exception as e:  # ValueError: a sample word not found, the template rewrites content
        raise ExportError(f"the chat template could not be read off sample conversations ({type(e).__name__}: "
                          f"{e}); write the Modelfile's TEMPLATE by hand") from None


def render_transitions(t: Transitions, conv: Conversation) -> str:
    """What the Go template renders for `conv`, in Python (for checking against the template itself)."""
    out, previous = [], ""
    for message in conv.messages:
        if not previous:
            out.append(t.open_system if message.role == "system" else t.open_user)
        elif message.role == "user":
            out.append(t.system_user if previous == "system" else t.assistant_user)
        else:
            out.append(t.user_assistant)
        out.append(message.content)
        previous = message.role
    out.append(t.close_assistant if previous == "assistant" else t.close_user)
    return "".join(out)


def sample_conversations() -> list[Conversation]:
    pairs = [("user", "Hi there"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke"),
             ("assistant", "Why did the llama cross the road?"), ("user", "Why?")]  # fmt: skip
    return [Conversation.from_pairs(*pairs[:n], system=system) for system in (None, "You are terse.")
            for n in (1, 2, 3, 4, 5)]  # fmt: skip


def reproduces(t: Transitions, template) -> int:
    """How many sample conversations the transitions render exactly as `template` does (all, or an error)."""
    samples = sample_conversations()
    for conv in samples:
        try:
            expected = template.render_text(conv, add_generation_prompt=conv.messages[-1].role == "user")
        except Exception:  # a Jinja template that refuses this conversation (a system message, say)
            return 0
        if render_transitions(t, conv) != expected:
            return 0
    return len(samples)


def registered_format(template, tokenizer) -> SpecFormat | None:
    """The registered template whose Jinja is this `auto` template's (a model Corral saved carries its
    template's Jinja as the tokenizer's chat_template), so its pieces can be used instead of a guess."""
    if isinstance(template, SpecFormat):
        return template
    for name in TEMPLATES:
        try:
            candidate = get_template(name, tokenizer)
        except TemplateError:  # its markers are not single tokens here: it cannot be this model's
            continue
        if candidate.chat_template_jinja == template.chat_template_jinja:
            return candidate
    return None


def _go_text(text: str) -> str:
    if "{{" in text or "}}" in text:  # literal braces: emit as a Go string action instead
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def go_template(t: Transitions) -> str:
    """The Go text/template (Ollama's TEMPLATE) over `.Messages` for these transitions."""
    g = _go_text
    return (
        '{{ $prev := "" }}{{ range .Messages }}'
        f'{{{{ if eq $prev "" }}}}{{{{ if eq .Role "system" }}}}{g(t.open_system)}'
        f'{{{{ else }}}}{g(t.open_user)}{{{{ end }}}}'
        f'{{{{ else if eq .Role "user" }}}}{{{{ if eq $prev "system" }}}}{g(t.system_user)}'
        f'{{{{ else }}}}{g(t.assistant_user)}{{{{ end }}}}'
        f'{{{{ else if eq .Role "assistant" }}}}{g(t.user_assistant)}{{{{ end }}}}'
        '{{ .Content }}{{ $prev = .Role }}{{ end }}'
        f'{{{{ if eq $prev "assistant" }}}}{g(t.close_assistant)}{{{{ else }}}}{g(t.close_user)}{{{{ end }}}}'
    )


def without_leading(t: Transitions, bos: str | None) -> Transitions:
    """The runtime adds BOS itself when the GGUF says so: the template's own leading one is dropped."""
    if not bos:
        return t
    strip = lambda text: text[len(bos):] if text.startswith(bos) else text  # noqa: E731
    return Transitions(strip(t.open_system), strip(t.open_user), *astuple(t)[2:])


def modelfile_text(gguf_name: str, template, tokenizer, add_bos: bool, temperature: float, top_p: float) -> str:
    """The Modelfile beside `gguf_name`. `template` is the bound template (None: the model has no chat
    template, and the prompt goes in as it is)."""
    lines = [f"# Ollama Modelfile for {gguf_name}, written by `corral export gguf`.",
             "# ollama create NAME -f Modelfile && ollama run NAME"]  # fmt: skip
    stops: list[str] = []
    known = registered_format(template, tokenizer) if template is not None else None
    transitions = spec_transitions(known.spec) if known is not None else None
    if template is not None and known is None:
        try:
            transitions = rendered_transitions(template)
        except ExportError as e:
            lines.append(f"# {e}")
    if transitions is None:
        lines.append("# TEMPLATE: no chat template Corral can translate: the prompt is passed as it is.")
        body = "{{ .Prompt }}"
    else:
        if known is not None:
            lines.append(f"# TEMPLATE: Corral's '{known.name}' template, from its pieces (the text Corral trained "
                         "with).")
        else:
            lines.append("# TEMPLATE: the tokenizer's own chat_template, translated by rendering sample conversations "
                         "(best effort,")
            lines.append("# as Ollama does for templates it does not know): it may need checking for conversations "
                         "unlike those samples.")
        if not reproduces(transitions, template):
            if known is not None:
                raise ExportError(f"template '{known.name}' could not be written as an Ollama template")
            lines.append("# WARNING: it does NOT reproduce the chat_template on the sample conversations: check it.")
        runtime_bos = without_leading(transitions, tokenizer.bos_token if add_bos else None)
        if runtime_bos != transitions:
            lines.append(f"# The leading {tokenizer.bos_token} is left out: the runtime adds it, as the GGUF says.")
        body = go_template(runtime_bos)
        stops = list((known or template).stop_strings)
    if '"""' in body:
        raise ExportError('the template contains """, which a Modelfile cannot quote')
    stops = stops or ([tokenizer.eos_token] if tokenizer.eos_token else [])
    lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{body}"""']
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in dict.fromkeys(stops)]
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER top_p {top_p:g}"]
    return "\n".join(lines) + "\n"
