"""The correction service: rewrite an unsafe completion, re-judge it, retry within a
bound, over the correction engine."""

from __future__ import annotations

import logging

import grpc

from unsafechain.backends.pool import BackendPool
from unsafechain.correction.engine import CorrectionEngine
from unsafechain.correction.factory import correction_engine
from unsafechain.correction.settings import CorrectionServiceSettings
from unsafechain.domain.convert import correction_to_pb, corrector_info_to_pb, unsafe_categories
from unsafechain.judge.factory import build_judge_engine
from unsafechain.runtime.metrics import ServiceMetrics
from unsafechain.runtime.server import Servicer, requested_targets, require, require_at_most
from unsafechain.runtime.settings import RequestLimits
from unsafechain.v1 import correction_pb2, correction_pb2_grpc

logger = logging.getLogger(__name__)


class CorrectionServicer(correction_pb2_grpc.CorrectionServiceServicer, Servicer):
    """Corrects unsafe completions through the correction engine.

    Args:
        engine: Corrects and re-judges.
        pool: The models, released by :meth:`aclose`.
        limits: Bounds on one request.
    """

    name = correction_pb2.DESCRIPTOR.services_by_name["CorrectionService"].full_name

    def __init__(
        self,
        engine: CorrectionEngine,
        *,
        pool: BackendPool | None = None,
        limits: RequestLimits | None = None,
    ):
        self._engine = engine
        super().__init__(pool=pool, limits=limits)

    def register(self, server: grpc.aio.Server) -> None:
        correction_pb2_grpc.add_CorrectionServiceServicer_to_server(self, server)

    async def Correct(
        self, request: correction_pb2.CorrectRequest, context: grpc.aio.ServicerContext
    ) -> correction_pb2.CorrectResponse:
        """Correct one unsafe completion; every attempt comes back re-judged."""
        require(bool(request.prompt.strip()), "prompt", "must not be empty")
        require(request.HasField("completion"), "completion", "is required")
        require(bool(request.completion.text.strip()), "completion.text", "must not be empty")
        size = len(request.prompt) + len(request.completion.text)
        require_at_most(size, self._limits.max_chars, "prompt", "characters", "limits.max_chars")
        targets = requested_targets(request.targets)
        outcome = await self._engine.correct(
            request.prompt,
            request.completion.text,
            list(request.categories) or unsafe_categories(request.completion),
            seed=request.seed if request.HasField("seed") else None,
            targets=targets or None,
        )
        return correction_pb2.CorrectResponse(
            correction=correction_to_pb(outcome, request.completion.index, self._engine.ref)
        )

    async def Info(
        self, request: correction_pb2.CorrectionInfoRequest, context: grpc.aio.ServicerContext
    ) -> correction_pb2.CorrectionInfoResponse:
        """The corrector, its sampling, its bound on attempts and its re-judging judges."""
        return corrector_info_to_pb(await self._engine.describe())

    async def check(self) -> None:
        await self._engine.check()


def create_servicer(
    settings: CorrectionServiceSettings, metrics: ServiceMetrics
) -> CorrectionServicer:
    """The correction servicer the settings describe, corrector and judges loaded."""
    pool = BackendPool(settings.models, wrap=metrics.timed)
    engine = correction_engine(
        settings.correction, settings.judging, pool, build_judge_engine(settings.judging, pool)
    )
    assert isinstance(engine, CorrectionEngine)
    return CorrectionServicer(engine, pool=pool, limits=settings.limits)
