"""Content filters for chat data: which turn of a conversation is bad, and why; and its language.

A bad reply is a failed generation saved as if it were one ("Too many requests in 1 hour"), an empty or
too-short reply, a blocklisted phrase, or a numbered list whose items each restart at 1 (the export lost
the numbering; FastChat's filter_wrong_format). An empty user turn is bad too. `first_bad_turn` names
the first one, so the caller can keep the exchanges before it or drop the conversation.

Language detection uses py3langid: a maintained fork (2024-) of langid.py, pure Python on numpy with its
model inside the wheel (no download at run time, nothing to compile), deterministic, 97 languages, and
fast enough to run on every conversation. FastChat used polyglot + pycld2, which need ICU and a C++
build and are no longer maintained.
"""

from __future__ import annotations

import re
from functools import lru_cache

from corral.chat.conversation import Conversation
from corral.data.text import strip_code_blocks

ERROR_REPLIES = (
    "Too many requests in 1 hour",
    "Too many requests, please slow down",
    "network error",
    "An error occurred. If this issue persists",
    "Something went wrong",
    "There was an error generating a response",
    "Hmm...something seems to have gone wrong",
    "Load failed",
    "Conversation not found",
    "The message you submitted was too long",
)
ERROR_SLACK = 200  # an error reply is the error message and little else
NUMBERED_ITEM = re.compile(r"^\s{0,3}(\d{1,3})[.)]\s", re.MULTILINE)


def is_error_reply(text: str, phrases) -> str | None:
    """The error phrase `text` starts with (case-insensitive, after leading punctuation), if it is little
    more than that phrase: "network error" is one, a reply explaining network errors is not."""
    head = text.lstrip(" \t\n!.").lower()
    for phrase in phrases:
        if head.startswith(phrase.lower()) and len(head) <= len(phrase) + ERROR_SLACK:
            return phrase
    return None


def numbering_restarts(text: str) -> bool:
    """True when a numbered item "1." directly follows another "1." (outside code blocks): each item became
    a list of its own. A second list that counts 1, 2, 3 again after a first one is fine."""
    previous = None
    for match in NUMBERED_ITEM.finditer(strip_code_blocks(text)):
        number = int(match.group(1))
        if number == 1 and previous == 1:
            return True
        previous = number
    return False


def first_bad_turn(conv: Conversation, error_phrases=(), min_reply_chars: int = 1, blocklist=(),
                   wrong_list_numbering: bool = True) -> tuple[int, str, str] | None:
    """(index into conv.turns, reason, detail) of the first bad turn, or None when every turn is fine."""
    blocked = [phrase.lower() for phrase in blocklist]
    for i, message in enumerate(conv.turns):
        text = message.content.strip()
        if message.role == "user":
            if not text:
                return i, "empty user turn", ""
            continue
        if not text:
            return i, "empty reply", ""
        if len(text) < min_reply_chars:
            return i, "too-short reply", f"{len(text)} characters: {text!r}"
        phrase = is_error_reply(text, error_phrases)
        if phrase:
            return i, "error reply", phrase
        lowered = text.lower() if blocked else ""
        hit = next((phrase for phrase in blocked if phrase in lowered), None)
        if hit:
            return i, "blocklisted phrase", hit
        if wrong_list_numbering and numbering_restarts(text):
            return i, "list numbering restarts", ""
    return None


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(conv: Conversation, max_chars: int = 1000, min_confidence: float = 0.5) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the conversation's text without code blocks, read up to `max_chars`;
    `unknown` when there is no text or the detector is less sure than `min_confidence`."""
    parts: list[str] = []
    read = 0
    for message in conv.turns:  # only as many messages as it takes: a long chat's language shows early
        parts.append(strip_code_blocks(message.content))
        read += len(parts[-1])
        if read >= max_chars:
            break
    text = "\n".join(parts)[:max_chars]
    if not text.strip():
        return "unknown", 0.0
    language, probability = _identifier().classify(text)
    return (language if probability >= min_confidence else "unknown"), float(probability)
