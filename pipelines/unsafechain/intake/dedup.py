"""Prompt deduplication across sources: exact after normalisation, and near-duplicates
by MinHash LSH over word shingles, verified by their exact Jaccard similarity.

The first prompt seen is kept; later ones that duplicate it are removed. Memory and
time grow linearly with the number of prompts (one signature's band keys and shingle
hashes per kept prompt; candidate pairs come only from shared LSH buckets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from unsafechain.intake.settings import DeduplicationSettings
from unsafechain.intake.sources import PromptRecord
from unsafechain.intake.textmatch import NgramHasher, normalize, text_key

logger = logging.getLogger(__name__)

DUPLICATE_EXACT = "duplicate_exact"
DUPLICATE_NEAR = "duplicate_near"
CONTAMINATED = "contaminated"

# Mersenne prime 2**31 - 1: products of two values below it fit in uint64.
_PRIME = np.uint64((1 << 31) - 1)
# Fixed, so the same prompts are removed on every run and machine.
_SEED = 20250729
# Required probability that a pair at exactly the threshold shares an LSH bucket.
_RECALL_AT_THRESHOLD = 0.995


@dataclass(frozen=True, slots=True)
class Removal:
    """A prompt removed before the build, and why.

    Attributes:
        record: The removed prompt.
        reason: ``duplicate_exact``, ``duplicate_near`` or ``contaminated``.
        duplicate_of: Id of the kept prompt, or of the benchmark prompt, it matches.
        similarity: Shingle Jaccard similarity for near-duplicates, the fraction of
            the prompt's n-grams found in the benchmark for contamination, else 1.
        benchmark: The benchmark it overlaps, for contamination.
        method: How the contamination was found: ``exact``, ``ngram`` or ``tfidf``
            (then ``similarity`` is the cosine); None for duplicates.
    """

    record: PromptRecord
    reason: str
    duplicate_of: str
    similarity: float = 1.0
    benchmark: str | None = None
    method: str | None = None

    def to_row(self) -> dict:
        """The line ``removed.jsonl`` holds for it."""
        return {
            "id": self.record.id,
            "source": self.record.source,
            "uri": self.record.uri,
            "line": self.record.line,
            "text": self.record.text,
            "reason": self.reason,
            "duplicate_of": self.duplicate_of,
            "similarity": round(self.similarity, 4),
            "benchmark": self.benchmark,
            "method": self.method,
        }


def lsh_bands(permutations: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) for LSH: the most rows per band (fewest false candidates) that
    still put a pair at ``threshold`` similarity in one bucket with high probability."""
    best = (permutations, 1)
    for rows in range(1, permutations + 1):
        bands = permutations // rows
        if 1 - (1 - threshold**rows) ** bands >= _RECALL_AT_THRESHOLD:
            best = (bands, rows)
    return best


class Deduplicator:
    """Decides, prompt by prompt in reading order, whether it duplicates one kept."""

    def __init__(self, settings: DeduplicationSettings):
        self._settings = settings
        self._exact: dict[bytes, str] = {}
        self._hasher = NgramHasher(settings.shingle_words)
        rng = np.random.default_rng(_SEED)
        self._a = rng.integers(1, int(_PRIME), settings.permutations, dtype=np.uint64)
        self._b = rng.integers(0, int(_PRIME), settings.permutations, dtype=np.uint64)
        self._bands, self._rows = lsh_bands(settings.permutations, settings.threshold)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self._bands)]
        self._kept_ids: list[str] = []
        self._kept_shingles: list[np.ndarray] = []

    def check(self, record: PromptRecord) -> Removal | None:
        """The removal of ``record`` if it duplicates a kept prompt; otherwise it is
        kept, and later prompts are compared with it."""
        normalized = normalize(record.text)
        key = text_key(normalized)
        first = self._exact.get(key)
        if first is not None:
            return Removal(record, DUPLICATE_EXACT, first)
        self._exact[key] = record.id
        if not self._settings.near:
            return None
        # A prompt shorter than one shingle is its single shingle.
        shingles = self._hasher.hashes(self._hasher.words(normalized), whole_if_short=True)
        if not len(shingles):
            return None
        band_keys = self._band_keys(shingles)
        near = self._nearest(shingles, band_keys)
        if near is not None:
            index, similarity = near
            return Removal(record, DUPLICATE_NEAR, self._kept_ids[index], similarity)
        index = len(self._kept_ids)
        self._kept_ids.append(record.id)
        self._kept_shingles.append(shingles)
        for buckets, band_key in zip(self._buckets, band_keys, strict=True):
            buckets.setdefault(band_key, []).append(index)
        return None

    def _band_keys(self, shingles: np.ndarray) -> list[bytes]:
        values = (shingles >> np.uint64(33)) % _PRIME
        signature = ((self._a[:, None] * values[None, :] + self._b[:, None]) % _PRIME).min(axis=1)
        rows = self._rows
        return [signature[i * rows : (i + 1) * rows].tobytes() for i in range(self._bands)]

    def _nearest(self, shingles: np.ndarray, band_keys: list[bytes]) -> tuple[int, float] | None:
        """The earliest kept prompt at or above the threshold, with its similarity."""
        candidates = sorted(
            {
                i
                for buckets, key in zip(self._buckets, band_keys, strict=True)
                for i in buckets.get(key, ())
            }
        )
        for index in candidates:
            other = self._kept_shingles[index]
            shared = len(np.intersect1d(shingles, other, assume_unique=True))
            similarity = shared / (len(shingles) + len(other) - shared)
            if similarity >= self._settings.threshold:
                return index, similarity
        return None
