"""Prompt sources: JSONL, CSV, TSV and Parquet files, ``datasets`` folders and hub datasets.

Every prompt is tagged with its source. The source's loader (``loaders.py``) takes
the prompt and its metadata from each record. A bad record (invalid JSON, missing,
non-string or empty prompt) is rejected with its file, line and reason, and the
rest of the source is still read. :func:`read_rows`, the reading of records without
a loader, is what the evaluation reads its benchmarks with too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from unsafechain.intake.loaders import LOADERS, RecordError
from unsafechain.intake.settings import FILE_FORMATS, SourceSettings

logger = logging.getLogger(__name__)


class SourceError(ValueError):
    """A whole source cannot be read (missing file, unreadable format)."""


TRAIN, TEST = "train", "test"
"""The splits a prompt belongs to: trained on, or held out."""


@dataclass(frozen=True, slots=True)
class PromptRecord:
    """A valid prompt read from a source.

    Attributes:
        id: Stable id from the source name and the prompt text.
        text: The prompt.
        source: The source's name.
        uri: File, folder or hub name it was read from.
        line: 1-based line or row number.
        metadata: The record's other scalar fields, as strings.
        split: ``train``, or ``test`` when held out (see ``HeldOutSettings``).
    """

    id: str
    text: str
    source: str
    uri: str
    line: int
    metadata: dict[str, str] = field(default_factory=dict)
    split: str = TRAIN


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that could not be used, and why."""

    source: str
    uri: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.uri}:{self.line}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A line or row of a file that holds no record, and why (not UTF-8, invalid JSON,
    a CSV row with the wrong number of fields)."""

    reason: str


def _not_text(value: str) -> str | None:
    """Why ``value`` is not storable text (a lone surrogate from a ``\\ud800`` escape, a
    NUL), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"holds a lone surrogate {value[error.start]!a}, not text"
    if "\x00" in value:
        return "holds a NUL character"
    return None


def prompt_id(source: str, text: str) -> str:
    """The stable id of a prompt: the same source and text always give the same id."""
    return hashlib.sha256(f"{source}\x00{text}".encode()).hexdigest()[:20]


def format_of(path: str) -> str | None:
    """The format a local path's name or kind says (``jsonl``, ``csv``, ``tsv``,
    ``parquet``, ``datasets`` for a folder), or None when it says none."""
    local = Path(path)
    if local.is_dir():
        return "datasets"
    return FILE_FORMATS.get(local.suffix.lower())


def detect_format(settings: SourceSettings) -> str:
    """The source's format, deciding ``auto`` from the path."""
    if settings.format != "auto":
        return settings.format
    fmt = format_of(settings.path)
    if fmt is not None:
        return fmt
    path = settings.path
    if not Path(path).exists() and "/" in path and not path.startswith((".", "/")):
        return "hub"
    raise SourceError(
        f"source {settings.name!r}: cannot tell the format of {settings.path!r} "
        "(expected .jsonl, .parquet, .csv, .tsv, a datasets folder, or set format)"
    )


def read_rows(
    path: str,
    fmt: str,
    *,
    what: str,
    split: str = "train",
    hub_options: Mapping[str, object] | None = None,
) -> Iterator[tuple[int, object]]:
    """The records of a file, folder or hub dataset, in order, each with its line
    number (JSONL, CSV, TSV: the line it starts on) or row number (the others).

    A line that holds no record comes as :class:`Unreadable`, so the caller decides
    whether it rejects that record or the whole file. CSV and TSV files have a header
    row; their values are strings, and an empty cell is an empty string.

    Args:
        path: The file or folder, or the hub dataset's name (``fmt`` ``hub``).
        fmt: ``jsonl``, ``csv``, ``tsv``, ``parquet``, ``datasets`` or ``hub``.
        what: What is read, for messages (``source 'x'``).
        split: The split of a ``datasets`` folder or hub dataset.
        hub_options: Keyword arguments for ``datasets.load_dataset`` (a config name…).

    Raises:
        SourceError: The file as a whole cannot be read (missing, not a Parquet file,
            a hub dataset that cannot be loaded, a split it does not have).
    """
    if fmt != "hub" and not Path(path).exists():
        raise SourceError(f"{what}: {path} does not exist")
    if fmt == "jsonl":
        return _jsonl_rows(Path(path))
    if fmt in ("csv", "tsv"):
        return _delimited_rows(Path(path), "\t" if fmt == "tsv" else ",", what)
    if fmt == "parquet":
        return _parquet_rows(path, what)
    if fmt in ("datasets", "hub"):
        return _datasets_rows(
            path, what, split=split, options=hub_options or {}, from_hub=fmt == "hub"
        )
    raise SourceError(f"{what}: unknown format {fmt!r}")


