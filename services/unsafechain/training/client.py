"""The training service's client: submit, get, list, cancel and follow runs.

Every submit carries a request id (one is made when the caller gives none), so the
channel's retries of an UNAVAILABLE call, or a caller that submits again after a lost
answer, never start a second run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc

from unsafechain.backends.base import BackendTimeout
from unsafechain.runtime.client import ServiceClient, backend_error
from unsafechain.runtime.settings import ClientSettings
from unsafechain.v1 import training_pb2, training_pb2_grpc

TRAINING_SERVICE = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name

TERMINAL_STATES = frozenset(
    {
        training_pb2.TRAINING_RUN_STATE_SUCCEEDED,
        training_pb2.TRAINING_RUN_STATE_FAILED,
        training_pb2.TRAINING_RUN_STATE_CANCELLED,
    }
)
"""States a run never leaves."""

WATCH_HEARTBEAT_SECONDS = 15.0
"""The service sends a watched run at least this often, changed or not."""


def state_name(state: int) -> str:
    """``succeeded`` for ``TRAINING_RUN_STATE_SUCCEEDED``."""
    return training_pb2.TrainingRunState.Name(state).removeprefix("TRAINING_RUN_STATE_").lower()


class RemoteTrainingClient(ServiceClient):
    """Calls the training service at ``settings.address``."""

    service = TRAINING_SERVICE

    def __init__(self, settings: ClientSettings):
        super().__init__(settings)
        self._stub = training_pb2_grpc.TrainingServiceStub(self._connection.channel)

    async def submit(
        self, spec: training_pb2.TrainingSpec, request_id: str | None = None
    ) -> tuple[training_pb2.TrainingRun, bool]:
        """Submit a run; the run and whether this call created it (False: the request
        id was seen and the run is the earlier one).

        Raises:
            BackendError: The call failed (INVALID_ARGUMENT names the spec's field).
        """
        request = training_pb2.SubmitTrainingRunRequest(
            spec=spec, request_id=request_id or uuid.uuid4().hex
        )
        answer = await self._connection.call(self._stub.SubmitTrainingRun, request)
        return answer.run, answer.created

    async def get(self, run_id: str) -> training_pb2.TrainingRun:
        """The run ``run_id`` as it stands."""
        request = training_pb2.GetTrainingRunRequest(run_id=run_id)
        return (await self._connection.call(self._stub.GetTrainingRun, request)).run

    async def cancel(self, run_id: str) -> training_pb2.TrainingRun:
        """Ask the run to stop; it ends CANCELLED with a checkpoint where it had one."""
        request = training_pb2.CancelTrainingRunRequest(run_id=run_id)
        return (await self._connection.call(self._stub.CancelTrainingRun, request)).run

    async def list(
        self, states: Sequence[training_pb2.TrainingRunState] = (), page_size: int = 100
    ) -> list[training_pb2.TrainingRun]:
        """Every run (in ``states`` when given), newest first, over as many pages as it
        takes."""
        runs: list[training_pb2.TrainingRun] = []
        token = ""
        while True:
            request = training_pb2.ListTrainingRunsRequest(
                states=list(states), page_size=page_size, page_token=token
            )
            answer = await self._connection.call(self._stub.ListTrainingRuns, request)
            runs.extend(answer.runs)
            token = answer.next_page_token
            if not token:
                return runs

    async def watch(self, run_id: str) -> AsyncIterator[training_pb2.TrainingRun]:
        """The run at each change until it ends (the last one yielded is terminal).

        The stream has no overall deadline, a run takes hours; each message must come
        within ``settings.timeout`` plus the service's heartbeat interval.

        Raises:
            BackendError: The stream failed or went silent.
        """
        request = training_pb2.WatchTrainingRunRequest(run_id=run_id)
        call = self._stub.WatchTrainingRun(request, metadata=self._connection.metadata)
        where = f"{self.service} at {self._connection.settings.address}"
        idle = self._connection.settings.timeout + WATCH_HEARTBEAT_SECONDS
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        answer = await call.read()
                except TimeoutError:
                    raise BackendTimeout(
                        f"{where}: no update of run {run_id} for {idle:g}s"
                    ) from None
                if answer is grpc.aio.EOF:
                    return
                yield answer.run
                if answer.run.state in TERMINAL_STATES:
                    return
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, where) from None
        finally:
            call.cancel()
