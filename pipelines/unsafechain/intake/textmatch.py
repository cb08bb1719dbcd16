"""Prompt text normalisation and word n-gram hashing, shared by deduplication and
decontamination so that both compare prompts the same way."""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
# Odd multipliers of a polynomial hash over word hashes; uint64 arithmetic wraps.
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def _is_edge(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def normalize(text: str) -> str:
    """The form two prompts must share to be exact duplicates: Unicode NFKC,
    casefolded, whitespace runs collapsed to one space, surrounding punctuation and
    quotes stripped."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def text_key(normalized: str) -> bytes:
    """A short digest of a normalised text, to index many texts in little memory."""
    return hashlib.blake2b(normalized.encode(), digest_size=16).digest()


WORD_CACHE = 1 << 15
"""The most word hashes an :class:`NgramHasher` keeps: a natural language's frequent
words fit, and the cache costs about 6 MB at most (a word and its hash take about 200
bytes in a dict; 131,072 of them were a quarter of the intake's memory at 100,000
prompts)."""


class NgramHasher:
    """Hashes of a text's word n-grams, deterministic across processes.

    Each distinct word is hashed once with ``hashlib`` and cached; an n-gram's hash
    combines its words' hashes, so hashing stays linear in the number of words. The
    cache is emptied when it holds :data:`WORD_CACHE` words, so that a corpus with an
    ever-growing vocabulary (names, numbers, made-up words) does not grow it without
    bound.
    """

    def __init__(self, n: int):
        self.n = n
        self._powers = np.array(
            [pow(int(_MULTIPLIER), k, 1 << 64) for k in range(n)], dtype=np.uint64
        )
        self._words: dict[str, int] = {}

    def words(self, normalized: str) -> list[str]:
        """The words of a normalised text."""
        return _WORD.findall(normalized)

    def hashes(self, words: list[str], *, whole_if_short: bool = False) -> np.ndarray:
        """The sorted distinct hashes (uint64) of the word n-grams.

        Args:
            words: The text's words.
            whole_if_short: Make a text shorter than ``n`` words one n-gram of all its
                words, instead of giving no n-grams.
        """
        n = min(self.n, len(words)) if whole_if_short else self.n
        if n == 0 or len(words) < n:
            return np.empty(0, dtype=np.uint64)
        word_hashes = np.fromiter((self._word(w) for w in words), np.uint64, len(words))
        count = len(words) - n + 1
        grams = np.zeros(count, dtype=np.uint64)
        for k in range(n):
            grams += word_hashes[k : k + count] * self._powers[k]
        return np.unique(grams)

    def _word(self, word: str) -> int:
        value = self._words.get(word)
        if value is None:
            if len(self._words) >= WORD_CACHE:
                self._words.clear()
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            value = self._words[word] = int.from_bytes(digest, "little")
        return value
