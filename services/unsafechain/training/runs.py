"""The training service's runs: one record per run, kept in a folder on a volume.

The folder is the source of truth for what the service knows about its runs across
its restarts: each run's spec and resolved settings, its state, its latest metrics
and where it runs. A Kubernetes Job is found again by the run id in its labels; a
finished Job may be deleted (``ttlSecondsAfterFinished``), its record stays. Records
are rewritten whole and atomically, so a crash leaves the old record or the new one.

    <state_dir>/runs/<run id>.json    the record
    <state_dir>/logs/<run id>.log     a local run's output (its reports among its logs)
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unsafechain.domain.files import write_atomically

logger = logging.getLogger(__name__)

RunState = Literal["pending", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# Keys of a metrics report that are not metrics of the run.
_NOT_METRICS = frozenset({"report", "step", "max_steps"})


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_run_id() -> str:
    """``run-20261202-031500-1a2b3c4d``: sortable by time, and a valid part of a
    Kubernetes name."""
    return f"run-{utc_now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


class RunRecord(BaseModel):
    """What the service knows about one run.

    Attributes:
        id: The run's id.
        request_id: The submit's idempotency key.
        executor: ``local`` or ``kubernetes``.
        state: Where the run stands.
        message: Detail on the state (why it waits, why it failed).
        spec: The spec as submitted (its JSON form).
        settings: The run's resolved settings (the ``unsafechain train`` schema).
        created_at: When it was submitted.
        updated_at: When the record last changed.
        started_at: When a process of it first started training.
        finished_at: When it ended.
        step: Optimizer steps done.
        max_steps: Optimizer steps of the run; 0 until known.
        metrics: The latest value of each logged metric.
        executor_ref: ``job/<namespace>/<name>`` or ``process/<pid>``.
        restarts: Times it was started again after an interruption.
        cancel_requested: A cancel was asked for; the run ends CANCELLED.
        process: A local run's process: pid and the start time that tells it from a
            later process with the same pid.
        log_offset: Bytes of a local run's log already read.
        outputs: What a finished run left (``adapter``, ``merged``, ``model`` …),
            paths relative to its output folder.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str
    request_id: str
    executor: Literal["local", "kubernetes"]
    state: RunState = "pending"
    message: str = ""
    spec: dict[str, Any]
    settings: dict[str, Any]
    created_at: datetime = Field(default_factory=utc_now)
    updated_at: datetime = Field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    step: int = 0
    max_steps: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    executor_ref: str = ""
    restarts: int = 0
    cancel_requested: bool = False
    process: dict[str, int] | None = None
    log_offset: int = 0
    outputs: dict[str, str] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """Whether the run has ended."""
        return self.state in TERMINAL

    @property
    def output_dir(self) -> str:
        """The run's output folder, as the run sees it."""
        return str(self.settings["output"]["dir"])


def apply_report(run: RunRecord, report: dict[str, Any]) -> dict[str, Any]:
    """The changes a report of the run's process makes to its record (see
    :mod:`unsafechain.training.reporting`); the final state is the executor's to
    decide, from how the process ended."""
    kind = report.get("report")
    changes: dict[str, Any] = {}
    if kind == "started" and not run.terminal:
        changes["state"] = "running"
        changes["message"] = ""
        if run.started_at is None:
            changes["started_at"] = utc_now()
    elif kind == "metrics":
        metrics = dict(run.metrics)
        for key, value in report.items():
            if key not in _NOT_METRICS and isinstance(value, int | float) and value is not True:
                metrics[key] = float(value)
        changes["metrics"] = metrics
        for key in ("step", "max_steps"):
            if isinstance(report.get(key), int):
                changes[key] = report[key]
        if not run.terminal and run.state != "running":
            changes["state"] = "running"
    elif kind == "finished":
        for key in ("step", "max_steps"):
            if isinstance(report.get(key), int):
                changes[key] = report[key]
        if isinstance(report.get("outputs"), dict):
            changes["outputs"] = {str(k): str(v) for k, v in report["outputs"].items()}
        if isinstance(report.get("final_loss"), int | float):
            changes["metrics"] = {**run.metrics, "loss": float(report["final_loss"])}
    elif kind == "failed" and isinstance(report.get("message"), str):
        changes["message"] = report["message"]
    return changes


class RunStore:
    """The records of a service's runs, one JSON file each under ``folder``.

    Args:
        folder: The service's state folder.

    Raises:
        OSError: The folder cannot be created.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._runs_dir = folder / "runs"
        self.logs_dir = folder / "logs"
        self._runs_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)

    def load(self) -> list[RunRecord]:
        """Every record; a damaged one is logged and left aside (renamed), never
        fatal."""
        runs = []
        for path in sorted(self._runs_dir.glob("*.json")):
            try:
                runs.append(RunRecord.model_validate(json.loads(path.read_text("utf-8"))))
            except (OSError, ValueError, ValidationError) as error:
                aside = path.with_suffix(".damaged")
                logger.error("run record %s is damaged (%s); moved to %s", path, error, aside)
                path.replace(aside)
        return runs

    def save(self, run: RunRecord) -> None:
        """Write ``run``'s record whole."""
        write_atomically(self._runs_dir / f"{run.id}.json", run.model_dump_json(indent=2) + "\n")

    def log_path(self, run_id: str) -> Path:
        """Where a local run's output goes."""
        return self.logs_dir / f"{run_id}.log"


def index_by_request(runs: Iterable[RunRecord]) -> dict[str, str]:
    """Request id → run id."""
    return {run.request_id: run.id for run in runs}
