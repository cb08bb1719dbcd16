"""Assembly: the dataset's files, its subsets and its exports, written as the rows stream
past, so that memory does not grow with the dataset.

Output folder, beside the build's own files:
    dataset.jsonl, dataset.parquet                 every training row
    failed.jsonl                                   a row for every case without one
    subsets/<name>.jsonl, subsets/<name>.parquet   the rows of each subset, and of the
                                                   held-out ``test`` split
    datasets/                                      a ``datasets.DatasetDict``, one split per
                                                   subset, and ``test``
    release/<name>.jsonl                           the public release's columns
    pairs.jsonl                                    preference pairs for DPO (training
                                                   prompts only)

:class:`DatasetFiles` takes the rows one case at a time, in the build's order, and holds
only what a subset needs of them (an offset, and for ``selected`` the id, source and
category of at most ``selected_size`` rows per group). Its first pass writes the JSON
lines and learns the rows' Arrow schema; its second reads the lines back in chunks to
write Parquet and Arrow with that one schema, and the subsets that need every row's
count or id first.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import random
import shutil
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.arrow_writer import ArrowWriter
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from unsafechain.dataset.config import AssemblySettings
from unsafechain.dataset.rows import NO_CATEGORY
from unsafechain.domain.memory import release_freed_memory
from unsafechain.domain.reasoning import format_reasoning, split_reasoning

logger = logging.getLogger(__name__)

TEST_SPLIT = "test"
"""The name of the held-out split in every export."""

SUBSETS = ("full", "random", "selected")
"""The training subsets, in the order every export lists them."""

CHUNK_ROWS = 512
"""Rows per Arrow batch, and the fewest per Parquet row group: a chunk's rows are the
only ones held as Python objects at once (a row with its provenance is tens of
kilobytes)."""

_FOOTER_BYTES_PER_COLUMN_CHUNK = 2400
"""Memory one row group's footer entry holds per leaf column until its Parquet file is
closed: its metadata while the file is written, then the copy the footer is serialized
from. Measured: 177 row groups of 80 columns held 15 MiB before the close and 17 MiB
more at it."""

_RELEASE_EVERY = 32
"""Chunks read between two returns of freed memory (see ``domain.memory``): without
them, the allocators' kept pages grew the finalize's RSS with the number of rows."""


def primary_category(row: dict) -> str:
    """The harm category a row is balanced under: its first, or :data:`NO_CATEGORY`."""
    return row["harm_categories"][0] if row["harm_categories"] else NO_CATEGORY


def random_picks(count: int, size: int, seed: int) -> list[int]:
    """The positions, in row order, of a seeded sample of ``size`` of ``count`` rows
    (all of them when there are fewer): the ``random`` subset."""
    return sorted(random.Random(seed).sample(range(count), min(size, count)))


def random_subset(rows: list[dict], size: int, seed: int) -> list[dict]:
    """A seeded sample of ``size`` rows (all of them when there are fewer), in row order."""
    return [rows[i] for i in random_picks(len(rows), size, seed)]


def _is_corrected(row: dict) -> bool:
    return bool(row["hard"]) and row["status"] == "corrected"


class SelectedPicks:
    """The ``selected`` subset's picks, fed one row at a time.

    STAR-1's greedy balancing: rows are grouped by (source, harm category) and each pick
    comes from the group whose source has the fewest picks so far, then whose category
    has, ties going to the group that sorts first; within a group rows go by id. The
    corrected hard cases are used up before any other row, and the pick counts carry
    over, so the others fill the sources and categories the corrections left thin.

    No group gives more than ``size`` picks, so only each group's ``size`` smallest ids
    are kept: memory is bounded by the number of groups, not of rows.

    Args:
        size: Picks wanted.
    """

    def __init__(self, size: int):
        self.size = size
        # (tier, source, category) -> [(id, position)], trimmed to the `size` smallest.
        self._groups: dict[tuple[int, str, str], list[tuple[str, int]]] = defaultdict(list)

    def add(self, position: int, row: dict) -> None:
        """Count the row at ``position`` of the training rows."""
        tier = 0 if _is_corrected(row) else 1
        members = self._groups[(tier, row["source"], primary_category(row))]
        members.append((row["id"], position))
        if len(members) > 2 * self.size:
            members[:] = heapq.nsmallest(self.size, members)

    def picks(self) -> list[int]:
        """The picked rows' positions, in pick order."""
        picked: list[int] = []
        per_source: Counter = Counter()
        per_category: Counter = Counter()
        for tier in (0, 1):
            groups = {
                (source, category): iter(sorted(members)[: self.size])
                for (t, source, category), members in self._groups.items()
                if t == tier
            }
            while groups and len(picked) < self.size:
                source, category = min(
                    groups, key=lambda group: (per_source[group[0]], per_category[group[1]], group)
                )
                member = next(groups[(source, category)], None)
                if member is None:
                    del groups[(source, category)]
                    continue
                picked.append(member[1])
                per_source[source] += 1
                per_category[category] += 1
        return picked