def read_source(settings: SourceSettings) -> Iterator[PromptRecord | Rejection]:
    """Read one source, yielding valid prompts and rejections in file order.

    Raises:
        SourceError: The source as a whole cannot be read.
    """
    options = dict(LOADERS[settings.loader].hub_options)
    if settings.hub_config is not None:
        options["name"] = settings.hub_config
    rows = read_rows(
        settings.path,
        detect_format(settings),
        what=f"source {settings.name!r}",
        split=settings.split,
        hub_options=options,
    )
    subset_field = LOADERS[settings.loader].subset_field
    accepted = outside = 0
    for line, row in rows:
        if (
            settings.subsets is not None
            and isinstance(row, dict)
            and row.get(subset_field) not in settings.subsets
        ):
            # Not a bad record, only one the config did not ask for.
            outside += 1
            continue
        result = _validate(settings, line, row)
        yield result
        if isinstance(result, PromptRecord):
            accepted += 1
            if settings.limit is not None and accepted >= settings.limit:
                break
    if outside:
        logger.info(
            "source %r: skipped %d records outside subsets %s",
            settings.name,
            outside,
            ", ".join(settings.subsets or ()),
        )


def _validate(settings: SourceSettings, line: int, row: object) -> PromptRecord | Rejection:
    def reject(reason: str) -> Rejection:
        return Rejection(settings.name, settings.path, line, reason)

    if isinstance(row, Unreadable):
        return reject(row.reason)
    if not isinstance(row, dict):
        return reject(f"record is a JSON {type(row).__name__}, not an object")
    try:
        loaded = LOADERS[settings.loader].extract(row, settings)
    except RecordError as error:
        return reject(str(error))
    if len(loaded.text) > settings.max_prompt_chars:
        return reject(
            f"prompt: {len(loaded.text)} characters, over max_prompt_chars "
            f"({settings.max_prompt_chars})"
        )
    for name, value in (("prompt", loaded.text), *loaded.metadata.items()):
        problem = _not_text(value)
        if problem:
            return reject(f"{name}: {problem}")
    return PromptRecord(
        prompt_id(settings.name, loaded.text),
        loaded.text,
        settings.name,
        settings.path,
        line,
        loaded.metadata,
    )


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The lines of ``path``, numbered from 1, ending at ``\n``, ``\r\n`` or a lone ``\r``."""
    number = 0
    with path.open("rb") as handle:
        for raw in handle:
            for part in raw.rstrip(b"\n").removesuffix(b"\r").split(b"\r"):
                number += 1
                yield number, part


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    for line_number, raw in _lines(path):
        if not raw.strip():
            continue
        yield line_number, _parse_json_line(raw)


def _parse_json_line(raw: bytes) -> object:
    """The JSON value of one line, or why it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = raw[error.start : error.start + 1].hex()
        return Unreadable(f"not UTF-8: byte 0x{byte} at position {error.start + 1}")
    if "\x00" in text:
        return Unreadable(f"holds a NUL byte at position {text.index(chr(0)) + 1}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg.startswith("Unterminated string"):
            return Unreadable(
                f"invalid JSON: the line ends inside a string that starts at column {error.colno}"
            )
        if error.pos >= len(text.rstrip()):
            return Unreadable(f"invalid JSON: the line ends early ({error.msg})")
        return Unreadable(f"invalid JSON: {error.msg} (column {error.colno})")
    except RecursionError:
        return Unreadable("invalid JSON: nested too deeply")
    except ValueError as error:
        # e.g. an integer longer than Python converts (4300 digits).
        return Unreadable(f"invalid JSON: {error}")


def _delimited_rows(path: Path, delimiter: str, what: str) -> Iterator[tuple[int, object]]:
    """The rows of a CSV or TSV file with a header, as dicts; a quoted value may span
    lines, so a row's number is the line it starts on."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return
            start = reader.line_num + 1
            for values in reader:
                line, start = start, reader.line_num + 1
                if not any(value.strip() for value in values):
                    continue
                if len(values) != len(header):
                    yield (
                        line,
                        Unreadable(f"row has {len(values)} fields, the header has {len(header)}"),
                    )
                    continue
                yield line, dict(zip(header, values, strict=True))
    except UnicodeDecodeError as error:
        raise SourceError(f"{what}: {path}: not UTF-8 ({error.reason})") from error
    except csv.Error as error:
        raise SourceError(f"{what}: {path}: line {reader.line_num}: {error}") from error


def _parquet_rows(path: str, what: str) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise SourceError(f"{what}: {path}: {error}") from error
    row_number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row


def _datasets_rows(
    path: str, what: str, *, split: str, options: Mapping[str, object], from_hub: bool
) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        if from_hub:
            dataset = datasets.load_dataset(path, split=split, **options)
        else:
            dataset = datasets.load_from_disk(path)
    except Exception as error:  # datasets raises many types for a missing or bad dataset
        raise SourceError(f"{what}: {path}: {error}") from error
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise SourceError(f"{what}: split {split!r} not in {path} (have: {', '.join(dataset)})")
        dataset = dataset[split]
    yield from enumerate(dataset, start=1)
