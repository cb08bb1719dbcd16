"""Decontamination: removing prompts that overlap an evaluation benchmark.

Benchmark prompts are read with the same readers and loaders as sources. A prompt is
contaminated when it equals a benchmark prompt after normalisation, or when more than
the configured fraction of its word n-grams occur in one benchmark.
"""

from __future__ import annotations

import logging
from collections import Counter

from unsafechain.intake.dedup import CONTAMINATED, Removal
from unsafechain.intake.settings import DecontaminationSettings
from unsafechain.intake.sources import PromptRecord, Rejection, read_source
from unsafechain.intake.textmatch import NgramHasher, normalize, text_key

logger = logging.getLogger(__name__)


class Decontaminator:
    """The benchmarks' prompts indexed by normalised text and by word n-gram.

    Attributes:
        prompts_by_benchmark: Benchmark prompts read, per benchmark.
        rejected_by_benchmark: Benchmark records that could not be read, per benchmark.
    """

    def __init__(self, settings: DecontaminationSettings):
        """Read every benchmark and index its prompts.

        Raises:
            SourceError: A benchmark file cannot be read at all.
        """
        self._settings = settings
        self._hasher = NgramHasher(settings.ngram)
        self._exact: dict[bytes, tuple[str, str]] = {}
        # Per benchmark, in config order: n-gram hash -> id of the first prompt with it.
        self._ngrams: list[tuple[str, dict[int, str]]] = []
        self.prompts_by_benchmark: Counter = Counter()
        self.rejected_by_benchmark: Counter = Counter()
        for benchmark in settings.benchmarks:
            # Listed even when empty, so the manifest shows every benchmark checked.
            self.prompts_by_benchmark[benchmark.name] = 0
            grams: dict[int, str] = {}
            for item in read_source(benchmark):
                if isinstance(item, Rejection):
                    logger.warning("benchmark record rejected: %s", item)
                    self.rejected_by_benchmark[benchmark.name] += 1
                    continue
                self.prompts_by_benchmark[benchmark.name] += 1
                normalized = normalize(item.text)
                self._exact.setdefault(text_key(normalized), (benchmark.name, item.id))
                for gram in self._hasher.hashes(self._hasher.words(normalized)).tolist():
                    grams.setdefault(gram, item.id)
            self._ngrams.append((benchmark.name, grams))
            logger.info(
                "benchmark %r: %d prompts indexed for decontamination",
                benchmark.name,
                self.prompts_by_benchmark[benchmark.name],
            )

    def check(self, record: PromptRecord) -> Removal | None:
        """The removal of ``record`` if it overlaps a benchmark (the first in config
        order that it overlaps), else ``None``."""
        normalized = normalize(record.text)
        exact = self._exact.get(text_key(normalized))
        if exact is not None:
            benchmark, benchmark_id = exact
            return Removal(record, CONTAMINATED, benchmark_id, benchmark=benchmark)
        grams = self._hasher.hashes(self._hasher.words(normalized)).tolist()
        if not grams:
            return None
        for benchmark, index in self._ngrams:
            matched = Counter(index[gram] for gram in grams if gram in index)
            shared = sum(matched.values())
            if shared and shared / len(grams) > self._settings.threshold:
                [(benchmark_id, _)] = matched.most_common(1)
                return Removal(record, CONTAMINATED, benchmark_id, shared / len(grams), benchmark)
        return None
