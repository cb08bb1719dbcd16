"""The run folder's identity and its checkpoints: what lets a stopped or killed run
resume with the same command, and refuses to mix two runs in one folder.

``run-state.json`` holds the run id, the settings' and the data's fingerprints and one
entry per session (start, the checkpoint it resumed from, end). A checkpoint counts once
its ``trainer_state.json`` is whole: the trainer writes it last, so a folder that a kill
cut short is passed over for the one before.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from unsafechain.domain.settings import SetupError
from unsafechain.training.record import write_json

logger = logging.getLogger(__name__)

RUN_STATE = "run-state.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunFolderError(SetupError):
    """The output folder holds another run; the message says what differs."""


def now() -> str:
    """The current UTC time as RFC 3339 text."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step of a ``checkpoint-N`` folder; None for another name."""
    match = _CHECKPOINT.match(path.name)
    return int(match[1]) if match else None


def last_checkpoint(folder: Path) -> Path | None:
    """The latest whole checkpoint in ``folder``, or None."""
    candidates = sorted(
        (step, path)
        for path in folder.glob("checkpoint-*")
        if path.is_dir() and (step := checkpoint_step(path)) is not None
    )
    for step, path in reversed(candidates):
        try:
            state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("checkpoint %s is incomplete (killed while saving?); passed over", path)
            continue
        if state.get("global_step") == step:
            return path
    return None


@dataclass
class RunFolder:
    """The state file of one run's output folder.

    Attributes:
        folder: The output folder.
        run_id: The run's identity, kept across resumes.
        settings_fingerprint: What the run computes (``TrainingSettings.fingerprint``).
        data_fingerprint: The rows' content (``TrainingData.fingerprint``).
        sessions: One entry per start of the run.
    """

    folder: Path
    run_id: str
    settings_fingerprint: str
    data_fingerprint: str
    sessions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def claim(cls, folder: Path, settings_fingerprint: str, data_fingerprint: str) -> RunFolder:
        """The run in ``folder``: the one recorded there, or a new one.

        Raises:
            RunFolderError: The folder holds a run with other settings or other data.
        """
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RUN_STATE
        if not path.exists():
            if any(folder.glob("checkpoint-*")):
                raise RunFolderError(
                    f"output.dir: {folder} holds checkpoints but no {RUN_STATE}: not a run "
                    "this platform started; use another folder"
                )
            run_id = f"run-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
            return cls(folder, run_id, settings_fingerprint, data_fingerprint)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RunFolderError(f"output.dir: cannot read {path}: {error}") from None
        recorded = cls(
            folder,
            state["run_id"],
            state["settings_fingerprint"],
            state["data_fingerprint"],
            state.get("sessions", []),
        )
        for what, old, new in (
            ("settings", recorded.settings_fingerprint, settings_fingerprint),
            ("data", recorded.data_fingerprint, data_fingerprint),
        ):
            if old != new:
                raise RunFolderError(
                    f"output.dir: {folder} holds run {recorded.run_id} made with other {what} "
                    f"(fingerprint {old}, now {new}); resume it with its own settings and "
                    "data, or use another folder"
                )
        return recorded

    def save(self) -> None:
        """Write the state file."""
        write_json(
            self.folder / RUN_STATE,
            {
                "run_id": self.run_id,
                "settings_fingerprint": self.settings_fingerprint,
                "data_fingerprint": self.data_fingerprint,
                "sessions": self.sessions,
            },
        )

    def start_session(self, resumed_from: Path | None) -> dict[str, Any]:
        """Record a start of the run (a resume when ``resumed_from`` is a checkpoint)."""
        session: dict[str, Any] = {
            "started_at": now(),
            "resumed_from": resumed_from.name if resumed_from else None,
            "start_step": checkpoint_step(resumed_from) if resumed_from else 0,
        }
        self.sessions.append(session)
        self.save()
        return session

    def end_session(
        self, session: dict[str, Any], *, state: str, step: int, seconds: float
    ) -> None:
        """Record how the session ended."""
        session.update(finished_at=now(), state=state, end_step=step, seconds=round(seconds, 2))
        self.save()
