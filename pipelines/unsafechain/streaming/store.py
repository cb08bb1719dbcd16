"""The case store: finished cases appended to a JSONL file, idempotent by case id.

It is what makes a build resumable: a case is durable once its line is flushed and
synced, and a resumed build skips every id already stored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import json_format

from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)


class CaseStore:
    """Finished cases of one build, one JSON line each.

    A line cut short by a crash is dropped on open (its case is recomputed); a case
    id written twice is kept once.
    """

    def __init__(self, path: Path):
        self._path = path
        self._ids: set[str] = set()
        self._recover()
        self._handle = self._path.open("a", encoding="utf-8")

    def _recover(self) -> None:
        if not self._path.exists():
            return
        data = self._path.read_bytes()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logger.warning("%s: dropping an incomplete last line (interrupted write)", self._path)
            with self._path.open("r+b") as handle:
                handle.truncate(keep)
        for case in self.cases():
            self._ids.add(case.id)

    @property
    def ids(self) -> frozenset[str]:
        """Ids of the stored cases."""
        return frozenset(self._ids)

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
        """Every stored case, first stored first, each id once."""
        seen: set[str] = set()
        if not self._path.exists():
            return
        with self._path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                case = json_format.ParseDict(json.loads(line), case_pb2.Case())
                if case.id not in seen:
                    seen.add(case.id)
                    yield case

    def close(self) -> None:
        """Close the file."""
        self._handle.close()
