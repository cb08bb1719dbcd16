"""The case store: finished cases appended to a JSONL file, idempotent by case id.

It is what makes a build resumable: a case is durable once its line is flushed and
synced, and a resumed build skips every id already stored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
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
    unless ``repair`` drops it (its case is then recomputed too). A case id written
    twice is kept once, except after :meth:`forget`, when its newer line wins.

    Args:
        path: The JSONL file.
        repair: Drop damaged lines that are not the last instead of refusing.

    Raises:
        StoreError: A line other than the last is damaged and ``repair`` is off.
    """

    def __init__(self, path: Path, *, repair: bool = False):
        self._path = path
        self._ids: set[str] = set()
        self._recover(repair)
        self._handle = self._path.open("a", encoding="utf-8")

    def _recover(self, repair: bool) -> None:
        if not self._path.exists():
            return
        data = self._path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logger.warning("%s: dropping an incomplete last line (interrupted write)", self._path)
            with self._path.open("r+b") as handle:
                handle.truncate(keep)
            data = data[:keep]
        lines = data.split(b"\n")[:-1] if data else []
        damaged = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                self._ids.add(_parse(line).id)
            except (ValueError, json_format.ParseError) as error:
                damaged.append((number, str(error).splitlines()[0][:120]))
        if not damaged:
            return
        where = ", ".join(f"line {number} ({reason})" for number, reason in damaged[:5])
        if not repair:
            raise StoreError(
                f"{self._path}: {len(damaged)} damaged line(s): {where}; run again with "
                "--repair to drop them and recompute their cases"
            )
        dropped = {number for number, _ in damaged}
        kept = [line for number, line in enumerate(lines, start=1) if number not in dropped]
        write_atomically(
            self._path, "".join(line.decode("utf-8", "replace") + "\n" for line in kept)
        )
        logger.warning("%s: dropped %d damaged line(s): %s", self._path, len(damaged), where)

    @property
    def ids(self) -> frozenset[str]:
        """Ids of the stored cases."""
        return frozenset(self._ids)

    def forget(self, ids: Iterable[str]) -> None:
        """Let the cases ``ids`` be stored again (recomputed); their new lines win."""
        self._ids.difference_update(ids)

    def write(self, case: case_pb2.Case) -> bool:
        """Store ``case`` durably unless its id is already stored; say whether it was."""
        if case.id in self._ids:
            return False
        record = json_format.MessageToDict(case, preserving_proto_field_name=True)
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._ids.add(case.id)
        return True

    def cases(self) -> Iterator[case_pb2.Case]:
        """Every stored case, each id once: its last line (a recomputed case's newest)."""
        if not self._path.exists():
            return
        last: dict[str, int] = {}
        with self._path.open("rb") as handle:
            for number, line in enumerate(handle):
                if line.strip():
                    last[_parse(line).id] = number
        wanted = set(last.values())
        with self._path.open("rb") as handle:
            for number, line in enumerate(handle):
                if number in wanted:
                    yield _parse(line)

    def close(self) -> None:
        """Close the file."""
        self._handle.close()


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
