"""The correction service: rewrite an unsafe completion, re-judge it, retry within a
bound, over the correction engine."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from unsafechain.backends.base import ModelBackend
from unsafechain.backends.settings import create_backend
from unsafechain.correction.engine import CorrectionEngine, CorrectionTemplates
from unsafechain.domain.convert import correction_to_pb, unsafe_categories
from unsafechain.judge.engine import JudgeEngine
from unsafechain.judge.servicer import build_judge_engine
from unsafechain.runtime.metrics import ServiceMetrics
from unsafechain.runtime.server import Servicer, require
from unsafechain.runtime.settings import ServiceSettings
from unsafechain.v1 import correction_pb2, correction_pb2_grpc

logger = logging.getLogger(__name__)


class CorrectionServicer(correction_pb2_grpc.CorrectionServiceServicer, Servicer):
    """Corrects unsafe completions through the correction engine.

    Args:
        engine: Corrects and re-judges.
        judge: The engine's re-judging judge, checked for health with the corrector.
        backends: Released by :meth:`aclose`.
    """

    name = correction_pb2.DESCRIPTOR.services_by_name["CorrectionService"].full_name

    def __init__(
        self,
        engine: CorrectionEngine,
        judge: JudgeEngine,
        *,
        backends: Sequence[ModelBackend] = (),
    ):
        self._engine = engine
        self._judge = judge
        self._backends = tuple(backends)

    def register(self, server: grpc.aio.Server) -> None:
        correction_pb2_grpc.add_CorrectionServiceServicer_to_server(self, server)

    async def Correct(
        self, request: correction_pb2.CorrectRequest, context: grpc.aio.ServicerContext
    ) -> correction_pb2.CorrectResponse:
        """Correct one unsafe completion; every attempt comes back re-judged."""
        require(bool(request.prompt.strip()), "prompt", "must not be empty")
        require(request.HasField("completion"), "completion", "is required")
        require(bool(request.completion.text.strip()), "completion.text", "must not be empty")
        outcome = await self._engine.correct(
            request.prompt,
            request.completion.text,
            list(request.categories) or unsafe_categories(request.completion),
            seed=request.seed if request.HasField("seed") else None,
        )
        return correction_pb2.CorrectResponse(
            correction=correction_to_pb(outcome, request.completion.index, self._engine.backend.ref)
        )

    async def check(self) -> None:
        await self._engine.backend.check()
        await self._judge.check()

    async def aclose(self) -> None:
        for backend in self._backends:
            await backend.aclose()


def create_servicer(settings: ServiceSettings, metrics: ServiceMetrics) -> CorrectionServicer:
    """The correction servicer the settings describe, corrector and guard loaded."""
    assert settings.model is not None and settings.judge_model is not None
    corrector = metrics.timed(create_backend(settings.model))
    guard = metrics.timed(create_backend(settings.judge_model))
    judge = build_judge_engine(guard, settings.judge)
    options = settings.correction
    engine = CorrectionEngine(
        corrector,
        judge,
        params=options.params(),
        max_attempts=options.max_attempts,
        templates=CorrectionTemplates.load(options.templates),
    )
    return CorrectionServicer(engine, judge, backends=[corrector, guard])
