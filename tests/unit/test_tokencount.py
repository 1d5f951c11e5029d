"""data/tokencount.py: token counts from cached pre-tokens equal the tokenizer's own, or are not used at all."""

from __future__ import annotations

import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from corral.data import tokencount
from corral.data.clean import token_counts
from corral.data.tokencount import PieceCounts

# Llama 3's pre-token expression (a Split before a ByteLevel without its own expression)
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
WHITESPACE = "\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f\x85\xa0\u1680\u180e\u2000\u2005\u200a\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"


def texts(added: list[str], n: int = 300) -> list[str]:
    """Seeded mixtures of words, digits, code, punctuation, every sort of whitespace, scripts and the added tokens."""
    g = random.Random(0)
    parts = ["hello", "Hello", " world", "it's", "THEY'LL", "don't", "123456", "3.14e-2", "def f(x):", "    return",
             "**bold**", "`code`", "--", "...", "!!!", "東京", "Привет", "١٢٣", "ça", "naïve", "\U0001f600", "\u0301",
             *WHITESPACE, *added]  # fmt: skip
    return [""] + ["".join(g.choice(parts) + g.choice(["", " ", "  ", "\n"]) for _ in range(g.randint(1, 60)))
                   for _ in range(n)]


def own_counts(tokenizer, batch: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]


def trained(pre_tokenizer, normalizer=None, added=("<|im_start|>", "<|im_end|>")) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(added),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts([], 200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_gpt2_style_counts_are_the_tokenizers_own(tiny_tokenizer):
    counter = PieceCounts.of(tiny_tokenizer)
    assert counter is not None and PieceCounts.of(tiny_tokenizer) is counter  # one per tokenizer
    added = [t.content for t in tiny_tokenizer.backend_tokenizer.get_added_tokens_decoder().values()]
    batch = texts(added)
    assert counter(batch) == own_counts(tiny_tokenizer, batch)
    assert counter(batch) == own_counts(tiny_tokenizer, batch)  # from the cache this time
    assert len(counter.lengths) > 100


def test_a_split_expression_before_byte_level_is_followed_too():
    tokenizer = trained(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                           use_regex=False)]))
    counter = PieceCounts.of(tokenizer)
    assert counter is not None and counter.pieces.pattern == LLAMA3
    batch = texts(["<|im_start|>", "<|im_end|>"])
    assert counter(batch) == own_counts(tokenizer, batch)
    assert token_counts(tokenizer, batch) == own_counts(tokenizer, batch)


@pytest.mark.parametrize("case", ["normalizer", "prefix space", "stripped added token", "metaspace"])
def test_definitions_it_cannot_follow_exactly_are_counted_by_the_tokenizer(case):
    if case == "normalizer":
        tokenizer = trained(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizer=normalizers.NFKC())
    elif case == "prefix space":
        tokenizer = trained(pre_tokenizers.ByteLevel(add_prefix_space=True))
    elif case == "metaspace":
        tokenizer = trained(pre_tokenizers.Metaspace())
    else:
        tokenizer = trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken("<tool>", lstrip=True)])
    assert PieceCounts.of(tokenizer) is None
    batch = texts(["<tool>"], 50)
    assert token_counts(tokenizer, batch) == own_counts(tokenizer, batch)


def test_a_full_cache_keeps_counting_right_and_stops_growing(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tokencount, "MAX_CACHED", 50)
    counter = PieceCounts(tiny_tokenizer.backend_tokenizer, tokencount.GPT2_PATTERN, [])
    batch = texts([])
    assert counter(batch[:3] + batch[3:]) == own_counts(tiny_tokenizer, batch)
    assert len(counter.lengths) <= 50
