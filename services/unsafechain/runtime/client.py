"""What every client of a service shares: the channel (TLS, mutual TLS, message
limits, retries of UNAVAILABLE), the bearer token, the deadline, health checks and
the mapping of failed calls to backend errors.

Each service's client sits beside its servicer (``unsafechain.<service>.client``) and
implements that stage's engine interface, so a remote service stands in for the
in-process engine. A failed call raises :class:`BackendError` (``BackendTimeout`` for
DEADLINE_EXCEEDED, ``BackendUnavailable`` for UNAVAILABLE and RESOURCE_EXHAUSTED,
``BackendRejected`` for INVALID_ARGUMENT), as a model backend would.
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
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
)
from unsafechain.domain.types import JudgeIdentity, ModelRef
from unsafechain.runtime.settings import ClientSettings

logger = logging.getLogger(__name__)

# A service that is briefly unreachable (restarting, scaling) is retried by gRPC itself;
# the calls are safe to repeat, their seeds travel with them. An empty name applies the
# policy to every method of the channel's service.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
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


def _tls_hint(details: str) -> str:
    """What to do about a connection that failed on TLS, from how gRPC reports it: a
    plaintext client's connection closed by a TLS server, or a certificate no CA the
    client trusts has signed."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            " (the server's certificate is signed by no CA this client trusts: pass "
            "--ca-file with the CA that signed it)"
        )
    if details.endswith("Socket closed") and "failed to connect" in details:
        return " (a server that speaks TLS closes plaintext connections: pass --ca-file or --tls)"
    return ""


def backend_error(error: grpc.aio.AioRpcError, where: str) -> BackendError:
    """The backend error a failed call is reported as."""
    details = error.details() or ""
    message = f"{where}: {error.code().name}: {details}{_tls_hint(details)}"
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendTimeout(message)
    if error.code() in _UNAVAILABLE:
        return BackendUnavailable(message)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return BackendRejected(message)
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
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token.get_secret_value()}"),) if token else ()
        )

    def __repr__(self) -> str:
        return f"ServiceConnection({self.service} at {self.settings.address})"

    async def call(self, method: Any, request: Any) -> Any:
        """Call ``method`` (a stub's multi-callable) with the token and the deadline.

        Raises:
            BackendError: The call failed.
        """
        try:
            return await method(request, timeout=self.settings.timeout, metadata=self.metadata)
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


class ServiceClient:
    """What every client of a service shares: its connection and life cycle.

    Attributes:
        service: The full gRPC service name, set by each client class.
    """

    service: str

    def __init__(self, settings: ClientSettings):
        self._connection = ServiceConnection(settings, self.service)

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


class StageMismatch(ValueError):
    """A service runs other models or settings than the configuration says it does."""


def describe_model(ref: ModelRef | None) -> str:
    """A model as an error message names it: ``backend model``."""
    return "no model" if ref is None else f"{ref.backend} {ref.model}"


def same_model(reported: ModelRef | None, expected: ModelRef | None) -> bool:
    """Whether a service's model is the configured one: same backend and model (the
    endpoint may differ, as the service reaches it from elsewhere)."""
    if reported is None or expected is None:
        return reported is expected
    return (reported.backend, reported.model) == (expected.backend, expected.model)


def same_judges(reported: Sequence[JudgeIdentity], expected: Sequence[JudgeIdentity]) -> bool:
    """Whether a service's judges are the configured ones, in order."""
    return len(reported) == len(expected) and all(
        (a.name, a.kind) == (b.name, b.kind) and same_model(a.model, b.model)
        for a, b in zip(reported, expected, strict=True)
    )


def describe_judges(judges: Sequence[JudgeIdentity]) -> str:
    """Judges as an error message names them."""
    return ", ".join(f"{j.name} ({j.kind}, {describe_model(j.model)})" for j in judges) or "none"
