"""Prompt deduplication across sources: exact after normalisation, and near-duplicates
by MinHash LSH over word shingles, verified by their exact Jaccard similarity.

The first prompt seen is kept; later ones that duplicate it are removed. Memory and
time grow linearly with the number of prompts (per kept prompt: its shingle hashes and
one 64-bit key per LSH band, in flat NumPy arrays, a few hundred bytes; candidate pairs
come only from shared LSH buckets).
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from hashlib import blake2b

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


class BandIndex:
    """LSH buckets in flat arrays: which kept prompts share a band key.

    A bucket is a band's key (its rows of the MinHash signature, hashed to 64 bits with
    the band's number); each distinct key has one slot of an open-addressing table
    (linear probing, at most half full), which holds the bucket's newest entry; each
    entry (a kept prompt's band) holds its key and links to the previous entry of its
    bucket. That is 4 bytes per slot and 8 + 4 per entry (the key kept with the entry,
    not in the slot, since the table has two to four slots per entry), where a
    dictionary of lists of Python objects took about 270 bytes per band of a prompt.
    Two different band keys that hash alike only add a candidate, which the exact
    similarity check then rejects. The tables are ``array`` arrays: read one value at
    a time from Python, they cost a fraction of NumPy's per-element indexing.

    Args:
        bands: Bands per signature.
        rows: Signature values per band.
    """

    _EMPTY = -1

    def __init__(self, bands: int, rows: int):
        self.bands, self.rows = bands, rows
        self._persons = [band.to_bytes(4, "little") for band in range(bands)]
        self._capacity = 1 << 12
        self._heads = array("i", [self._EMPTY]) * self._capacity
        self._used = 0
        self._links = array("i")
        self._entry_keys = array("Q")

    def keys(self, signature: np.ndarray) -> list[int]:
        """The band keys of a MinHash ``signature``: each band's values hashed to 64
        bits (BLAKE2b, personalised with the band's number)."""
        raw = signature[: self.bands * self.rows].tobytes()
        width = len(raw) // self.bands
        return [
            int.from_bytes(
                blake2b(raw[i * width : (i + 1) * width], digest_size=8, person=person).digest(),
                "little",
            )
            for i, person in enumerate(self._persons)
        ]

    def lookup(self, keys: list[int]) -> tuple[list[int], set[int]]:
        """The slots of ``keys`` (where each is, or would go), and the kept prompts
        (their positions) that share a bucket with them."""
        if 2 * (self._used + len(keys)) > self._capacity:
            self._grow()
        heads, table, links = self._heads, self._entry_keys, self._links
        mask, bands, empty = self._capacity - 1, self.bands, self._EMPTY
        slots = []
        found: set[int] = set()
        for key in keys:
            slot = key & mask
            # Inlined linear probing: this loop is most of the intake's time.
            while (entry := heads[slot]) != empty and table[entry] != key:
                slot = (slot + 1) & mask
            slots.append(slot)
            while entry != empty:
                found.add(entry // bands)
                entry = links[entry]
        return slots, found

    def add(self, keys: list[int], slots: list[int]) -> None:
        """Index the next kept prompt's band ``keys``, at the ``slots`` that
        :meth:`lookup` gave (no other prompt added since)."""
        heads, table = self._heads, self._entry_keys
        first = len(self._links)
        for band, (key, slot) in enumerate(zip(keys, slots, strict=True)):
            if heads[slot] != self._EMPTY and table[heads[slot]] != key:
                # An earlier band of this prompt took the empty slot this key was to have.
                slot = self._find(key)
            if heads[slot] == self._EMPTY:
                self._used += 1
            self._links.append(heads[slot])
            table.append(key)
            heads[slot] = first + band

    def _find(self, key: int) -> int:
        """The slot holding ``key``, or the empty slot where it goes."""
        heads, table, mask = self._heads, self._entry_keys, self._capacity - 1
        slot = key & mask
        while heads[slot] != self._EMPTY and table[heads[slot]] != key:
            slot = (slot + 1) & mask
        return slot

    def _grow(self) -> None:
        heads, table = self._heads, self._entry_keys
        self._capacity *= 2
        self._heads = array("i", [self._EMPTY]) * self._capacity
        for head in heads:
            if head != self._EMPTY:
                self._heads[self._find(table[head])] = head


class ExactIndex:
    """The digests of normalised texts, each with the id of the first record that had
    it, in flat arrays: an open-addressing table (linear probing, at most half full)
    of entry numbers, and per entry its 16-byte digest and its id's UTF-8 bytes. That
    is about 60 bytes a text where a dictionary of ``bytes`` keys and ``str`` ids took
    about 170.
    """

    _EMPTY = -1

    def __init__(self) -> None:
        self._capacity = 1 << 12
        self._slots = array("i", [self._EMPTY]) * self._capacity
        self._low = array("Q")
        self._high = array("Q")
        self._ids = bytearray()
        self._id_ends = array("q")

    def __len__(self) -> int:
        return len(self._low)

    def first(self, key: bytes, record_id: str) -> int | None:
        """The entry of the first text with digest ``key``, or None if there was none:
        then ``key`` is added, with ``record_id``, as the next entry."""
        low = int.from_bytes(key[:8], "little")
        high = int.from_bytes(key[8:16], "little")
        slot = self._find(low, high)
        entry = self._slots[slot]
        if entry != self._EMPTY:
            return entry
        self._slots[slot] = len(self._low)
        self._low.append(low)
        self._high.append(high)
        self._ids += record_id.encode()
        self._id_ends.append(len(self._ids))
        if 2 * len(self._low) > self._capacity:
            self._grow()
        return None

    def id(self, entry: int) -> str:
        """The record id of ``entry``."""
        start = self._id_ends[entry - 1] if entry else 0
        return self._ids[start : self._id_ends[entry]].decode()

    def _find(self, low: int, high: int) -> int:
        """The slot holding the digest, or the empty slot where it goes."""
        slots, lows, highs = self._slots, self._low, self._high
        mask = self._capacity - 1
        slot = low & mask
        while (entry := slots[slot]) != self._EMPTY and (
            lows[entry] != low or highs[entry] != high
        ):
            slot = (slot + 1) & mask
        return slot

    def _grow(self) -> None:
        self._capacity *= 2
        self._slots = array("i", [self._EMPTY]) * self._capacity
        for entry, (low, high) in enumerate(zip(self._low, self._high, strict=True)):
            self._slots[self._find(low, high)] = entry


class Deduplicator:
    """Decides, prompt by prompt in reading order, whether it duplicates one kept."""

    def __init__(self, settings: DeduplicationSettings):
        self._settings = settings
        self._exact = ExactIndex()
        self._hasher = NgramHasher(settings.shingle_words)
        rng = np.random.default_rng(_SEED)
        self._a = rng.integers(1, int(_PRIME), settings.permutations, dtype=np.uint64)
        self._b = rng.integers(0, int(_PRIME), settings.permutations, dtype=np.uint64)
        self._index = BandIndex(*lsh_bands(settings.permutations, settings.threshold))
        # The exact index's entry of each kept prompt (which holds its id).
        self._kept: array[int] = array("i")
        # Every kept prompt's sorted shingle hashes, end to end; prompt i's are
        # _shingles[_starts[i]:_starts[i + 1]]. An ``array``, not a NumPy array grown
        # by doubling: it grows by a sixteenth, in place (a large block is remapped,
        # not copied), where doubling held up to three times the hashes while it grew.
        self._shingles = array("Q")
        self._starts = array("q", [0])

    def check(self, record: PromptRecord) -> Removal | None:
        """The removal of ``record`` if it duplicates a kept prompt; otherwise it is
        kept, and later prompts are compared with it."""
        normalized = normalize(record.text)
        key = text_key(normalized)
        first = self._exact.first(key, record.id)
        if first is not None:
            return Removal(record, DUPLICATE_EXACT, self._exact.id(first))
        if not self._settings.near:
            return None
        # A prompt shorter than one shingle is its single shingle.
        shingles = self._hasher.hashes(self._hasher.words(normalized), whole_if_short=True)
        if not len(shingles):
            return None
        band_keys = self._index.keys(self._signature(shingles))
        slots, candidates = self._index.lookup(band_keys)
        near = self._nearest(shingles, candidates)
        if near is not None:
            index, similarity = near
            return Removal(record, DUPLICATE_NEAR, self._exact.id(self._kept[index]), similarity)
        self._kept.append(len(self._exact) - 1)
        self._keep_shingles(shingles)
        self._index.add(band_keys, slots)
        return None

    def _signature(self, shingles: np.ndarray) -> np.ndarray:
        values = (shingles >> np.uint64(33)) % _PRIME
        return ((self._a[:, None] * values[None, :] + self._b[:, None]) % _PRIME).min(axis=1)

    def _keep_shingles(self, shingles: np.ndarray) -> None:
        # No view of the array may be alive here: an array that exports its buffer
        # cannot grow (the views _nearest makes end with it).
        self._shingles.frombytes(shingles.astype(np.uint64, copy=False).tobytes())
        self._starts.append(len(self._shingles))

    def _nearest(self, shingles: np.ndarray, candidates: set[int]) -> tuple[int, float] | None:
        """The earliest candidate at or above the threshold, with its similarity."""
        for index in sorted(candidates):
            start = self._starts[index]
            other = np.frombuffer(
                self._shingles,
                dtype=np.uint64,
                count=self._starts[index + 1] - start,
                offset=start * self._shingles.itemsize,
            )
            shared = len(np.intersect1d(shingles, other, assume_unique=True))
            similarity = shared / (len(shingles) + len(other) - shared)
            if similarity >= self._settings.threshold:
                return index, similarity
        return None
