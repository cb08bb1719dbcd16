"""Clients of the services, shaped so that a remote service stands in for an engine.

- :func:`remote_generation_engine` is a :class:`GenerationEngine` whose model is a
  generation service (:class:`GenerationServiceBackend`): same ``generate``,
  ``messages``, ``params`` and ``backend.ref`` as the in-process engine.
- :class:`RemoteJudgeEngine` has the judge engine's ``identities``,
  ``judge_completions`` and ``judge_pairs``.
- :class:`RemoteCorrectionEngine` has the correction engine's ``correct``.

Seeds travel with the requests, so a seeded remote call returns what the engine
in-process returns. A failed call raises :class:`BackendError` (``BackendTimeout``
for DEADLINE_EXCEEDED, ``BackendUnavailable`` for UNAVAILABLE and RESOURCE_EXHAUSTED),
as a model backend would.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from unsafechain.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ModelBackend,
)
from unsafechain.correction.engine import CorrectionOutcome
from unsafechain.domain.convert import (
    TARGET_TO_PB,
    correction_from_pb,
    judgment_from_pb,
    message_to_pb,
    sampling_to_pb,
)
from unsafechain.domain.types import (
    Generation,
    GenerationRequest,
    JudgeIdentity,
    JudgeTarget,
    ModelRef,
    SamplingParams,
)
from unsafechain.generation.engine import GenerationEngine
from unsafechain.judge.engine import CompletionJudge, CompletionJudgment
from unsafechain.runtime.settings import ClientSettings
from unsafechain.v1 import (
    case_pb2,
    correction_pb2,
    correction_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    judge_pb2,
    judge_pb2_grpc,
)

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
JUDGE_SERVICE = judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name
CORRECTION_SERVICE = correction_pb2.DESCRIPTOR.services_by_name["CorrectionService"].full_name

# A service that is briefly unreachable (restarting, scaling) is retried by gRPC itself;
# the calls are safe to repeat, their seeds travel with them.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": name}
                    for name in (GENERATION_SERVICE, JUDGE_SERVICE, CORRECTION_SERVICE)
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def open_channel(settings: ClientSettings) -> grpc.aio.Channel:
    """A channel to ``settings.address``: TLS or mutual TLS when the settings ask."""
    limit = settings.max_message_bytes
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.service_config", _SERVICE_CONFIG),
    ]
    if not settings.uses_tls:
        return grpc.aio.insecure_channel(settings.address, options=options)
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.ca_file.read_bytes() if settings.ca_file else None,
        private_key=settings.key_file.read_bytes() if settings.key_file else None,
        certificate_chain=settings.cert_file.read_bytes() if settings.cert_file else None,
    )
    return grpc.aio.secure_channel(settings.address, credentials, options=options)


def backend_error(error: grpc.aio.AioRpcError, where: str) -> BackendError:
    """The backend error a failed call is reported as."""
    message = f"{where}: {error.code().name}: {error.details()}"
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendTimeout(message)
    if error.code() in _UNAVAILABLE:
        return BackendUnavailable(message)
    return BackendError(message)


class ServiceConnection:
    """A channel to one service with the caller's bearer token and deadline.

    Args:
        settings: Where the service is and how to reach it.
        service: The full gRPC service name, for health checks and messages.

    Raises:
        SettingsError: The token file cannot be read.
    """

    def __init__(self, settings: ClientSettings, service: str):
        self.settings = settings
        self.service = service
        self.channel = open_channel(settings)
        token = settings.bearer_token()
        self._metadata = (("authorization", f"Bearer {token.get_secret_value()}"),) if token else ()

    def __repr__(self) -> str:
        return f"ServiceConnection({self.service} at {self.settings.address})"

    async def call(self, method: Any, request: Any) -> Any:
        """Call ``method`` (a stub's multi-callable) with the token and the deadline.

        Raises:
            BackendError: The call failed.
        """
        try:
            return await method(request, timeout=self.settings.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise backend_error(error, f"{self.service} at {self.settings.address}") from None

    async def check(self) -> None:
        """Raise :class:`BackendUnavailable` unless the service reports SERVING."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        answer = await self.call(stub.Check, health_pb2.HealthCheckRequest(service=self.service))
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            raise BackendUnavailable(f"{self.service} at {self.settings.address} is {status}")

    async def aclose(self) -> None:
        """Close the channel."""
        await self.channel.close()


class _ServiceClient:
    """What every client of a service shares: its connection and life cycle."""

    _service: str

    def __init__(self, settings: ClientSettings):
        self._connection = ServiceConnection(settings, self._service)

    async def check(self) -> None:
        """Raise :class:`BackendUnavailable` unless the service reports SERVING."""
        await self._connection.check()

    async def aclose(self) -> None:
        """Close the connection."""
        await self._connection.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class GenerationServiceBackend(_ServiceClient, ModelBackend):
    """A model backend that is a generation service.

    Args:
        settings: How to reach the service.
        ref: The model the service runs, as provenance records it (the service names
            it in every answer, but provenance is written before the first call).
    """

    _service = GENERATION_SERVICE

    def __init__(self, settings: ClientSettings, *, ref: ModelRef | None = None):
        super().__init__(settings)
        self._ref = ref or ModelRef(
            backend="grpc", model=GENERATION_SERVICE, endpoint=settings.address
        )
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._connection.channel)

    @property
    def ref(self) -> ModelRef:
        return self._ref

    async def generate(self, request: GenerationRequest) -> list[Generation]:
        """Sample through the service; conversations only (the service renders them
        with the model's chat template).

        Raises:
            BackendError: The request is a rendered prompt, or the call failed.
        """
        if request.messages is None:
            raise BackendError("the generation service takes conversations, not rendered prompts")
        answer = await self._connection.call(
            self._stub.Generate,
            generation_pb2.GenerateRequest(
                messages=[message_to_pb(message) for message in request.messages],
                sampling=sampling_to_pb(request.params),
            ),
        )
        return [
            Generation(text=completion.text, finish_reason=completion.finish_reason or None)
            for completion in answer.completions
        ]