def selected_subset(rows: list[dict], size: int) -> list[dict]:
    """Up to ``size`` rows: corrected hard cases first, balanced over sources and
    categories (:class:`SelectedPicks`)."""
    picks = SelectedPicks(size)
    for position, row in enumerate(rows):
        picks.add(position, row)
    return [rows[i] for i in picks.picks()]


def release_row(row: dict) -> dict:
    """The public release's columns of a row; ``split_name`` is the row's source."""
    return {"prompt": row["prompt"], "response": row["response"], "split_name": row["source"]}


def row_pairs(row: dict) -> list[dict]:
    """The DPO pairs of the case ``row`` describes: one per correction that passed
    re-judging; none for a row of the test split.

    ``chosen`` is the passing attempt and ``rejected`` the unsafe completion it
    corrects, both in the ``<think>`` format the training rows use. A completion cut
    off by the token limit is never a side.
    """
    if row.get("split", "train") == TEST_SPLIT:
        return []
    case_id = row.get("case_id", row["id"])
    provenance = row["provenance"]
    completions = {c["index"]: c for c in provenance["completions"]}
    pairs = []
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


def preference_pairs(rows: Iterable[dict]) -> list[dict]:
    """The DPO pairs of ``rows`` (:func:`row_pairs`), once per case: several rows of one
    case give its pairs once."""
    seen: set[str] = set()
    pairs = []
    for row in rows:
        case_id = row.get("case_id", row["id"])
        if case_id not in seen:
            seen.add(case_id)
            pairs += row_pairs(row)
    return pairs


