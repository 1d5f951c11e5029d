"""Duplicates: exact (the same id, the same first exchange) and near (MinHash over word shingles).

Chat dumps repeat themselves: the same shared conversation saved twice, a conversation re-shared with a
turn more, the same prompt asked by many users. Exact keys catch the first two cheaply; MinHash with
locality-sensitive hashing (datasketch) catches conversations that differ in a few words, in one pass
and without comparing every pair. The first occurrence is kept, later ones are dropped.

Signatures are computed from word 5-grams (shingles) of the conversation's text. Each distinct word is
hashed once (crc32) and the shingles' hashes are combined with numpy, so the per-shingle work is vectorised;
datasketch's MinHash then applies its permutations and MinHashLSH does the banding.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from functools import lru_cache

import numpy as np

from corral.chat.conversation import Conversation

WORD = re.compile(r"\w+")
SCHEME = "affine32"  # datasketch's MinHash scheme for 32-bit input hashes (shingle_hashes)
SPACES = re.compile(r"\s+")


def normalise_key_text(text: str) -> str:
    """Case and spacing do not make a conversation different."""
    return SPACES.sub(" ", text.casefold()).strip()


def first_exchange_key(conv: Conversation) -> bytes:
    """A digest of the normalised system prompt, first user turn and first reply."""
    parts = [conv.system or ""] + [m.content for m in conv.turns[:2]]
    return hashlib.blake2b("\x00".join(normalise_key_text(p) for p in parts).encode("utf-8", "replace"),
                           digest_size=16).digest()  # fmt: skip


def conversation_text(conv: Conversation) -> str:
    return "\n".join(m.content for m in conv.messages)


def shingle_hashes(text: str, shingle: int = 5, max_words: int = 5000) -> np.ndarray:
    """32-bit hashes of the distinct word `shingle`-grams of the first `max_words` words (0: all)."""
    words = WORD.findall(text.casefold())
    if max_words:
        words = words[:max_words]
    if not words:
        return np.zeros(0, dtype=np.uint32)
    # Each distinct word hashed once: chat text repeats its words (a few hundred distinct in a thousand).
    crc = {word: zlib.crc32(word.encode("utf-8", "replace")) for word in set(words)}
    word_hashes = np.fromiter(map(crc.__getitem__, words), dtype=np.uint64, count=len(words))
    k = min(shingle, len(words))
    combined = np.zeros(len(words) - k + 1, dtype=np.uint64)
    for j in range(k):  # polynomial hash of each window, wrapping at 2**64, then folded to 32 bits
        combined = combined * np.uint64(1_000_003) + word_hashes[j : len(words) - k + 1 + j]
    return np.unique((combined ^ (combined >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _identity(value):
    return value


@lru_cache(maxsize=4)
def _permutations(num_perm: int, seed: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


def signature(text: str, num_perm: int = 128, shingle: int = 5, max_words: int = 5000, seed: int = 1) -> np.ndarray:
    """The MinHash signature (num_perm uint64 values) of `text`'s word shingles."""
    from datasketch import MinHash

    minhash = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, permutations=_permutations(num_perm, seed),
                      scheme=SCHEME)
    hashes = shingle_hashes(text, shingle, max_words)
    if len(hashes):
        minhash.update_batch(hashes.tolist())
    return minhash.hashvalues


class NearDuplicates:
    """An LSH index of the signatures seen so far: `check(name, sig)` returns the name of an earlier
    near-duplicate (estimated Jaccard similarity of shingles at or above `threshold`), or adds `sig`."""

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.seed = seed
        self.names: list[str] = []  # LSH keys are indices into this: small, and ordered by arrival

    def check(self, name: str, sig: np.ndarray) -> str | None:
        from datasketch import LeanMinHash

        minhash = LeanMinHash(seed=self.seed, hashvalues=sig, scheme=SCHEME)
        found = self.lsh.query(minhash)
        if found:
            return self.names[min(found)]  # the earliest, whatever order the index returns them in
        self.lsh.insert(len(self.names), minhash)
        self.names.append(name)
        return None
