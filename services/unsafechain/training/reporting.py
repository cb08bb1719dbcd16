"""The lines a training process writes so that whoever started it can follow it.

``unsafechain train --report-to -`` writes one JSON object per line on stdout for each
thing that happened: the process started, a metrics entry was logged, the run ended.
The training service reads them from the process's log, a local file or a Kubernetes
pod log, where they sit among ordinary log lines: each begins with :data:`MARKER`, so
nothing else is taken for one. A report is self-contained and repeating one is
harmless, so a reader that reads a log again from its start (after a reconnect, or a
restart of the service) ends in the same state.

Reports:

- ``{"report": "started", "pid": …, "settings_fingerprint": …}``
- ``{"report": "metrics", "step": …, "max_steps": …, "loss": …, …}`` (the
  engine's ``on_metrics`` entry)
- ``{"report": "finished", "state": "succeeded" | "cancelled", "run_id": …,
  "step": …, "max_steps": …, "final_loss": …, "outputs": {…}}``
- ``{"report": "failed", "message": …}``
"""

from __future__ import annotations

import json
import math
import threading
from typing import IO, Any

MARKER = '{"unsafechain_report": '
"""How every report line begins."""


class RunReporter:
    """Writes reports to ``stream``, one line each, flushed at once.

    Args:
        stream: Where the lines go (stdout of a run the service started).
    """

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._lock = threading.Lock()

    def report(self, kind: str, **fields: Any) -> None:
        """Write the report ``kind`` with ``fields`` (non-finite numbers as null)."""
        content = {key: _finite(value) for key, value in fields.items()}
        # The kind first: json.dumps keeps the order, so the line begins with MARKER.
        line = json.dumps({"unsafechain_report": kind, **content}, allow_nan=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def parse_report(line: str) -> dict[str, Any] | None:
    """The report a log line holds (``report`` names its kind); None for any other
    line, a damaged one included."""
    line = line.strip()
    if not line.startswith(MARKER):
        return None
    try:
        content = json.loads(line)
    except ValueError:
        return None
    if not isinstance(content, dict) or not isinstance(content.get("unsafechain_report"), str):
        return None
    content["report"] = content.pop("unsafechain_report")
    return content


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
