"""The case store: finished cases appended to a JSONL file, idempotent by case id.

It is what makes a build resumable: a case is durable once its line is flushed and
synced, and a resumed build skips every id already stored.

Opening a store reads each line's id from the line's start (every line is written with
the case's ``id`` as its first key) and remembers where the line starts; a case is
parsed only when it is read back, once, by :meth:`CaseStore.cases`. A line whose start
is not an id, or that does not end as a JSON object does, is parsed whole, and is
damaged when that fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from pathlib import Path

from google.protobuf import json_format

from unsafechain.domain.files import write_atomically
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The case store is damaged in a way only the user can decide about."""


class CaseStore:
    """Finished cases of one build, one JSON line each.

    A line cut short by a crash (the last one) is dropped on open and its case
    recomputed. A damaged line anywhere else stops the build with its line number,
    unless ``repair`` drops it (its case is then recomputed too): on open when its start
    or its end is damaged, when it is read back (by its byte offset) when only its
    inside is; ``repair`` parses every line on open, so it finds both. A case id written
    twice is kept once, except after :meth:`forget`, when its newer line wins.

    Opening reads ids without parsing cases, and :attr:`ids` is the store's own set
    behind a read-only view, so that resuming is one pass over the file and one set
    lookup per prompt.

    Args:
        path: The JSONL file.
        repair: Drop damaged lines that are not the last instead of refusing.

    Raises:
        StoreError: A line other than the last is damaged and ``repair`` is off.
    """

    def __init__(self, path: Path, *, repair: bool = False):
        self._path = path
        # Where the newest line of each id written starts, in bytes; the ids forgotten
        # since (a subset of its keys) are not stored until written again. One dict of
        # every id, not a set beside it: the store's index is what grows with a build.
        self._offsets: dict[str, int] = {}
        self._forgotten: set[str] = set()
        self._view = StoredIds(self._offsets, self._forgotten)
        self._recover(repair)
        self._handle = self._path.open("ab")
        self._end = self._handle.tell()

    def _recover(self, repair: bool) -> None:
        if not self._path.exists():
            return
        # Repairing parses every line whole, so that it finds what a look at a line's
        # ends cannot (damage inside a line), and the repaired store reads back whole.
        damaged, incomplete = self._index(whole=repair)
        if incomplete is not None:
            logger.warning("%s: dropping an incomplete last line (interrupted write)", self._path)
            with self._path.open("r+b") as handle:
                handle.truncate(incomplete)
        if not damaged:
            return
        where = ", ".join(f"line {number} ({reason})" for number, reason in damaged[:5])
        if not repair:
            raise StoreError(
                f"{self._path}: {len(damaged)} damaged line(s): {where}; run again with "
                "--repair to drop them and recompute their cases"
            )
        dropped = {number for number, _ in damaged}
        # Line by line, not the whole file in memory: a store may hold gigabytes.
        repaired = self._path.with_suffix(self._path.suffix + ".repair")
        with self._path.open("rb") as source, repaired.open("wb") as target:
            for number, line in enumerate(source, start=1):
                if number not in dropped:
                    target.write(line)
            target.flush()
            os.fsync(target.fileno())
        repaired.replace(self._path)
        logger.warning("%s: dropped %d damaged line(s): %s", self._path, len(damaged), where)
        self._offsets.clear()
        self._index()

    def _index(self, *, whole: bool = False) -> tuple[list[tuple[int, str]], int | None]:
        """Record the id and the start of every whole line of the file, reading it line
        by line, each line parsed whole when ``whole`` is set; the damaged lines, by
        number and reason, and where an incomplete last line starts (None if none)."""
        damaged: list[tuple[int, str]] = []
        offset = 0
        with self._path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                start, offset = offset, offset + len(line)
                if not line.endswith(b"\n"):
                    return damaged, start
                line = line[:-1]
                if not line.strip():
                    continue
                try:
                    case_id = _parse(line).id if whole else line_id(line)
                except (ValueError, json_format.ParseError) as error:
                    damaged.append((number, str(error).splitlines()[0][:120]))
                    continue
                self._offsets[case_id] = start
        return damaged, None

    @property
    def ids(self) -> StoredIds:
        """Ids of the stored cases: a read-only view that follows the store (no copy)."""
        return self._view

    def forget(self, ids: Iterable[str]) -> None:
        """Let the cases ``ids`` be stored again (recomputed); their new lines win."""
        self._forgotten.update(i for i in ids if i in self._offsets)

    def write(self, case: case_pb2.Case) -> bool:
        """Store ``case`` durably unless its id is already stored; say whether it was."""
        if case.id in self._view:
            return False
        record = json_format.MessageToDict(case, preserving_proto_field_name=True)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._forgotten.discard(case.id)
        self._offsets[case.id] = self._end
        self._end += len(line)
        return True

    def cases(self, order: Iterable[str] | None = None) -> Iterator[case_pb2.Case]:
        """Stored cases, each id once: its last line (a recomputed case's newest), each
        parsed once as it is yielded (one case in memory at a time).

        Args:
            order: The ids wanted, in the order to yield them (ids not stored are
                skipped); default: every stored case, in the file's order.

        Raises:
            StoreError: A stored line cannot be parsed (damaged after the store was
                opened, or inside, where opening does not look).
        """
        offsets = self._offsets
        if order is None:
            starts = array("q", sorted(offsets.values()))
        else:
            starts = array("q", (offsets[i] for i in order if i in offsets))
        if not starts:
            return
        self._handle.flush()
        with self._path.open("rb") as handle:
            for start in starts:
                handle.seek(start)
                line = handle.readline()
                try:
                    yield _parse(line)
                except (ValueError, json_format.ParseError) as error:
                    reason = str(error).splitlines()[0][:120]
                    raise StoreError(
                        f"{self._path}: damaged line at byte {start} ({reason}); run again "
                        "with --repair to drop it and recompute its case"
                    ) from None

    def close(self) -> None:
        """Close the file."""
        self._handle.close()


