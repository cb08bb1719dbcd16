"""Decontamination: removing prompts that overlap an evaluation benchmark.

Benchmark prompts are read with the same readers and loaders as sources. A prompt is
contaminated when it equals a benchmark prompt after normalisation, when more than
the configured fraction of its word n-grams occur in one benchmark, or when its TF-IDF
cosine similarity to one benchmark prompt reaches the configured threshold.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

from unsafechain.intake.dedup import CONTAMINATED, Removal
from unsafechain.intake.settings import DecontaminationSettings
from unsafechain.intake.sources import PromptRecord, Rejection, read_source
from unsafechain.intake.textmatch import NgramHasher, normalize, text_key

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")


class Decontaminator:
    """The benchmarks' prompts indexed by normalised text and by word n-gram.

    Attributes:
        prompts_by_benchmark: Benchmark prompts read, per benchmark.
        rejected_by_benchmark: Benchmark records that could not be read, per benchmark.
    """

    def __init__(
        self,
        settings: DecontaminationSettings,
        benchmarks: Iterable[tuple[str, Iterable[PromptRecord | Rejection]]] | None = None,
    ):
        """Read every benchmark and index its prompts.

        Args:
            settings: The benchmarks and how a prompt matches one.
            benchmarks: Prompts to index instead of the configured benchmark files, as
                (benchmark name, records) pairs: the held-out test split.

        Raises:
            SourceError: A benchmark file cannot be read at all.
        """
        self._settings = settings
        self._hasher = NgramHasher(settings.ngram)
        self._exact: dict[bytes, tuple[str, str]] = {}
        # Per benchmark, in config order: n-gram hash -> id of the first prompt with it.
        self._ngrams: list[tuple[str, dict[int, str]]] = []
        self.prompts_by_benchmark: Counter[str] = Counter()
        self.rejected_by_benchmark: Counter[str] = Counter()
        documents: list[tuple[str, str, str]] = []
        if benchmarks is None:
            benchmarks = ((b.name, read_source(b)) for b in settings.benchmarks)
        for name, items in benchmarks:
            # Listed even when empty, so the manifest shows every benchmark checked.
            self.prompts_by_benchmark[name] = 0
            grams: dict[int, str] = {}
            for item in items:
                if isinstance(item, Rejection):
                    logger.warning("benchmark record rejected: %s", item)
                    self.rejected_by_benchmark[name] += 1
                    continue
                self.prompts_by_benchmark[name] += 1
                normalized = normalize(item.text)
                self._exact.setdefault(text_key(normalized), (name, item.id))
                for gram in self._hasher.hashes(self._hasher.words(normalized)).tolist():
                    grams.setdefault(gram, item.id)
                documents.append((name, item.id, normalized))
            self._ngrams.append((name, grams))
            logger.info(
                "benchmark %r: %d prompts indexed for decontamination",
                name,
                self.prompts_by_benchmark[name],
            )
        self._tfidf = (
            TfidfIndex(documents) if documents and settings.tfidf_threshold is not None else None
        )

    def check(self, record: PromptRecord) -> Removal | None:
        """The removal of ``record`` if it overlaps a benchmark (the first in config
        order that it overlaps), else ``None``."""
        normalized = normalize(record.text)
        exact = self._exact.get(text_key(normalized))
        if exact is not None:
            benchmark, benchmark_id = exact
            return Removal(record, CONTAMINATED, benchmark_id, benchmark=benchmark, method="exact")
        grams = self._hasher.hashes(self._hasher.words(normalized)).tolist()
        for benchmark, index in self._ngrams if grams else ():
            matched = Counter(index[gram] for gram in grams if gram in index)
            shared = sum(matched.values())
            if shared and shared / len(grams) > self._settings.threshold:
                [(benchmark_id, _)] = matched.most_common(1)
                return Removal(
                    record, CONTAMINATED, benchmark_id, shared / len(grams), benchmark, "ngram"
                )
        if self._tfidf is not None:
            found = self._tfidf.most_similar(normalized)
            if found is not None and found[2] >= (self._settings.tfidf_threshold or 1.0):
                benchmark, benchmark_id, cosine = found
                return Removal(record, CONTAMINATED, benchmark_id, cosine, benchmark, "tfidf")
        return None


def _terms(normalized: str) -> list[str]:
    """Word unigrams and bigrams of a normalised text."""
    words = _WORD.findall(normalized)
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


class TfidfIndex:
    """Benchmark prompts as TF-IDF vectors (word unigrams and bigrams, sublinear term
    frequency, smoothed inverse document frequency from the benchmarks), searched by
    cosine similarity through an inverted index.

    A query's vector is normalised over all its terms, those the benchmarks never use
    included (at the highest inverse document frequency), so a long prompt that shares
    two words with a benchmark prompt does not look like it.

    Args:
        documents: ``(benchmark, prompt id, normalised text)`` of every benchmark prompt.
    """

    def __init__(self, documents: list[tuple[str, str, str]]):
        self._documents = [(benchmark, prompt_id) for benchmark, prompt_id, _ in documents]
        terms = [_terms(text) for _, _, text in documents]
        frequency: Counter[str] = Counter()
        for document in terms:
            frequency.update(set(document))
        count = len(documents)
        self._idf = {term: math.log((1 + count) / (1 + df)) + 1 for term, df in frequency.items()}
        self._unseen_idf = math.log(1 + count) + 1
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for position, document in enumerate(terms):
            for term, weight in self._vector(document).items():
                docs, weights = postings.setdefault(term, ([], []))
                docs.append(position)
                weights.append(weight)
        # Per term, the prompts that use it and its weight in each, as arrays: a query
        # is then one vectorised update per term.
        self._postings = {
            term: (np.asarray(docs, dtype=np.int64), np.asarray(weights))
            for term, (docs, weights) in postings.items()
        }

    def _vector(self, terms: list[str]) -> dict[str, float]:
        counts = Counter(terms)
        weights = {
            term: (1 + math.log(n)) * self._idf.get(term, self._unseen_idf)
            for term, n in counts.items()
        }
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        return {term: w / norm for term, w in weights.items()}

    def most_similar(self, normalized: str) -> tuple[str, str, float] | None:
        """``(benchmark, prompt id, cosine)`` of the most similar benchmark prompt, or
        None when no benchmark prompt shares a term."""
        scores = np.zeros(len(self._documents))
        shared = False
        for term, weight in self._vector(_terms(normalized)).items():
            posting = self._postings.get(term)
            if posting is not None:
                docs, weights = posting
                scores[docs] += weight * weights  # a term's prompts are distinct
                shared = True
        if not shared:
            return None
        best = int(np.argmax(scores))  # the first of equals: config order
        benchmark, prompt_id = self._documents[best]
        return benchmark, prompt_id, min(1.0, float(scores[best]))
