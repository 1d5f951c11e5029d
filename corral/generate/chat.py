"""Conversations into an engine: rendered by the chat template the model was trained with, stopping at
its end-of-turn.

Engines take token ids; these helpers are where a `Conversation` becomes ids (the same template
code SFT trained with) and where the template's end-of-turn tokens and strings join the request's
own stops, so every caller (server, terminal chat, answers, PPO rollouts) stops a reply alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from corral.chat.conversation import Conversation
from corral.chat.templates import SpecFormat, TokenizerFormat
from corral.generate.sampling import SamplingParams
from corral.generate.types import Engine, Stream

ChatTemplate = SpecFormat | TokenizerFormat  # what `corral.chat.templates.get_template` returns


def submit_chat(engine: Engine, template: ChatTemplate, conversation: Conversation, params: SamplingParams,
                adapter: str | None = None, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
    """Submit a conversation (ending with a user message), rendered by `template`, which also adds its
    end-of-turn stops. Raises TemplateError for a conversation the template refuses."""
    return engine.submit(template.render(conversation), with_template_stops(params, template), adapter=adapter,
                         loop=loop)


def generate_replies(engine: Engine, template: ChatTemplate, conversations: list[Conversation],
                     params: SamplingParams) -> list[str]:
    """One reply per conversation (each ending with a user message), rendered with `template`."""
    params = with_template_stops(params, template)
    results = engine.generate([template.render(c) for c in conversations], params)
    return [choices[0].text.strip() for choices in results]


def with_template_stops(params: SamplingParams, template: ChatTemplate) -> SamplingParams:
    """The template's end-of-turn tokens and strings added to the request's own stops. A stop string
    that is one end-of-turn token is left out: the token already stops the reply, sooner."""
    single_token = set(template.stop_token_ids)
    strings = tuple(s for s in template.stop_strings if s and not _is_one_token(template.tokenizer, s, single_token))
    return replace(
        params,
        stop_token_ids=tuple(sorted(set(params.stop_token_ids) | single_token)),
        stop=tuple(dict.fromkeys(params.stop + strings)),
    )


def _is_one_token(tokenizer, text: str, ids: set[int]) -> bool:
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(encoded) == 1 and encoded[0] in ids