class StoredIds(Set[str]):
    """A read-only view of a store's ids: membership is one set lookup, and the view
    follows the store as it writes and forgets (set operators give frozensets)."""

    def __init__(self, written: Mapping[str, int], forgotten: Set[str]):
        self._written, self._forgotten = written, forgotten

    def __contains__(self, item: object) -> bool:
        return item in self._written and item not in self._forgotten

    def __iter__(self) -> Iterator[str]:
        forgotten = self._forgotten
        return (i for i in self._written if i not in forgotten)

    def __len__(self) -> int:
        return len(self._written) - len(self._forgotten)

    @classmethod
    def _from_iterable(cls, it: Iterable[str]) -> frozenset[str]:  # type: ignore[override]
        return frozenset(it)


# A line as ``write`` makes it starts with the case's id: ``{"id": "<JSON string>"``.
_LINE_ID = re.compile(rb'\{"id": ?("(?:[^"\\]|\\.)*")\s*[,}]')


def line_id(line: bytes) -> str:
    """The case id a stored line holds, read from its start without parsing the case; a
    line that does not start with its id, or does not end as an object does, is parsed
    whole.

    Raises:
        ValueError: The line is not JSON, or not a case with an id.
        json_format.ParseError: The line is JSON but not a case.
    """
    match = _LINE_ID.match(line)
    if match and line.rstrip().endswith(b"}"):
        case_id = json.loads(match.group(1))
        if isinstance(case_id, str) and case_id:
            return case_id
    return _parse(line).id


def _parse(line: bytes) -> case_pb2.Case:
    """The case a stored line holds.

    Raises:
        ValueError: The line is not JSON, or not a case with an id.
    """
    case = json_format.ParseDict(json.loads(line), case_pb2.Case())
    if not case.id:
        raise ValueError("a case without an id")
    return case


def claim_identity(
    state_path: Path,
    *,
    kind: str,
    fingerprint: str,
    new_id: Callable[[], str],
    output_key: str,
) -> str:
    """The identity of the run (a build, an evaluation) an output folder holds: the one
    its state file records, or a new one written there.

    Args:
        state_path: The state file, ``{"<kind>_id": …, "config_fingerprint": …}``.
        kind: ``build`` or ``evaluation``; names the id's key (``build_id``,
            ``eval_id``) and the run in messages.
        fingerprint: The configuration's fingerprint; a folder holding a run of another
            configuration is refused.
        new_id: Makes the id of a new run.
        output_key: The setting that chooses the folder, for the message.

    Raises:
        StoreError: The state file is damaged, or records another configuration.
    """
    key = "eval_id" if kind == "evaluation" else f"{kind}_id"
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
            run_id, recorded = str(state[key]), str(state["config_fingerprint"])
        except (ValueError, KeyError, TypeError):
            raise StoreError(
                f"{state_path} is not a {kind} identity (empty or damaged); remove the folder "
                "or restore the file"
            ) from None
        if recorded != fingerprint:
            raise StoreError(
                f"{state_path.parent} holds {kind} {run_id} made with a different "
                f"configuration (fingerprint {recorded}, now {fingerprint}); choose another "
                f"{output_key} or remove the folder"
            )
        return run_id
    run_id = new_id()
    write_atomically(
        state_path, json.dumps({key: run_id, "config_fingerprint": fingerprint}, indent=2) + "\n"
    )
    return run_id
