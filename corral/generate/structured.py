"""Structured outputs: replies constrained to JSON, or to a JSON schema, by a token mask (xgrammar).

xgrammar (the structured-output library vLLM uses; it runs on CPU) compiles a schema into a grammar
over the tokenizer's vocabulary once, and a matcher per reply then gives, at each step, the bitmask of
tokens that keep the text a valid prefix. The engine applies each constrained row's mask to that row's
logits inside the continuous batch, so constrained and free rows share every step, and feeds the
sampled token back to the row's matcher. When the JSON is complete only the reply's stop tokens remain
allowed, so a constrained reply ends by itself.

Whitespace between JSON tokens is not free: replies are compact JSON (`{"a": 1}` spacing). With free
whitespace a small model can emit newlines until max_tokens, and the text never parses.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class ResponseFormat:
    """What a reply must be: any JSON object (`json_object`) or JSON valid under `schema` (`json_schema`)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None  # the JSON schema, as JSON text (hashable, so compiled grammars are cached by it)

    @classmethod
    def json_schema(cls, schema: dict) -> ResponseFormat:
        return cls("json_schema", json.dumps(schema))  # key order kept: it is the order properties are written in


class StructuredError(ValueError):
    """A schema xgrammar cannot compile; the message says why."""


class Grammars:
    """Compiled response formats for one tokenizer, and the per-reply matchers built from them.

    `vocab_size` is the model's logits width (it may exceed the tokenizer's length: padded embeddings);
    the masks have that width. Compiling is the slow part (milliseconds to a second for a large
    schema), done once per distinct format; a matcher is cheap."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
        self._compiled: dict[ResponseFormat, object] = {}
        self._lock = threading.Lock()  # requests are prepared in several server threads

    def compile(self, fmt: ResponseFormat):
        with self._lock:
            if fmt not in self._compiled:
                try:
                    if fmt.kind == "json_object":
                        grammar = self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                    else:
                        grammar = self._compiler.compile_json_schema(fmt.schema, any_whitespace=False, strict_mode=True)
                except Exception as e:  # xgrammar raises RuntimeError/ValueError with the reason
                    reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e)).strip()  # its C++ log prefix
                    raise StructuredError(f"response_format: the JSON schema cannot be used: {reason}") from None
                self._compiled[fmt] = grammar
            return self._compiled[fmt]

    def matcher(self, fmt: ResponseFormat, stop_ids: frozenset[int]):
        """A fresh matcher for one reply; the grammar's end allows exactly this reply's stop tokens."""
        return self._xgr.GrammarMatcher(self.compile(fmt), override_stop_tokens=sorted(stop_ids))

    def apply(self, logits: torch.Tensor, matchers: list) -> None:
        """Mask, in place, the logits rows (B, V) whose matcher is not None to the tokens their grammar allows."""
        rows = [r for r, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for r in rows:
            matchers[r].fill_next_token_bitmask(bitmask, r)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=rows)
