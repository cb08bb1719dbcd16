"""The judge service: single and batched judgments over the judge engine, with
concurrent requests micro-batched into shared model calls."""

from __future__ import annotations

import asyncio
import logging

import grpc

from unsafechain.backends.pool import BackendPool
from unsafechain.domain.convert import TARGET_TO_PB, identity_to_pb, judgment_to_pb
from unsafechain.domain.types import JudgeTarget
from unsafechain.judge.batching import JudgeBatcher
from unsafechain.judge.engine import JudgeEngine
from unsafechain.judge.factory import build_judge_engine
from unsafechain.judge.settings import JudgeServiceSettings
from unsafechain.runtime.metrics import ServiceMetrics
from unsafechain.runtime.server import Servicer, requested_targets, require, require_at_most
from unsafechain.runtime.settings import RequestLimits
from unsafechain.v1 import judge_pb2, judge_pb2_grpc

logger = logging.getLogger(__name__)


def _judge_input(
    request: judge_pb2.JudgeRequest, limits: RequestLimits, prefix: str = ""
) -> tuple[tuple[str, str], tuple[JudgeTarget, ...]]:
    """The (prompt, response) pair and targets of ``request``, validated."""
    require(bool(request.prompt.strip()), f"{prefix}prompt", "must not be empty")
    require(bool(request.response.strip()), f"{prefix}response", "must not be empty")
    size = len(request.prompt) + len(request.response)
    require_at_most(size, limits.max_chars, f"{prefix}prompt", "characters", "limits.max_chars")
    return (request.prompt, request.response), requested_targets(request.targets, prefix)


class JudgeServicer(judge_pb2_grpc.JudgeServiceServicer, Servicer):
    """Judges responses through a :class:`JudgeBatcher` over the engine.

    Args:
        engine: Judges each batch.
        batch_max_size: Most pairs in one model call.
        batch_max_wait: Seconds a request waits for others to share its batch.
        metrics: Records batch sizes.
        pool: The models, released by :meth:`aclose`.
        limits: Bounds on one request.
    """

    name = judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name

    def __init__(
        self,
        engine: JudgeEngine,
        *,
        batch_max_size: int = 32,
        batch_max_wait: float = 0.005,
        metrics: ServiceMetrics | None = None,
        pool: BackendPool | None = None,
        limits: RequestLimits | None = None,
    ):
        self._engine = engine
        self._batcher = JudgeBatcher(
            engine,
            max_size=batch_max_size,
            max_wait=batch_max_wait,
            observe_batch=metrics.batch_size.observe if metrics else None,
        )
        super().__init__(pool=pool, limits=limits)

    def register(self, server: grpc.aio.Server) -> None:
        judge_pb2_grpc.add_JudgeServiceServicer_to_server(self, server)

    async def Judge(
        self, request: judge_pb2.JudgeRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.JudgeResponse:
        """Judge one response."""
        pair, targets = _judge_input(request, self._limits)
        [judgment] = await self._batcher.judge(
            [pair], targets=targets, timeout=context.time_remaining()
        )
        return judgment_to_pb(judgment)

    async def JudgeBatch(
        self, request: judge_pb2.JudgeBatchRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.JudgeBatchResponse:
        """Judge several responses; results come in the order of the items."""
        require(len(request.items) > 0, "items", "must hold at least one item")
        limits = self._limits
        require_at_most(len(request.items), limits.max_items, "items", "items", "limits.max_items")
        inputs = [
            _judge_input(item, limits, f"items[{i}].") for i, item in enumerate(request.items)
        ]
        timeout = context.time_remaining()
        # Each item joins the shared queue, so a batch call and single calls arriving
        # beside it fill the same model batches.
        judged = await asyncio.gather(
            *(
                self._batcher.judge([pair], targets=targets, timeout=timeout)
                for pair, targets in inputs
            )
        )
        return judge_pb2.JudgeBatchResponse(
            results=[judgment_to_pb(judgment) for [judgment] in judged]
        )

    async def Info(
        self, request: judge_pb2.JudgeInfoRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.JudgeInfoResponse:
        """The judges the service runs and the parts it judges by default."""
        return judge_pb2.JudgeInfoResponse(
            judges=[identity_to_pb(identity) for identity in self._engine.identities],
            default_targets=[TARGET_TO_PB[target] for target in self._engine.targets],
        )

    async def check(self) -> None:
        await self._engine.check()

    async def aclose(self) -> None:
        await self._batcher.aclose()
        await super().aclose()


def create_servicer(settings: JudgeServiceSettings, metrics: ServiceMetrics) -> JudgeServicer:
    """The judge servicer the settings describe, every judge's model loaded."""
    pool = BackendPool(settings.models, wrap=metrics.timed)
    return JudgeServicer(
        build_judge_engine(settings.judging, pool),
        batch_max_size=settings.batching.max_size,
        batch_max_wait=settings.batching.max_wait_ms / 1000,
        metrics=metrics,
        pool=pool,
        limits=settings.limits,
    )
