"""Prompt intake: every source read in order, screened for benchmark contamination
and duplicates, a held-out test split drawn, with what was rejected and removed kept
for the record."""

from __future__ import annotations

import dataclasses
import logging
import random
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from unsafechain.intake.decontamination import Decontaminator
from unsafechain.intake.dedup import (
    CONTAMINATED,
    DUPLICATE_EXACT,
    DUPLICATE_NEAR,
    Deduplicator,
    Removal,
)
from unsafechain.intake.settings import (
    DecontaminationSettings,
    DeduplicationSettings,
    HeldOutSettings,
    SourceSettings,
)
from unsafechain.intake.sources import TEST, Rejection, read_source
from unsafechain.intake.spool import RecordSpool

logger = logging.getLogger(__name__)

HELD_OUT = "held-out test split"
"""The benchmark name of removals that match a prompt of the test split (no source or
benchmark name can be this: those have no spaces)."""


@dataclass
class PromptIntake:
    """What reading the sources gave.

    Attributes:
        records: The prompts to build cases for, in a temporary file (not held in
            memory, see ``spool``).
        rejections: Records that could not be used.
        removals: Prompts removed as duplicates or benchmark contamination.
        read_by_source: Valid prompts read, per source.
        benchmarks: Benchmark prompts indexed for decontamination, per benchmark (the
            test split as :data:`HELD_OUT`).
        test_by_source: Prompts held out as the test split, per source.
    """

    records: RecordSpool = field(default_factory=RecordSpool)
    rejections: list[Rejection] = field(default_factory=list)
    removals: list[Removal] = field(default_factory=list)
    read_by_source: Counter[str] = field(default_factory=Counter)
    benchmarks: Counter[str] = field(default_factory=Counter)
    test_by_source: Counter[str] = field(default_factory=Counter)

    def removed_summary(self) -> dict[str, Any]:
        """The removals counted by reason, by benchmark and by source, for the manifest."""
        by_reason = Counter({DUPLICATE_EXACT: 0, DUPLICATE_NEAR: 0, CONTAMINATED: 0})
        by_benchmark = Counter(dict.fromkeys(self.benchmarks, 0))
        by_method: dict[str, Counter[str]] = {name: Counter() for name in self.benchmarks}
        by_source: dict[str, Counter[str]] = {}
        for removal in self.removals:
            by_reason[removal.reason] += 1
            by_source.setdefault(removal.record.source, Counter())[removal.reason] += 1
            if removal.benchmark is not None:
                by_benchmark[removal.benchmark] += 1
                by_method.setdefault(removal.benchmark, Counter())[removal.method or "?"] += 1
        return {
            "by_reason": dict(by_reason),
            "contaminated_by_benchmark": dict(by_benchmark),
            "contaminated_by_benchmark_and_method": {
                name: dict(sorted(counts.items())) for name, counts in by_method.items()
            },
            "by_source": {source: dict(counts) for source, counts in by_source.items()},
            "benchmark_prompts": dict(self.benchmarks),
        }


def read_prompts(
    sources: Sequence[SourceSettings],
    deduplication: DeduplicationSettings,
    decontamination: DecontaminationSettings,
    test_split: HeldOutSettings | None = None,
    seed: int = 0,
) -> PromptIntake:
    """Read every source in order; drop prompts that overlap a benchmark, then
    duplicates of a prompt kept before them (exact after normalisation, or near); then
    hold out the test split and drop the training prompts that overlap it.

    Args:
        sources: The prompt sources, in order.
        deduplication: How duplicates are found.
        decontamination: The benchmarks, and how a prompt matches one (the test split
            is matched the same way).
        test_split: How many prompts of each source are held out; None holds none.
        seed: The build's seed, used when ``test_split.seed`` is unset.

    Raises:
        SourceError: A source or benchmark cannot be read at all.
    """
    intake = PromptIntake()
    decontaminator = Decontaminator(decontamination)
    intake.benchmarks.update(decontaminator.prompts_by_benchmark)
    deduplicator = Deduplicator(deduplication)
    for source in sources:
        for item in read_source(source):
            if isinstance(item, Rejection):
                logger.warning("rejected %s", item)
                intake.rejections.append(item)
                continue
            intake.read_by_source[source.name] += 1
            # Contamination first: a contaminated prompt must not be kept as the
            # original that later duplicates are compared with.
            removal = decontaminator.check(item) or deduplicator.check(item)
            if removal is not None:
                intake.removals.append(removal)
                continue
            intake.records.append(item)
    if test_split is not None:
        _hold_out(intake, test_split, seed, decontamination)
    summary = intake.removed_summary()["by_reason"]
    logger.info("prompts: %d kept, removed %s", len(intake.records), summary)
    return intake


def _hold_out(
    intake: PromptIntake,
    settings: HeldOutSettings,
    build_seed: int,
    decontamination: DecontaminationSettings,
) -> None:
    """Mark a seeded sample of each source's prompts as the test split and remove the
    training prompts that overlap one of them, as if it were a benchmark prompt."""
    seed = build_seed if settings.seed is None else settings.seed
    by_source: dict[str, array[int]] = {}
    for position, record in enumerate(intake.records):
        by_source.setdefault(record.source, array("q")).append(position)
    held: set[int] = set()
    for source, positions in by_source.items():
        count = settings.count(len(positions))
        # Seeded per source, so adding a source leaves the others' test prompts alone.
        held.update(random.Random(f"{seed}:test:{source}").sample(positions, count))
        intake.test_by_source[source] = count
    if not held:
        return
    test = [dataclasses.replace(intake.records[p], split=TEST) for p in sorted(held)]
    index = Decontaminator(decontamination, [(HELD_OUT, test)])
    intake.benchmarks[HELD_OUT] = len(test)
    kept = RecordSpool()
    for position, record in enumerate(intake.records):
        if position in held:
            kept.append(dataclasses.replace(record, split=TEST))
            continue
        removal = index.check(record)
        if removal is None:
            kept.append(record)
        else:
            intake.removals.append(removal)
    intake.records.close()
    intake.records = kept
    logger.info(
        "test split: %d prompts held out (%s)",
        len(test),
        ", ".join(f"{source} {n}" for source, n in intake.test_by_source.items()),
    )
