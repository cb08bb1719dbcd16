"""The training service's engine: runs submitted, recorded, handed to an executor,
followed and cancelled. No gRPC here; the servicer is a thin layer over it.

Everything happens on one event loop: executors that watch from threads (the
Kubernetes one) post their observations to it. Each change to a run is saved at once
and wakes the run's watchers.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter, Gauge

from unsafechain.domain.settings import ConfigError, set_dotted
from unsafechain.runtime.server import InvalidArgument
from unsafechain.runtime.settings import merge_mappings
from unsafechain.training.runs import (
    TERMINAL,
    RunRecord,
    RunStore,
    apply_report,
    index_by_request,
    new_run_id,
    utc_now,
)
from unsafechain.training.settings import (
    TrainingServiceSettings,
    TrainingSettings,
    training_settings_from_text,
)
from unsafechain.v1 import training_pb2

logger = logging.getLogger(__name__)

_OBJECTIVES = {
    training_pb2.TRAINING_OBJECTIVE_SFT: "sft",
    training_pb2.TRAINING_OBJECTIVE_DPO: "dpo",
}
_METHODS = {training_pb2.TRAINING_METHOD_LORA: "lora", training_pb2.TRAINING_METHOD_FULL: "full"}
_EXECUTORS = {
    training_pb2.TRAINING_EXECUTOR_LOCAL: "local",
    training_pb2.TRAINING_EXECUTOR_KUBERNETES: "kubernetes",
}
STATE_TO_PB = {
    "pending": training_pb2.TRAINING_RUN_STATE_PENDING,
    "running": training_pb2.TRAINING_RUN_STATE_RUNNING,
    "succeeded": training_pb2.TRAINING_RUN_STATE_SUCCEEDED,
    "failed": training_pb2.TRAINING_RUN_STATE_FAILED,
    "cancelled": training_pb2.TRAINING_RUN_STATE_CANCELLED,
}
STATE_FROM_PB = {value: key for key, value in STATE_TO_PB.items()}
EXECUTOR_TO_PB = {value: key for key, value in _EXECUTORS.items()}


class RunNotFound(KeyError):
    """No run has the id asked for."""


class Executor(abc.ABC):
    """Runs a service's runs somewhere: processes beside it, Kubernetes Jobs.

    An executor tells the manager what its runs do through :meth:`TrainingManager.update`
    and :meth:`TrainingManager.report`, on the manager's event loop.
    """

    name: str

    @abc.abstractmethod
    async def start(self, manager: TrainingManager, runs: list[RunRecord]) -> None:
        """Begin work, taking over ``runs``: this executor's runs that have not ended,
        as the records left them when the service last stopped."""

    @abc.abstractmethod
    async def launch(self, run: RunRecord) -> None:
        """Start ``run`` (just submitted)."""

    @abc.abstractmethod
    async def cancel(self, run: RunRecord) -> None:
        """Stop ``run``: it saves a checkpoint if it can, then ends CANCELLED."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise when runs cannot be started."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop work (the service is shutting down)."""


def spec_overrides(spec: training_pb2.TrainingSpec) -> dict[str, object]:
    """The run configuration keys the spec's fields set (those not left at zero)."""
    overrides: dict[str, object] = {}
    simple: list[tuple[str, object]] = [
        ("model.base", spec.base_model),
        ("dataset.path", spec.dataset_uri),
        ("dataset.subset", spec.subset),
        ("output.dir", spec.output_uri),
        ("objective", _OBJECTIVES.get(spec.objective)),
        ("method", _METHODS.get(spec.method)),
        ("lora.rank", spec.lora.rank),
        ("lora.alpha", spec.lora.alpha),
        ("lora.dropout", spec.lora.dropout),
        ("lora.target_modules", list(spec.lora.target_modules)),
        ("training.epochs", spec.epochs),
        ("training.learning_rate", spec.learning_rate),
        ("training.effective_batch_size", spec.effective_batch_size),
        ("training.max_length", spec.max_length),
    ]
    for key, value in simple:
        if value:
            overrides[key] = value
    if spec.HasField("seed"):
        overrides["training.seed"] = spec.seed
    return overrides


