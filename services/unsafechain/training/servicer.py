"""The training service: submit, get, list, watch and cancel fine-tuning runs over
the training manager, which runs them as local processes or Kubernetes Jobs.

The service loads no model: its runs do, in their own processes.
"""

from __future__ import annotations

import base64
import logging

import grpc

from unsafechain.runtime.metrics import ServiceMetrics
from unsafechain.runtime.server import InvalidArgument, Servicer, require, require_at_most
from unsafechain.runtime.settings import RequestLimits
from unsafechain.training.manager import (
    STATE_FROM_PB,
    Executor,
    RunNotFound,
    TrainingManager,
    run_to_pb,
)
from unsafechain.training.settings import TrainingServiceSettings
from unsafechain.v1 import training_pb2, training_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _page_offset(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, number = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(number)
    except (ValueError, UnicodeDecodeError):
        offset = -1
    require(offset >= 0 and kind == "offset", "page_token", "not a token this service gave")
    return offset


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer, Servicer):
    """Answers the training calls from ``manager``.

    Args:
        manager: Holds the runs.
        limits: Bounds on one request (``max_chars`` bounds a spec's ``config``).
    """

    name = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name

    def __init__(self, manager: TrainingManager, *, limits: RequestLimits | None = None):
        super().__init__(limits=limits)
        self.manager = manager

    def register(self, server: grpc.aio.Server) -> None:
        training_pb2_grpc.add_TrainingServiceServicer_to_server(self, server)

    async def SubmitTrainingRun(
        self, request: training_pb2.SubmitTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.SubmitTrainingRunResponse:
        """Record and start a run; a request id seen before answers the earlier run."""
        require(request.HasField("spec"), "spec", "is required")
        require_at_most(
            len(request.spec.config),
            self._limits.max_chars,
            "spec.config",
            "characters",
            "limits.max_chars",
        )
        require(len(request.request_id) <= 256, "request_id", "at most 256 characters")
        run, created = await self.manager.submit(request.spec, request.request_id)
        return training_pb2.SubmitTrainingRunResponse(run=run_to_pb(run), created=created)

    async def GetTrainingRun(
        self, request: training_pb2.GetTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.GetTrainingRunResponse:
        """The run as it stands."""
        run = await self._run(request.run_id, context)
        return training_pb2.GetTrainingRunResponse(run=run_to_pb(run))

    async def CancelTrainingRun(
        self, request: training_pb2.CancelTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.CancelTrainingRunResponse:
        """Ask the run to stop; answered at once, the run ends CANCELLED shortly."""
        await self._run(request.run_id, context)
        run = await self.manager.cancel(request.run_id)
        return training_pb2.CancelTrainingRunResponse(run=run_to_pb(run))

    async def ListTrainingRuns(
        self, request: training_pb2.ListTrainingRunsRequest, context: grpc.aio.ServicerContext
    ) -> training_pb2.ListTrainingRunsResponse:
        """The runs, newest first, a page at a time."""
        for position, state in enumerate(request.states):
            require(state in STATE_FROM_PB, f"states[{position}]", "not a run state")
        require(request.page_size >= 0, "page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        offset = _page_offset(request.page_token)
        runs = self.manager.list(STATE_FROM_PB[state] for state in request.states)
        page = runs[offset : offset + size]
        more = offset + size < len(runs)
        return training_pb2.ListTrainingRunsResponse(
            runs=[run_to_pb(run) for run in page],
            next_page_token=_page_token(offset + size) if more else "",
        )

    async def WatchTrainingRun(
        self, request: training_pb2.WatchTrainingRunRequest, context: grpc.aio.ServicerContext
    ):
        """The run now, at each change, and at least every heartbeat, until it ends."""
        await self._run(request.run_id, context)
        async for run in self.manager.watch(request.run_id):
            yield training_pb2.WatchTrainingRunResponse(run=run_to_pb(run))

    async def _run(self, run_id: str, context: grpc.aio.ServicerContext):
        # Streaming calls are not wrapped by the interceptor's error mapping, so the
        # lookups answer their own status.
        if not run_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id: must not be empty")
        try:
            return self.manager.get(run_id)
        except RunNotFound:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"run_id: no run {run_id!r}")

    async def start(self) -> None:
        """Load the runs and give them to their executors."""
        await self.manager.start()

    async def check(self) -> None:
        await self.manager.check()

    async def aclose(self) -> None:
        await self.manager.aclose()
        await super().aclose()


def build_executors(settings: TrainingServiceSettings) -> dict[str, Executor]:
    """The executors the settings configure."""
    from unsafechain.training.local import LocalExecutor

    executors: dict[str, Executor] = {"local": LocalExecutor(settings.local)}
    if settings.kubernetes is not None:
        from unsafechain.training.kube import KubernetesExecutor

        executors["kubernetes"] = KubernetesExecutor(settings.kubernetes)
    return executors


def create_servicer(settings: TrainingServiceSettings, metrics: ServiceMetrics) -> TrainingServicer:
    """The training servicer the settings describe; it takes over its runs when the
    server starts."""
    manager = TrainingManager(settings, build_executors(settings), registry=metrics.registry)
    return TrainingServicer(manager, limits=settings.limits)


__all__ = ["InvalidArgument", "TrainingServicer", "build_executors", "create_servicer"]
