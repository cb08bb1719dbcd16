"""The kept prompt records of a build, in a temporary file rather than in memory.

A build holds its prompts from the intake to the finalize: the cases to run are made
from them, and the dataset's rows follow their order. As Python objects they take about
600 bytes each for a short prompt (the text, the id, the source's name and file, the
line, the metadata) and more for a long one, so memory would grow with the prompts;
here each record is a line of an unnamed temporary file, and memory holds 12 bytes per
record (where its line starts, how long it is).

The file is made with :func:`tempfile.TemporaryFile`: in ``TMPDIR`` (``/tmp`` by
default), removed as soon as it is created, so nothing is left behind whatever way the
process ends, and gone from the disk when it is closed.
"""

from __future__ import annotations

import json
import os
import tempfile
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import IO, overload

from unsafechain.intake.sources import PromptRecord

_FLUSH_BYTES = 1 << 20
"""Appended lines are written to the file once this many bytes are waiting."""

_READ_BYTES = 1 << 20
"""The block a pass over the records reads at once."""


class RecordSpool(Sequence[PromptRecord]):
    """Prompt records, appended in order and read back by position or in order.

    A spool made by :meth:`where` is a view of the same file holding some of the
    records: it reads like the spool and cannot be appended to.
    """

    def __init__(self) -> None:
        # Open as long as the spool is: close() ends it, not a with block.
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="unsafechain-records-")  # noqa: SIM115
        self._starts = array("q")
        self._lengths = array("I")
        self._pending = bytearray()
        self._end = 0
        self._view = False

    def append(self, record: PromptRecord) -> None:
        """Keep ``record`` after the others."""
        if self._view:
            raise TypeError("a view of a record spool cannot be appended to")
        line = _encode(record)
        self._starts.append(self._end + len(self._pending))
        self._lengths.append(len(line))
        self._pending += line
        if len(self._pending) >= _FLUSH_BYTES:
            self._flush()

    def where(self, keep: Callable[[PromptRecord], bool]) -> RecordSpool:
        """A view of the records ``keep`` is true of, in the same order."""
        self._flush()
        view = RecordSpool.__new__(RecordSpool)
        view._file, view._pending, view._end, view._view = self._file, bytearray(), 0, True
        view._starts, view._lengths = array("q"), array("I")
        for position, record in enumerate(self):
            if keep(record):
                view._starts.append(self._starts[position])
                view._lengths.append(self._lengths[position])
        return view

    def ids(self) -> Iterator[str]:
        """The records' ids, in order."""
        return (record.id for record in self)

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, index: int) -> PromptRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[PromptRecord]: ...

    def __getitem__(self, index: int | slice) -> PromptRecord | list[PromptRecord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        self._flush()
        start, length = self._starts[index], self._lengths[index]
        return _decode(os.pread(self._file.fileno(), length, start))

    def __iter__(self) -> Iterator[PromptRecord]:
        """The records in order, read a block at a time (a view's lines are not
        contiguous; a block covers those that lie in it)."""
        self._flush()
        fd = self._file.fileno()
        block, block_start = b"", 0
        for start, length in zip(self._starts, self._lengths, strict=True):
            offset = start - block_start
            if offset < 0 or offset + length > len(block):
                block = os.pread(fd, max(length, _READ_BYTES), start)
                block_start, offset = start, 0
            yield _decode(block[offset : offset + length])

    def close(self) -> None:
        """Remove the file (a view's too: it is the same)."""
        self._file.close()

    def _flush(self) -> None:
        view = memoryview(self._pending)
        while view:
            written = os.pwrite(self._file.fileno(), view, self._end)
            self._end += written
            view = view[written:]
        view.release()
        self._pending = bytearray()


def spooled(records: Sequence[PromptRecord]) -> RecordSpool:
    """A spool holding ``records``."""
    spool = RecordSpool()
    for record in records:
        spool.append(record)
    return spool


def _encode(record: PromptRecord) -> bytes:
    fields = [record.id, record.text, record.source, record.uri, record.line]
    fields += [record.metadata, record.split]
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


def _decode(line: bytes) -> PromptRecord:
    id_, text, source, uri, line_number, metadata, split = json.loads(line)
    return PromptRecord(id_, text, source, uri, line_number, metadata, split)