def resolve_settings(
    spec: training_pb2.TrainingSpec,
    service: TrainingServiceSettings,
    run_id: str,
) -> TrainingSettings:
    """The run's settings: the service's defaults, the spec's ``config`` over them, the
    spec's fields over that, and an output folder under the service's output root when
    none is named.

    Raises:
        InvalidArgument: The result is not a valid run; names the key.
    """
    raw: dict[str, Any] = {}
    if service.defaults is not None:
        try:
            loaded = yaml.safe_load(service.defaults.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise InvalidArgument(
                "spec", f"the service's defaults {service.defaults}: {error}"
            ) from None
        raw = loaded if isinstance(loaded, dict) else {}
    if spec.config.strip():
        try:
            given = yaml.safe_load(spec.config)
        except yaml.YAMLError as error:
            raise InvalidArgument("spec.config", f"not valid YAML or JSON: {error}") from None
        if not isinstance(given, dict):
            raise InvalidArgument("spec.config", "the top level must be a mapping of sections")
        raw = merge_mappings(raw, given)
    try:
        set_dotted(raw, spec_overrides(spec), where="spec")
        if not (raw.get("output") or {}).get("dir"):
            set_dotted(
                raw, {"output.dir": str(service.output_root.absolute() / run_id)}, where="spec"
            )
        return training_settings_from_text(yaml.safe_dump(raw), where="spec")
    except ConfigError as error:
        raise InvalidArgument("spec", str(error).removeprefix("spec: ")) from None


def run_to_pb(run: RunRecord) -> training_pb2.TrainingRun:
    """The run as the service answers it."""
    message = training_pb2.TrainingRun(
        id=run.id,
        spec=json_format.ParseDict(run.spec, training_pb2.TrainingSpec()),
        state=STATE_TO_PB[run.state],
        message=run.message,
        metrics=run.metrics,
        step=run.step,
        max_steps=run.max_steps,
        executor_ref=run.executor_ref,
        request_id=run.request_id,
        restarts=run.restarts,
    )
    message.spec.executor = EXECUTOR_TO_PB[run.executor]
    message.spec.output_uri = run.output_dir
    message.created_at.FromDatetime(run.created_at)
    message.updated_at.FromDatetime(run.updated_at)
    if run.started_at is not None:
        message.started_at.FromDatetime(run.started_at)
    if run.finished_at is not None:
        message.finished_at.FromDatetime(run.finished_at)
    return message


class RunMetrics:
    """The service's run series: runs by state, submits by outcome."""

    def __init__(self, registry: CollectorRegistry):
        self.runs = Gauge(
            "unsafechain_training_runs",
            "Training runs the service knows, by state and executor.",
            ("state", "executor"),
            registry=registry,
        )
        self.submits = Counter(
            "unsafechain_training_submits",
            "Submit calls, by outcome: created, or duplicate (a request id seen before).",
            ("outcome",),
            registry=registry,
        )

    def count(self, runs: Iterable[RunRecord]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for run in runs:
            counts[(run.state, run.executor)] = counts.get((run.state, run.executor), 0) + 1
        for state in STATE_TO_PB:
            for executor in _EXECUTORS.values():
                self.runs.labels(state, executor).set(counts.get((state, executor), 0))


class TrainingManager:
    """Submits, records, follows and cancels runs.

    Args:
        settings: The service's settings.
        executors: The executors by name (``local``, ``kubernetes``).
        registry: Where the run series go; none: not recorded.
        heartbeat: Seconds after which a watcher gets the run again, changed or not.
    """

    def __init__(
        self,
        settings: TrainingServiceSettings,
        executors: Mapping[str, Executor],
        *,
        registry: CollectorRegistry | None = None,
        heartbeat: float = 15.0,
    ):
        self.settings = settings
        self.store = RunStore(settings.state_dir)
        self._executors = dict(executors)
        self._runs: dict[str, RunRecord] = {}
        self._by_request: dict[str, str] = {}
        self._changed = asyncio.Condition()
        self._submitting = asyncio.Lock()
        self._metrics = RunMetrics(registry) if registry is not None else None
        self.heartbeat = heartbeat

    async def start(self) -> None:
        """Load the records and give each executor its runs that have not ended."""
        runs = self.store.load()
        self._runs = {run.id: run for run in runs}
        self._by_request = index_by_request(runs)
        for name, executor in self._executors.items():
            live = [run for run in runs if run.executor == name and not run.terminal]
            if live:
                logger.info("%s executor takes over %d run(s)", name, len(live))
            await executor.start(self, live)
        orphans = [run for run in runs if run.executor not in self._executors and not run.terminal]
        for run in orphans:
            self.update(
                run.id,
                state="failed",
                message=f"the service no longer has the {run.executor} executor that ran it",
            )
        self._count()

    async def submit(
        self, spec: training_pb2.TrainingSpec, request_id: str
    ) -> tuple[RunRecord, bool]:
        """Record and launch a run; a request id seen before gives its run, unlaunched.

        Raises:
            InvalidArgument: The spec is not a valid run here.
        """
        async with self._submitting:
            known = self._by_request.get(request_id) if request_id else None
            if known is not None:
                if self._metrics:
                    self._metrics.submits.labels("duplicate").inc()
                return self._runs[known], False
            executor_name = _EXECUTORS.get(spec.executor, self.settings.default_executor)
            executor = self._executors.get(executor_name)
            if executor is None:
                raise InvalidArgument(
                    "spec.executor", f"this service has no {executor_name} executor configured"
                )
            run_id = new_run_id()
            settings = resolve_settings(spec, self.settings, run_id)
            if executor_name == "local":
                _check_local_paths(settings)
            run = RunRecord(
                id=run_id,
                request_id=request_id or run_id,
                executor=executor_name,
                spec=json_format.MessageToDict(spec),
                settings=settings.model_dump(mode="json"),
            )
            self._runs[run.id] = run
            self._by_request[run.request_id] = run.id
            self.store.save(run)
            logger.info(
                "run %s submitted: %s %s of %s on %s, to %s (%s)",
                run.id,
                settings.objective,
                settings.method,
                settings.model.base,
                settings.dataset.path,
                settings.output.dir,
                executor_name,
            )
            if self._metrics:
                self._metrics.submits.labels("created").inc()
            self._count()
        await executor.launch(run)
        return self._runs[run.id], True

    def get(self, run_id: str) -> RunRecord:
        """The run ``run_id``.

        Raises:
            RunNotFound: No such run.
        """
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunNotFound(run_id) from None

    def list(self, states: Iterable[str] = ()) -> list[RunRecord]:
        """The runs (in ``states`` when given), newest first."""
        wanted = set(states)
        runs = [run for run in self._runs.values() if not wanted or run.state in wanted]
        return sorted(runs, key=lambda run: (run.created_at, run.id), reverse=True)

    async def cancel(self, run_id: str) -> RunRecord:
        """Ask the run to stop; an ended run is answered as it is.

        Raises:
            RunNotFound: No such run.
        """
        run = self.get(run_id)
        if run.terminal:
            return run
        if not run.cancel_requested:
            self.update(run_id, cancel_requested=True, message="cancelling")
            logger.info("run %s: cancel requested", run_id)
        await self._executors[run.executor].cancel(self._runs[run_id])
        return self._runs[run_id]

    async def watch(self, run_id: str) -> AsyncIterator[RunRecord]:
        """The run now, then at each change, and at least every ``heartbeat`` seconds,
        until it has ended (the last one yielded).

        Raises:
            RunNotFound: No such run.
        """
        run = self.get(run_id)
        yield run
        while not run.terminal:
            async with self._changed:
                try:
                    async with asyncio.timeout(self.heartbeat):
                        await self._changed.wait_for(partial(self._changed_since, run_id, run))
                except TimeoutError:
                    pass
            run = self._runs[run_id]
            yield run

    def update(self, run_id: str, **changes: Any) -> RunRecord:
        """Change the run's record, save it and wake its watchers. An ended run keeps
        its state."""
        run = self._runs[run_id]
        if run.terminal:
            changes.pop("state", None)
            changes.pop("message", None)
        changes = {key: value for key, value in changes.items() if getattr(run, key) != value}
        if not changes:
            return run
        if changes.get("state") in TERMINAL and run.finished_at is None:
            changes.setdefault("finished_at", utc_now())
        updated = run.model_copy(update={**changes, "updated_at": utc_now()})
        self._runs[run_id] = updated
        self.store.save(updated)
        if "state" in changes:
            logger.info(
                "run %s: %s%s",
                run_id,
                updated.state.upper(),
                f" ({updated.message})" if updated.message else "",
            )
            self._count()
        self._wake()
        return updated

    def report(self, run_id: str, report: dict[str, Any]) -> RunRecord:
        """Apply a report the run's process wrote."""
        return self.update(run_id, **apply_report(self._runs[run_id], report))

    def run_for(self, run_id: str) -> RunRecord | None:
        """The run ``run_id``, None when there is none."""
        return self._runs.get(run_id)

    async def check(self) -> None:
        """Raise when an executor cannot start runs."""
        for executor in self._executors.values():
            await executor.check()

    async def aclose(self) -> None:
        """Stop the executors (local runs stop at a checkpoint, to resume when the
        service starts again; Kubernetes Jobs go on without it)."""
        for executor in self._executors.values():
            await executor.aclose()

    def _changed_since(self, run_id: str, seen: RunRecord) -> bool:
        return self._runs[run_id] is not seen

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _count(self) -> None:
        if self._metrics is not None:
            self._metrics.count(self._runs.values())


def _check_local_paths(settings: TrainingSettings) -> None:
    """A local run's dataset must be on this machine: refused at submit, not later."""
    if not Path(settings.dataset.path).exists():
        raise InvalidArgument(
            "spec.dataset_uri", f"{settings.dataset.path} does not exist on the service's machine"
        )
