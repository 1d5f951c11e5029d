"""The tokenizer as GGUF metadata, so that llama.cpp, Ollama and transformers' GGUF reader cut text
into the ids the model was trained on.

A GGUF file carries no tokenizer.json: the vocabulary, the merges, a type per token and the special
token ids are metadata under llama.cpp's key names, and `tokenizer.ggml.model` says which algorithm
runs over them. Two kinds of BPE tokenizer cover the Llama family:

- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): `gpt2`, with the merges, and `tokenizer.ggml.pre`
  naming the pre-tokenizer regex, which llama.cpp keeps as a table of names rather than reading a
  regex from the file;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral): `llama`, with a score per token,
  since llama.cpp merges the best-scoring pair first instead of reading merges.

Everything is read from the loaded tokenizer itself (its backend's JSON and its behaviour), not from
files beside it, so an adapter's tokenizer or an in-memory one exports the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gguf import TokenType

from corral.export import ExportError

SPIECE_SPACE = "\u2581"  # SentencePiece's visible space

# llama.cpp pre-tokenizer names for a byte-level BPE whose text is first split by a regex (a `Split`
# pre-tokenizer before a regex-less `ByteLevel`). The regexes are the ones transformers' GGUF reader
# applies for each name, so that reader rebuilds exactly the split the tokenizer makes.
SPLIT_PRE_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o")


@dataclass
class GGUFVocab:
    """What `write_vocab` puts in the file: one token, type and (for `llama`) score per embedding row."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str]  # "left right", in rank order
    scores: list[float] | None  # `llama` only
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool


def _split_regexes() -> dict[str, str]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older transformers: only the splits named without a regex are recognised
        return {}
    return {name: GGUF_PRE_TOKENIZER_SPLITS[name] for name in SPLIT_PRE_NAMES if name in GGUF_PRE_TOKENIZER_SPLITS}


def byte_level_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for this byte-level pre-tokenizer (`tokenizer.json`'s `pre_tokenizer`), or an error."""
    parts = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer and pre_tokenizer["type"] == "Sequence" else (
        [pre_tokenizer] if pre_tokenizer else [])
    kinds = [p["type"] for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        for name, known in _split_regexes().items():
            if regex == known:
                return name
    raise ExportError(
        f"the tokenizer's byte-level pre-tokenizer ({json.dumps(pre_tokenizer)[:300]}) is not one llama.cpp "
        f"knows by name; recognised: GPT-2's ByteLevel regex, SmolLM's digits + ByteLevel, and the split regexes "
        f"of {', '.join(SPLIT_PRE_NAMES)}"
    )


def _merge_strings(merges: list) -> list[str]:
    # tokenizer.json writes merges as ["a", "b"] pairs (tokenizers >= 0.20) or as "a b" strings.
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds(tokenizer, token_id: int | None, at: int) -> bool:
    """Whether the tokenizer puts `token_id` at index `at` (0 or -1) of an encoding by itself."""
    if token_id is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(special) > len(plain) and special[at] == token_id


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """The tokenizer as GGUF tokens, one per embedding row (`vocab_size`): rows without a token are `[PADi]`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizers backend (tokenizer.json)")
    state = json.loads(backend.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"the tokenizer is a {model.get('type')} model; GGUF export handles BPE tokenizers "
                          "(byte-level, or SentencePiece-style with byte fallback)")
    byte_level = "ByteLevel" in json.dumps(state.get("pre_tokenizer")) + json.dumps(state.get("decoder"))
    if not byte_level and not model.get("byte_fallback"):
        raise ExportError("the tokenizer is BPE but neither byte-level nor SentencePiece-style (byte_fallback); "
                          "llama.cpp has no matching tokenizer")
    by_id = {i: token for token, i in model["vocab"].items()}
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    if max([*by_id, *added], default=-1) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max([*by_id, *added])} but the model's embedding has "
                          f"{vocab_size} rows")
    unk_id = tokenizer.unk_token_id
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            special = added[i].get("special")
            types.append(TokenType.UNKNOWN if not byte_level and i == unk_id else
                         TokenType.CONTROL if special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            is_byte = not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", by_id[i])
            types.append(TokenType.BYTE if is_byte else TokenType.UNKNOWN if i == unk_id else TokenType.NORMAL)
        else:  # an embedding row past the tokenizer (vocabularies padded to a multiple of 64 or 128)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = _merge_strings(model.get("merges", []))
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])[:1]
    return GGUFVocab(
        model="gpt2" if byte_level else "llama",
        pre=byte_level_pre(state.get("pre_tokenizer")) if byte_level else "default",
        tokens=tokens, types=[int(t) for t in types], merges=merges,
        scores=None if byte_level else merge_scores(tokens, merges),
        add_bos=_adds(tokenizer, tokenizer.bos_token_id, 0), add_eos=_adds(tokenizer, tokenizer.eos_token_id, -1),
        add_space_prefix=not byte_level and bool(first) and first[0].startswith(SPIECE_SPACE),
    )  # fmt: skip


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """A score per token for llama.cpp's SentencePiece tokenizer, which joins the adjacent pair whose joined
    token scores highest: a token made by the merge of rank r scores -r, so pairs join in BPE's order. Tokens no
    merge makes (characters, bytes, special tokens) are never the result of a join; they score below all."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def write_vocab(writer, vocab: GGUFVocab, tokenizer, eot_id: int | None, chat_template: str | None) -> None:
    """The tokenizer keys: model, pre-tokenizer, tokens, types, merges or scores, special ids, chat template."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_eot_token_id, eot_id)):  # fmt: skip
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)
