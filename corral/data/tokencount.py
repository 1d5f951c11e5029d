"""How many tokens texts make, faster than tokenizing them, for `data clean`'s split.

A byte-level BPE tokenizer (GPT-2's, SmolLM2's, Llama 3's, Qwen2's) cuts a text into pre-tokens with
one regular expression, after taking out its added tokens (`<|im_start|>`, ...), and runs BPE on each
pre-token alone. So a text's length is the number of its added tokens plus the sum of its pre-tokens'
lengths, and a pre-token's length never changes: `PieceCounts` cuts texts with the tokenizer's own
expression (read from its definition, compiled by the `regex` package, which knows `\\p{L}` as the
Rust tokenizer's Oniguruma does), and tokenizes only pre-tokens it has not met before (through the
tokenizer), keeping their lengths. Words repeat, so most pre-tokens are looked up: 0.97 s against
3.1 s for the tokenizer's own batch call (one thread) on 9 MB of `bench/data.py`'s cleaned chat text,
SmolLM2's tokenizer, 2 Zen 4 cores; that text's vocabulary is small (a generated file), so real chats,
with more distinct words, gain less.

Only where the definition says exactly this: a BPE model with no normalizer, a ByteLevel pre-tokenizer
(GPT-2's expression, no prefix space) or a Split by an expression (isolated, not inverted) followed by a
ByteLevel that uses no expression of its own, and added tokens without strip or single-word rules. At
construction the counts of a probe text (Unicode letters, digits, whitespace runs, code, contractions,
the added tokens) are checked against the tokenizer's own; any difference, and the caller tokenizes as
before (`PieceCounts.of` returns None).
"""

from __future__ import annotations

import json
import weakref

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MAX_CACHED = 500_000  # distinct pre-tokens kept (a few tens of MB); past it new ones are tokenized each time
PROBE = ("Hello, world! It's  a test:\n\n```python\ndef f(x):\n\treturn x**2  # ok\n```\n"
         "Ünïcödé — ça va? 東京は晴れ。 Привет, мир! ١٢٣ 4567 89.0e-3 \u00a0\u2003\u3000 x\r\n\r\n"
         "   leading and trailing   \n\n\n- item 1\n- item 2 they'll we've I'm she'd YOU'RE \U0001f600!!")

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> PieceCounts or None


def _pattern(pre: dict | None) -> str | None:
    """The pre-token expression of a tokenizer definition's `pre_tokenizer`, where it is one we can follow."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and "Regex" in split.get("pattern", {}) and byte_level.get("type") == "ByteLevel"
                and not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    return None


class PieceCounts:
    """Token counts of texts (no special tokens added) through a byte-level BPE tokenizer: see the module."""

    def __init__(self, backend, pattern: str, added: list[str]):
        self.backend = backend
        self.pieces = regex.compile(pattern)
        self.added = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(added, key=len, reverse=True)) + ")") \
            if added else None
        self.lengths: dict[str, int] = {}

    @classmethod
    def of(cls, tokenizer) -> PieceCounts | None:
        """The counter for `tokenizer` (made once per tokenizer), or None where its definition is not one this
        follows exactly."""
        try:
            return _CACHE[tokenizer]
        except (KeyError, TypeError):
            pass
        counter = cls._make(tokenizer)
        try:
            _CACHE[tokenizer] = counter
        except TypeError:  # not weakly referable: made again next time
            pass
        return counter

    @classmethod
    def _make(cls, tokenizer) -> PieceCounts | None:
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is None or getattr(tokenizer, "split_special_tokens", False):
            return None
        spec = json.loads(backend.to_str())
        pattern = _pattern(spec.get("pre_tokenizer"))
        model = spec.get("model", {})
        if pattern is None or spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
            return None
        added = spec.get("added_tokens", [])
        if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
            return None
        counter = cls(backend, pattern, [t["content"] for t in added])
        probe = [PROBE, PROBE.join(t["content"] for t in added[:8]), " ".join(PROBE.split())]
        own = [len(backend.encode(text, add_special_tokens=False).ids) for text in probe]  # no batch: no threads
        return counter if counter(probe) == own else None

    def __call__(self, texts: list[str]) -> list[int]:
        split = [self._split(text) for text in texts]
        new = list(dict.fromkeys(p for added, pieces in split for p in pieces if p not in self.lengths))
        lengths = self.lengths
        if new:
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            found = dict(zip(new, (len(e.ids) for e in encode(new, add_special_tokens=False))))
            if len(lengths) + len(found) <= MAX_CACHED:
                lengths.update(found)
            else:  # full: these are counted this once and kept nowhere
                lengths = {**lengths, **found}
        return [added + sum(map(lengths.__getitem__, pieces)) for added, pieces in split]

    def _split(self, text: str) -> tuple[int, list[str]]:
        """(added tokens in text, its other pre-tokens)."""
        if self.added is None:
            return 0, self.pieces.findall(text)
        parts = self.added.split(text)  # text, token, text, ...: the tokens at odd places
        pieces = []
        for part in parts[::2]:
            if part:
                pieces += self.pieces.findall(part)
        return len(parts) // 2, pieces