def remote_generation_engine(
    settings: ClientSettings,
    params: SamplingParams,
    *,
    system_prompt: str = "",
    ref: ModelRef | None = None,
) -> GenerationEngine:
    """A generation engine whose model is the generation service at ``settings.address``.

    Args:
        settings: How to reach the service.
        params: Sampling settings, sent with every request (``n`` is K).
        system_prompt: Optional system turn placed before the prompt.
        ref: The service's model, as provenance records it.
    """
    backend = GenerationServiceBackend(settings, ref=ref)
    return GenerationEngine(backend, params, system_prompt=system_prompt)


class RemoteJudgeEngine(_ServiceClient, CompletionJudge):
    """Stands in for :class:`JudgeEngine`, judging through a judge service.

    Args:
        settings: How to reach the service.
        identities: The service's judges, as provenance records them (verdicts name
            their judge too, but provenance is written before the first call).
    """

    _service = JUDGE_SERVICE

    def __init__(self, settings: ClientSettings, identities: Sequence[JudgeIdentity] = ()):
        super().__init__(settings)
        self._identities = tuple(identities)
        self._stub = judge_pb2_grpc.JudgeServiceStub(self._connection.channel)

    @property
    def identities(self) -> tuple[JudgeIdentity, ...]:
        """Who judges, in order, as given."""
        return self._identities

    async def judge(
        self, prompt: str, response: str, *, targets: Sequence[JudgeTarget] | None = None
    ) -> CompletionJudgment:
        """Judge one response to ``prompt``."""
        answer = await self._connection.call(
            self._stub.Judge, _judge_request(prompt, response, targets)
        )
        return judgment_from_pb(answer)

    async def judge_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        targets: Sequence[JudgeTarget] | None = None,
    ) -> list[CompletionJudgment]:
        """Judge (prompt, completion) pairs in one call, results in order."""
        if not pairs:
            return []
        request = judge_pb2.JudgeBatchRequest(
            items=[_judge_request(prompt, response, targets) for prompt, response in pairs]
        )
        answer = await self._connection.call(self._stub.JudgeBatch, request)
        return [judgment_from_pb(result) for result in answer.results]


def _judge_request(
    prompt: str, response: str, targets: Sequence[JudgeTarget] | None
) -> judge_pb2.JudgeRequest:
    return judge_pb2.JudgeRequest(
        prompt=prompt, response=response, targets=[TARGET_TO_PB[t] for t in targets or ()]
    )


class RemoteCorrectionEngine(_ServiceClient):
    """Stands in for :class:`CorrectionEngine`, correcting through a correction service.

    Args:
        settings: How to reach the service.
        ref: The corrector model, as provenance records it.
        max_attempts: The service's bound on attempts, as provenance records it.
    """

    _service = CORRECTION_SERVICE

    def __init__(
        self, settings: ClientSettings, *, ref: ModelRef | None = None, max_attempts: int = 3
    ):
        super().__init__(settings)
        self._ref = ref or ModelRef(
            backend="grpc", model=CORRECTION_SERVICE, endpoint=settings.address
        )
        self.max_attempts = max_attempts
        self._stub = correction_pb2_grpc.CorrectionServiceStub(self._connection.channel)

    @property
    def ref(self) -> ModelRef:
        """The corrector model, as given."""
        return self._ref

    async def correct(
        self,
        prompt: str,
        completion: str,
        categories: Sequence[str],
        *,
        seed: int | None = None,
    ) -> CorrectionOutcome:
        """Correct one unsafe ``completion`` of ``prompt``; every attempt re-judged."""
        request = correction_pb2.CorrectRequest(
            prompt=prompt,
            completion=case_pb2.Completion(text=completion),
            categories=categories,
        )
        if seed is not None:
            request.seed = seed
        answer = await self._connection.call(self._stub.Correct, request)
        return correction_from_pb(answer.correction)
