"""The generation service: K completions of a conversation over the generation engine."""

from __future__ import annotations

import logging

import grpc

from unsafechain.backends.pool import BackendPool
from unsafechain.domain.convert import (
    ROLE_FROM_PB,
    completion_to_pb,
    message_from_pb,
    model_ref_to_pb,
    sampling_from_pb,
    sampling_to_pb,
)
from unsafechain.domain.types import Message, SamplingParams
from unsafechain.generation.engine import GenerationEngine
from unsafechain.generation.factory import generation_engine
from unsafechain.generation.settings import GenerationServiceSettings
from unsafechain.runtime.metrics import ServiceMetrics
from unsafechain.runtime.server import Servicer, require, require_at_most
from unsafechain.runtime.settings import RequestLimits
from unsafechain.v1 import case_pb2, generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)


def _messages(
    request: generation_pb2.GenerateRequest, limits: RequestLimits
) -> tuple[Message, ...]:
    require(len(request.messages) > 0, "messages", "must hold at least one message")
    size = sum(len(message.content) for message in request.messages)
    require_at_most(size, limits.max_chars, "messages", "characters", "limits.max_chars")
    for position, message in enumerate(request.messages):
        require(
            message.role in ROLE_FROM_PB,
            f"messages[{position}].role",
            "must be SYSTEM, USER or ASSISTANT",
        )
    return tuple(message_from_pb(message) for message in request.messages)


def _sampling(message: case_pb2.SamplingParams, limits: RequestLimits) -> SamplingParams:
    require(message.num_samples >= 1, "sampling.num_samples", "must be at least 1")
    require_at_most(
        message.num_samples,
        limits.max_samples,
        "sampling.num_samples",
        "samples",
        "limits.max_samples",
    )
    require_at_most(
        message.max_new_tokens,
        limits.max_new_tokens,
        "sampling.max_new_tokens",
        "tokens",
        "limits.max_new_tokens",
    )
    require(message.temperature >= 0, "sampling.temperature", "must be >= 0")
    require(0 < message.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
    require(message.top_k >= 0, "sampling.top_k", "must be >= 0 (0 is off)")
    require(message.max_new_tokens >= 1, "sampling.max_new_tokens", "must be at least 1")
    require(message.top_logprobs >= 0, "sampling.top_logprobs", "must be >= 0")
    return sampling_from_pb(message)


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer, Servicer):
    """Samples completions through the generation engine.

    A request's own sampling settings are used when it has them, its seed included;
    otherwise the engine's.

    Args:
        engine: Generates with the served model and the default sampling.
        pool: The models, released by :meth:`aclose`.
        limits: Bounds on one request.
    """

    name = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name

    def __init__(
        self,
        engine: GenerationEngine,
        *,
        pool: BackendPool | None = None,
        limits: RequestLimits | None = None,
    ):
        self._engine = engine
        super().__init__(pool=pool, limits=limits)

    def register(self, server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self, server)

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        """Sample completions of the request's conversation."""
        messages = _messages(request, self._limits)
        engine = self._engine
        if request.HasField("sampling"):
            # An engine is a cheap view of a backend and sampling settings.
            engine = GenerationEngine(
                engine.backend,
                _sampling(request.sampling, self._limits),
                prompt_opens_think=engine.prompt_opens_think,
            )
        completions = await engine.generate("", messages=messages)
        return generation_pb2.GenerateResponse(
            completions=[completion_to_pb(c) for c in completions],
            model=model_ref_to_pb(engine.backend.ref),
        )

    async def Info(
        self, request: generation_pb2.GenerationInfoRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerationInfoResponse:
        """The model the service runs and its default sampling."""
        return generation_pb2.GenerationInfoResponse(
            model=model_ref_to_pb(await self._engine.describe()),
            default_sampling=sampling_to_pb(self._engine.params),
        )

    async def check(self) -> None:
        await self._engine.check()


def create_servicer(
    settings: GenerationServiceSettings, metrics: ServiceMetrics
) -> GenerationServicer:
    """The generation servicer the settings describe, its model loaded."""
    pool = BackendPool(settings.models, wrap=metrics.timed)
    engine = generation_engine(settings.generation, pool)
    assert isinstance(engine, GenerationEngine)
    return GenerationServicer(engine, pool=pool, limits=settings.limits)
