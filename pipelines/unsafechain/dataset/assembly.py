"""Assembly: the dataset's subsets and its exports, made from the training rows.

Output folder, beside the build's own files:
    subsets/<name>.jsonl, subsets/<name>.parquet   the rows of each subset, and of the
                                                   held-out ``test`` split
    datasets/                                      a ``datasets.DatasetDict``, one split per
                                                   subset, and ``test``
    release/<name>.jsonl                           the public release's columns
    pairs.jsonl                                    preference pairs for DPO (training
                                                   prompts only)
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from unsafechain.dataset.config import AssemblySettings
from unsafechain.dataset.rows import NO_CATEGORY
from unsafechain.domain.reasoning import format_reasoning, split_reasoning

logger = logging.getLogger(__name__)


def primary_category(row: dict) -> str:
    """The harm category a row is balanced under: its first, or :data:`NO_CATEGORY`."""
    return row["harm_categories"][0] if row["harm_categories"] else NO_CATEGORY


def random_subset(rows: list[dict], size: int, seed: int) -> list[dict]:
    """A seeded sample of ``size`` rows (all of them when there are fewer), in row order."""
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(size, len(rows))))
    return [rows[i] for i in picked]


def selected_subset(rows: list[dict], size: int) -> list[dict]:
    """Up to ``size`` rows: corrected hard cases first, balanced over sources and categories.

    STAR-1's greedy balancing: rows are grouped by (source, harm category) and each pick
    comes from the group whose source has the fewest picks so far, then whose category
    has, ties going to the group that sorts first; within a group rows go by id. The
    corrected hard cases are used up before any other row, and the pick counts carry
    over, so the others fill the sources and categories the corrections left thin.
    """
    corrected = [row for row in rows if row["hard"] and row["status"] == "corrected"]
    others = [row for row in rows if not (row["hard"] and row["status"] == "corrected")]
    picked: list[dict] = []
    per_source: Counter = Counter()
    per_category: Counter = Counter()
    for tier in (corrected, others):
        picked += _balanced_picks(tier, size - len(picked), per_source, per_category)
    return picked


def _balanced_picks(
    rows: list[dict], size: int, per_source: Counter, per_category: Counter
) -> list[dict]:
    """Greedy balanced picks from ``rows``; the counters hold and receive the picks."""
    groups: dict[tuple[str, str], Iterator[dict]] = {
        key: iter(sorted(members, key=lambda row: row["id"]))
        for key, members in _by_group(rows).items()
    }
    picked: list[dict] = []
    while groups and len(picked) < size:
        source, category = min(
            groups, key=lambda group: (per_source[group[0]], per_category[group[1]], group)
        )
        row = next(groups[(source, category)], None)
        if row is None:
            del groups[(source, category)]
            continue
        picked.append(row)
        per_source[source] += 1
        per_category[category] += 1
    return picked


def _by_group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["source"], primary_category(row))].append(row)
    return groups


def make_subsets(rows: list[dict], settings: AssemblySettings, seed: int) -> dict[str, list[dict]]:
    """The ``full``, ``random`` and ``selected`` subsets of the training rows.

    Args:
        rows: Every training row.
        settings: Subset sizes and the sampling seed.
        seed: The build's seed, used when ``settings.seed`` is unset.
    """
    return {
        "full": rows,
        "random": random_subset(rows, settings.random_size, settings.random_seed(seed)),
        "selected": selected_subset(rows, settings.selected_size),
    }


def release_row(row: dict) -> dict:
    """The public release's columns of a row; ``split_name`` is the row's source."""
    return {"prompt": row["prompt"], "response": row["response"], "split_name": row["source"]}


TEST_SPLIT = "test"
"""The name of the held-out split in every export."""


def preference_pairs(rows: list[dict]) -> list[dict]:
    """One DPO pair per correction that passed re-judging, once per case, training
    prompts only.

    ``chosen`` is the passing attempt and ``rejected`` the unsafe completion it
    corrects, both in the ``<think>`` format the training rows use. A completion cut
    off by the token limit is never a side.

    Args:
        rows: Rows of the build's cases (several rows of one case give its pairs once).
    """
    pairs = []
    seen: set[str] = set()
    for row in rows:
        case_id = row.get("case_id", row["id"])
        if case_id in seen or row.get("split", "train") == TEST_SPLIT:
            continue
        seen.add(case_id)
        provenance = row["provenance"]
        completions = {c["index"]: c for c in provenance["completions"]}
        for correction in provenance["corrections"]:
            if not correction["passed"]:
                continue
            original = completions[correction["completion_index"]]
            if original.get("truncated"):
                continue
            # A passed correction's earlier attempts failed; the passing one has no reason.
            attempt = next(a for a in correction["attempts"] if not a["failure_reason"])
            pairs.append(
                {
                    "id": case_id,
                    "prompt": row["prompt"],
                    "chosen": split_reasoning(attempt["text"]).render(),
                    "rejected": format_reasoning(original["reasoning"], original["answer"]),
                    "source": row["source"],
                    "harm_categories": row["harm_categories"],
                    "completion_index": correction["completion_index"],
                    "correction_attempt": attempt["attempt"],
                }
            )
    return pairs


def write_exports(
    output: Path,
    subsets: dict[str, list[dict]],
    *,
    test: list[dict] | None = None,
    cases: list[dict] | None = None,
) -> dict:
    """Write every export of ``subsets`` and of the ``test`` split under ``output``.

    Args:
        output: The build's folder.
        subsets: The training subsets (``full`` has every training row).
        test: The rows of the held-out test split; written only when there are any.
        cases: Rows of every case, with or without a response, for the preference
            pairs; default: the ``full`` subset.

    Returns:
        The files written, relative to ``output``, for the manifest.
    """
    files: dict = {"subsets": {}, "release": {}}
    test = test or []
    # Splits are taken from one table so that every split has the same schema, even
    # one whose rows all lack a value another split has.
    every = [*subsets["full"], *test]
    full = pa.Table.from_pylist(every)
    position = {row["id"]: i for i, row in enumerate(every)}
    split_tables = {}
    # The test split is written when the build holds one out (an empty split is not a
    # loadable ``datasets`` split).
    splits_written = {**subsets, TEST_SPLIT: test} if test else dict(subsets)
    for name, rows in splits_written.items():
        table = full.take(pa.array([position[row["id"]] for row in rows], type=pa.int64()))
        split_tables[name] = table
        jsonl, parquet = f"subsets/{name}.jsonl", f"subsets/{name}.parquet"
        write_jsonl(output / jsonl, rows)
        pq.write_table(table, output / parquet)
        files["subsets"][name] = [jsonl, parquet]
        release = f"release/{name}.jsonl"
        write_jsonl(output / release, [release_row(row) for row in rows])
        files["release"][name] = release
    splits = datasets.DatasetDict(
        {name: datasets.Dataset(table) for name, table in split_tables.items()}
    )
    splits.save_to_disk(str(output / "datasets"))
    files["datasets"] = "datasets"
    pairs = preference_pairs(subsets["full"] if cases is None else cases)
    write_jsonl(output / "pairs.jsonl", pairs)
    files["pairs"] = "pairs.jsonl"
    logger.info(
        "exports: %s; %d preference pairs",
        ", ".join(f"{name} {len(rows)} rows" for name, rows in splits_written.items()),
        len(pairs),
    )
    return files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` as JSON lines, replacing ``path`` only once all are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