class _Lines:
    """A JSON-lines file written under a temporary name and put in place by ``commit``:
    a reader never sees half of one."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.with_suffix(path.suffix + ".tmp")
        self.handle: IO[bytes] = self.tmp.open("wb")
        self.count = 0

    def write(self, row: dict) -> int:
        """Write ``row``; its line's offset in the file."""
        return self.write_line(json.dumps(row, ensure_ascii=False).encode() + b"\n")

    def write_line(self, line: bytes) -> int:
        """Write a line already encoded (with its newline); its offset in the file."""
        offset = self.handle.tell()
        self.handle.write(line)
        self.count += 1
        return offset

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()

    def commit(self) -> None:
        self.close()
        self.tmp.replace(self.path)

    def discard(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` as JSON lines, replacing ``path`` only once all are written."""
    lines = _Lines(path)
    try:
        for row in rows:
            lines.write(row)
    except BaseException:
        lines.discard()
        raise
    lines.commit()


def _lines_at(path: Path, offsets: Iterable[int]) -> Iterator[bytes]:
    """The lines of a file that start at ``offsets``, in that order, as they are."""
    with path.open("rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            yield handle.readline()


class _ArrowChunks:
    """Rows kept for the second pass as Arrow tables, one temporary IPC stream per
    chunk of :data:`CHUNK_ROWS` rows, each with the schema its own rows give.

    The second pass reads a chunk at a time, cast to the schema every chunk's schema
    unifies into: Arrow casts a struct to one with more fields (the missing filled with
    nulls) and a null column to any type, so no row is parsed twice for the splits
    written whole (a sampled subset parses its picked rows' lines: ``_sampled``).
    """

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.pending: list[dict] = []
        self.sizes: list[int] = []
        self.nbytes = 0
        self.reads = 0

    def add(self, row: dict) -> pa.Schema | None:
        """Keep ``row``; the schema of the chunk it completes, if it does."""
        self.pending.append(row)
        return self.flush() if len(self.pending) >= CHUNK_ROWS else None

    def flush(self) -> pa.Schema | None:
        """Write the pending rows as a chunk; its schema (None without rows)."""
        if not self.pending:
            return None
        table = pa.Table.from_pylist(self.pending)
        self.pending = []
        path = self._path(len(self.sizes))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        self.sizes.append(table.num_rows)
        self.nbytes += table.nbytes
        return table.schema

    def tables(self, schema: pa.Schema) -> Iterator[pa.Table]:
        """Every chunk, in order, cast to ``schema``."""
        for index in range(len(self.sizes)):
            yield self._read(index, schema)

    def _read(self, index: int, schema: pa.Schema) -> pa.Table:
        """Chunk ``index`` cast to ``schema``, read into memory (not mapped)."""
        self.reads += 1
        if self.reads % _RELEASE_EVERY == 0:
            release_freed_memory()
        with pa.OSFile(str(self._path(index)), "rb") as source:
            table = pa.ipc.open_stream(source).read_all()
        return _cast(table, schema)

    def _path(self, index: int) -> Path:
        return self.folder / f"{self.name}-{index:06d}.arrow"


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``: its columns cast as one struct, so that columns are
    matched by name and a column it lacks is added, all nulls."""
    if table.schema == schema:
        return table
    rows = table.to_struct_array().cast(pa.struct(list(schema)))
    return pa.Table.from_struct_array(rows).replace_schema_metadata(schema.metadata)


@dataclass
class Assembled:
    """What :meth:`DatasetFiles.finish` wrote.

    Attributes:
        files: The files written, relative to the output folder, for the manifest.
        subsets: Rows per training subset.
        test_rows: Rows of the held-out test split.
        pairs: Preference pairs written.
    """

    files: dict[str, Any]
    subsets: dict[str, int]
    test_rows: int
    pairs: int


_SHARD = "data-00000-of-00001.arrow"
"""The one shard of each ``datasets`` split."""

_RELEASE_COLUMNS = ("prompt", "response", "source")


def row_group_bytes(data_bytes: int, schema: pa.Schema) -> int:
    """The Parquet row group size, in bytes of Arrow data, that holds the least memory
    while a file of ``data_bytes`` is written.

    A row group's rows are held until it is written (its size), and every row group's
    footer entry until the file is closed (``data_bytes`` / size of them, each
    :data:`_FOOTER_BYTES_PER_COLUMN_CHUNK` per leaf column); the sum is least at the
    square root of the product. A 400 MB split of 80 columns gets 9 MB row groups
    (45 of them, 17 MB held in all), where one a chunk of 512 rows (196 of 2 MB)
    held 40 MB and grew with the dataset.
    """
    per_group = _leaf_columns(schema.types) * _FOOTER_BYTES_PER_COLUMN_CHUNK
    return math.isqrt(data_bytes * per_group)


def _leaf_columns(types: Iterable[pa.DataType]) -> int:
    """How many Parquet columns values of ``types`` make: one per primitive value
    inside a struct, list or map."""
    return sum(
        _leaf_columns(t.field(i).type for i in range(t.num_fields)) if t.num_fields else 1
        for t in types
    )


class _Split:
    """One split's files, written table by table: its Parquet file, its ``datasets``
    shard, its release rows and, where asked, its JSON lines (copied from the lines
    already written, not encoded again).

    The Parquet file's tables are held until they make a row group of
    ``group_bytes`` (see :func:`row_group_bytes`); the other files are written as
    each table comes.
    """

    def __init__(
        self, output: Path, name: str, schema: pa.Schema, *, lines: bool, group_bytes: int
    ):
        self.parquet = output / f"subsets/{name}.parquet"
        self.parquet_tmp = self.parquet.with_suffix(".parquet.tmp")
        self.parquet_writer = pq.ParquetWriter(self.parquet_tmp, schema)
        self.group_bytes = group_bytes
        self.group: list[pa.Table] = []
        self.group_size = 0
        # The features have no media to embed; save_to_disk's writer, as it writes.
        # A build without any row has no columns: ``datasets`` writes its splits no
        # shard (``_datasets_layout``).
        self.arrow = (
            ArrowWriter(
                features=datasets.Features.from_arrow_schema(schema),
                path=str(output / "datasets" / name / _SHARD),
            )
            if len(schema)
            else None
        )
        self.release = _Lines(output / f"release/{name}.jsonl")
        self.lines = _Lines(output / f"subsets/{name}.jsonl") if lines else None
        self.rows = 0

    def write(self, table: pa.Table, lines: Iterable[bytes] = ()) -> None:
        self.group.append(table)
        self.group_size += table.nbytes
        if self.group_size >= self.group_bytes:
            self._write_group()
        if self.arrow is not None:
            self.arrow.write_table(table)
        if table.num_columns:
            for row in table.select(list(_RELEASE_COLUMNS)).to_pylist():
                self.release.write(release_row(row))
        if self.lines is not None:
            for line in lines:
                self.lines.write_line(line)
        self.rows += table.num_rows

    def _write_group(self) -> None:
        if not self.group:
            return
        # The tables are chunks of one table: one row group of all their rows.
        group = pa.concat_tables(self.group)
        self.parquet_writer.write_table(group, row_group_size=max(group.num_rows, 1))
        self.group, self.group_size = [], 0

    def commit(self) -> None:
        self._write_group()
        self.parquet_writer.close()
        if self.arrow is not None:
            self.arrow.finalize()
            self.arrow.close()
        self.parquet_tmp.replace(self.parquet)
        self.release.commit()
        if self.lines is not None:
            self.lines.commit()

    def discard(self) -> None:
        self.group = []
        self.parquet_writer.close()
        if self.arrow is not None:
            self.arrow.close()
        self.parquet_tmp.unlink(missing_ok=True)
        self.release.discard()
        if self.lines is not None:
            self.lines.discard()


class DatasetFiles:
    """The dataset's files, written from rows fed one case at a time.

    The first pass (:meth:`add`, :meth:`add_failed`) writes the JSON lines and the
    pairs, keeps each chunk of rows as Arrow in a temporary folder and learns the
    rows' schema; :meth:`finish` writes every split's Parquet file, ``datasets`` shard
    and release rows from those chunks, one chunk at a time, with one schema. Use as a
    context manager: on an error, nothing half-written is left in place of a file (each
    is written under a temporary name and moved in place when finished).

    Args:
        output: The build's folder.
        settings: Subset sizes and the sampling seed.
        seed: The build's seed, used when ``settings.seed`` is unset.
    """

    def __init__(self, output: Path, settings: AssemblySettings, seed: int):
        self.output, self.settings, self.seed = output, settings, seed
        self._scratch = output / ".assembly.tmp"
        self._lines: dict[str, _Lines] = {}
        self._offsets = array("q")
        self._selected = SelectedPicks(settings.selected_size)
        self._schema: pa.Schema | None = None
        self._training = _ArrowChunks(self._scratch, "training")
        self._test = _ArrowChunks(self._scratch, "test")

    def __enter__(self) -> Self:
        if self._scratch.exists():
            shutil.rmtree(self._scratch)
        self._scratch.mkdir(parents=True)
        names = {
            "dataset": "dataset.jsonl",
            "failed": "failed.jsonl",
            "test": f"subsets/{TEST_SPLIT}.jsonl",
            "pairs": "pairs.jsonl",
            # Pairs of cases without a row go after every training row's.
            "pairs of failed": "pairs-of-failed.jsonl",
        }
        self._lines = {key: _Lines(self.output / name) for key, name in names.items()}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for lines in self._lines.values():
            lines.discard()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def add(self, rows: list[dict], *, test: bool = False) -> None:
        """Take one case's rows: training rows, or rows of the held-out test split.

        Every row of a case holds the case's provenance, so the first gives its pairs.
        """
        for row in rows:
            if test:
                self._lines["test"].write(row)
                self._learn(self._test.add(row))
            else:
                self._selected.add(len(self._offsets), row)
                self._offsets.append(self._lines["dataset"].write(row))
                self._learn(self._training.add(row))
        if rows:
            self._pair(rows[0], "pairs")

    def add_failed(self, row: dict) -> None:
        """Take the row of one case without a training row."""
        self._lines["failed"].write(row)
        self._pair(row, "pairs of failed")

    def _pair(self, row: dict, into: str) -> None:
        for pair in row_pairs(row):
            self._lines[into].write(pair)

    def _learn(self, schema: pa.Schema | None) -> None:
        # Every split is written with one schema, the union of every chunk's, so that a
        # split whose rows all lack a value another split has still has its column.
        if schema is None:
            return
        if self._schema is not None:
            schema = pa.unify_schemas([self._schema, schema], promote_options="permissive")
        self._schema = schema

    def finish(self) -> Assembled:
        """Write the subsets and exports from the rows taken; what was written."""
        self._learn(self._training.flush())
        self._learn(self._test.flush())
        release_freed_memory()
        schema = self._schema if self._schema is not None else pa.schema([])
        lines = self._lines
        for lines_file in lines.values():
            lines_file.close()
        count, test_rows = lines["dataset"].count, lines["test"].count
        seed = self.settings.random_seed(self.seed)
        names = [*SUBSETS, TEST_SPLIT] if test_rows else list(SUBSETS)
        # The test split is written when the build holds one out (an empty split is not
        # a loadable ``datasets`` split).
        _datasets_layout(self.output / "datasets", names, schema)
        random_rows = random_picks(count, self.settings.random_size, seed)
        selected_rows = self._selected.picks()
        full_bytes = self._training.nbytes
        row_bytes = full_bytes // max(count, 1)
        sizes = {
            "full": self._write(
                "full",
                schema,
                ((t, ()) for t in self._training.tables(schema)),
                full_bytes,
                lines=False,
            ),
            "random": self._write(
                "random",
                schema,
                self._sampled(schema, random_rows),
                row_bytes * len(random_rows),
            ),
            "selected": self._write(
                "selected",
                schema,
                self._sampled(schema, selected_rows),
                row_bytes * len(selected_rows),
            ),
        }
        if test_rows:
            tables = ((t, ()) for t in self._test.tables(schema))
            sizes[TEST_SPLIT] = self._write(
                TEST_SPLIT, schema, tables, self._test.nbytes, lines=False
            )
        # Full's lines are the dataset's: copied, not written twice.
        shutil.copyfile(lines["dataset"].tmp, self.output / "subsets/full.jsonl")
        shutil.copyfile(self.output / "subsets/full.parquet", self.output / "dataset.parquet")
        with (
            lines["pairs"].tmp.open("ab") as pairs,
            lines["pairs of failed"].tmp.open("rb") as tail,
        ):
            shutil.copyfileobj(tail, pairs)
        pair_count = lines["pairs"].count + lines["pairs of failed"].count
        for key in ("dataset", "failed", "pairs", *(("test",) if test_rows else ())):
            lines[key].commit()
        logger.info(
            "exports: %s; %d preference pairs",
            ", ".join(f"{name} {rows} rows" for name, rows in sizes.items()),
            pair_count,
        )
        return Assembled(
            files={
                "subsets": {
                    name: [f"subsets/{name}.jsonl", f"subsets/{name}.parquet"] for name in names
                },
                "release": {name: f"release/{name}.jsonl" for name in names},
                "datasets": "datasets",
                "pairs": "pairs.jsonl",
            },
            subsets={name: sizes[name] for name in SUBSETS},
            test_rows=test_rows,
            pairs=pair_count,
        )

    def _sampled(
        self, schema: pa.Schema, picks: list[int]
    ) -> Iterator[tuple[pa.Table, Iterable[bytes]]]:
        """A subset's rows, in pick order, in tables of at most :data:`CHUNK_ROWS` rows,
        each with the rows' lines in ``dataset.jsonl``.

        A block's table is made from its lines, parsed again, with ``schema``: only
        the picked rows are read, into one table, and the block's Python rows (about
        18 kB a row in the benchmark's builds, where its line is 6 kB) are dropped, and
        the memory they freed returned, before the table is written. Taking the rows
        from the Arrow chunks instead read, for every block, each chunk holding one of
        its rows (nearly every chunk once there are more picks than chunks: work that
        grew with the dataset times the subset) and held a small table per chunk until
        the block was whole, whose scattered buffers kept the allocator's pages (about
        12 MiB a block at 30,000 rows, where the rows were 2 MiB). Arrow's JSON reader
        makes the same table without Python objects, but its transient peak is three
        times higher (22 MiB against 7 a block, measured).
        """
        dataset = self._lines["dataset"].tmp
        for start in range(0, len(picks), CHUNK_ROWS):
            block = picks[start : start + CHUNK_ROWS]
            lines = list(_lines_at(dataset, (self._offsets[p] for p in block)))
            rows = [json.loads(line) for line in lines]
            table = pa.Table.from_pylist(rows, schema=schema)
            del rows
            release_freed_memory()
            yield table, lines

    def _write(
        self,
        name: str,
        schema: pa.Schema,
        tables: Iterable[tuple[pa.Table, Iterable[bytes]]],
        data_bytes: int,
        *,
        lines: bool = True,
    ) -> int:
        """Write one split of about ``data_bytes`` of Arrow data from its tables (and
        their lines); its row count."""
        group_bytes = row_group_bytes(data_bytes, schema)
        split = _Split(self.output, name, schema, lines=lines, group_bytes=group_bytes)
        try:
            for table, table_lines in tables:
                split.write(table, table_lines)
        except BaseException:
            split.discard()
            raise
        split.commit()
        release_freed_memory()
        logger.debug("split %s written: %d rows", name, split.rows)
        return split.rows


def _datasets_layout(folder: Path, splits: list[str], schema: pa.Schema) -> None:
    """A ``datasets.DatasetDict`` folder (``load_from_disk``) with ``splits`` of
    ``schema``, each with its one shard still to be written.

    ``DatasetDict.save_to_disk`` writes the metadata (``dataset_dict.json``, each
    split's ``state.json`` and ``dataset_info.json``) of empty splits of the same
    features; each split's shard is then written batch by batch with the writer
    ``save_to_disk`` itself uses, which would otherwise read the whole split from
    memory.
    """
    if folder.exists():
        shutil.rmtree(folder)
    empty = datasets.Dataset(schema.empty_table())
    # One shard a split; none without columns (no rows at all), as save_to_disk does.
    shards = dict.fromkeys(splits, 1) if len(schema) else None
    # Saving empty splits takes no time; its progress bars ("Saving the dataset (0/1
    # shards)", one a split) would only be noise in the build's output.
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        datasets.DatasetDict({name: empty for name in splits}).save_to_disk(
            str(folder), num_shards=shards
        )
    finally:
        if not bars_were_off:
            enable_progress_bars()
