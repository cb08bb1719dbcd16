"""The server bootstrap every service shares.

A service is a thin servicer over an engine (:class:`Servicer`). This module puts it
on a ``grpc.aio`` server with everything else a service needs, written once:

- standard health checking (``grpc.health.v1``) that follows the backend's real
  state, checked every ``health_interval``; reflection;
- one interceptor (:class:`CallInterceptor`) that authenticates bearer tokens,
  applies the caller's deadline to the whole handler (so backend calls are cancelled
  when it passes), maps errors to status codes and records metrics;
- TLS or mutual TLS from certificate files; message size limits;
- Prometheus metrics over HTTP;
- on SIGTERM: NOT_SERVING, drain the calls in flight, release the engine, exit 0.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from unsafechain.backends.base import BackendError, BackendTimeout
from unsafechain.backends.pool import BackendPool
from unsafechain.domain.convert import TARGET_FROM_PB
from unsafechain.domain.types import JudgeTarget
from unsafechain.runtime.auth import TokenAuthenticator
from unsafechain.runtime.metrics import MetricsEndpoint, ServiceMetrics
from unsafechain.runtime.redaction import Redactor, install_log_redaction
from unsafechain.runtime.settings import RequestLimits, ServerSettings, SettingsError
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class InvalidArgument(ValueError):
    """A request field is invalid; answered as INVALID_ARGUMENT with a message that
    names the field.

    Args:
        field: The field's path in the request, e.g. ``items[2].prompt``.
        problem: What is wrong with it.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def require(condition: bool, field: str, problem: str) -> None:
    """Raise :class:`InvalidArgument` for ``field`` unless ``condition`` holds."""
    if not condition:
        raise InvalidArgument(field, problem)


def require_at_most(value: int, limit: int, field: str, unit: str, setting: str) -> None:
    """Raise :class:`InvalidArgument` for ``field`` when ``value`` is over ``limit``."""
    require(value <= limit, field, f"{value} {unit}, over the limit of {limit} ({setting})")


def requested_targets(
    targets: Sequence[case_pb2.JudgeTarget], prefix: str = ""
) -> tuple[JudgeTarget, ...]:
    """The parts a request asks to judge, validated (``{prefix}targets[i]`` names a bad
    one)."""
    for position, target in enumerate(targets):
        require(
            target in TARGET_FROM_PB,
            f"{prefix}targets[{position}]",
            "must be FULL, REASONING or ANSWER",
        )
    return tuple(TARGET_FROM_PB[target] for target in targets)


class Servicer(abc.ABC):
    """What the bootstrap needs of a service's servicer besides its RPC methods, and
    what every servicer holds: the models it releases and the bounds on a request.

    Args:
        pool: The engine's models, released by :meth:`aclose`.
        limits: Bounds on one request.

    Attributes:
        name: The full gRPC service name, e.g. ``unsafechain.v1.JudgeService``.
    """

    name: ClassVar[str]

    def __init__(self, *, pool: BackendPool | None = None, limits: RequestLimits | None = None):
        self._pool = pool
        self._limits = limits or RequestLimits()

    @abc.abstractmethod
    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicer's RPC methods to ``server``."""

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise when the engine's backends cannot serve requests."""

    async def start(self) -> None:
        """Take up work that outlives a call (the training service's runs), before the
        server starts serving; nothing by default."""

    async def aclose(self) -> None:
        """Release the engine's models; called after the calls in flight drained."""
        if self._pool is not None:
            await self._pool.aclose()


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a handler's exception is answered with."""
    if isinstance(error, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call finished"
    if isinstance(error, BackendTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"model backend timed out: {error}"
    if isinstance(error, BackendError):
        if error.retryable:
            return grpc.StatusCode.UNAVAILABLE, f"model backend unavailable: {error}"
        return grpc.StatusCode.INTERNAL, f"model backend failed: {error}"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__})"


def _refusing_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED."""

    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_stream is not None:
        make = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary is not None:
        make = grpc.stream_unary_rpc_method_handler
    else:
        make = grpc.stream_stream_rpc_method_handler
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class _Undecodable:
    """A request body that is not the method's request message."""

    problem: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserialize``, answering undecodable bytes with :class:`_Undecodable` so the
    call ends INVALID_ARGUMENT (gRPC itself would answer UNKNOWN)."""
    if deserialize is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return _Undecodable(f"request: not a valid request message ({error})")

    return tolerant


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, deadlines, error mapping and metrics for every call.

    Unary calls (every service method, health checks) are wrapped whole; streaming
    ones (reflection, health watches) are only authenticated. Health checking stays
    open without a token, so probes need none.

    Args:
        metrics: Where calls are counted and timed.
        redactor: Masks secrets in status messages.
        authenticator: Checks bearer tokens; None accepts every call.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        redactor: Redactor,
        authenticator: TokenAuthenticator | None,
    ):
        self._metrics = metrics
        self._redactor = redactor
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return None
        refusal = None
        if self._authenticator is not None and not details.method.startswith(f"/{HEALTH_SERVICE}/"):
            refusal = self._authenticator.problem(details.invocation_metadata)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(details.method, handler.unary_unary, refusal),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler if refusal is None else _refusing_handler(handler, refusal)

    def _wrap(
        self, method: str, behavior: Callable[..., Awaitable[Any]], refusal: str | None
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._metrics.call(method) as outcome:
                if refusal is not None:
                    outcome.code = grpc.StatusCode.UNAUTHENTICATED.name
                    logger.warning("refused %s from %s: %s", method, context.peer(), refusal)
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
                if isinstance(request, _Undecodable):
                    outcome.code = grpc.StatusCode.INVALID_ARGUMENT.name
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
                try:
                    async with asyncio.timeout(context.time_remaining()):
                        response = await behavior(request, context)
                except grpc.aio.AbortError:
                    outcome.code = context.code().name
                    raise
                except asyncio.CancelledError:
                    outcome.code = grpc.StatusCode.CANCELLED.name
                    raise
                except Exception as error:
                    code, message = status_for(error)
                    message = self._redactor(message)
                    outcome.code = code.name
                    if code == grpc.StatusCode.INTERNAL:
                        logger.exception("%s failed: %s", method, message)
                    elif code != grpc.StatusCode.INVALID_ARGUMENT:
                        logger.warning("%s: %s", method, message)
                    await context.abort(code, message)
                outcome.code = grpc.StatusCode.OK.name
                return response

        return handle


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials:
    """TLS credentials from the settings' certificate files; with a client CA, clients
    must present a certificate it signed (mutual TLS)."""
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def _backend_secrets(settings: ServerSettings) -> list[str]:
    secrets = []
    for backend in settings.backends():
        key = backend.api_key()
        if key is not None:
            secrets.append(key.get_secret_value())
    return secrets


class ServiceServer:
    """A gRPC server for one service, with health, reflection, the call interceptor,
    TLS, limits and metrics as the settings say.

    Args:
        settings: The process's settings; the server reads the listening, security,
            limit and health ones.
        metrics: The service's metrics; new ones by default.

    Raises:
        SettingsError: The token file cannot be read.
    """

    def __init__(self, settings: ServerSettings, metrics: ServiceMetrics | None = None):
        self._settings = settings
        self.metrics = metrics or ServiceMetrics()
        self._authenticator = TokenAuthenticator.from_settings(settings)
        tokens = self._authenticator.tokens if self._authenticator else ()
        self.redactor = Redactor([*tokens, *_backend_secrets(settings)])
        self._health = health.aio.HealthServicer()
        self._serving: bool | None = None
        self._service: Servicer | None = None
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.port = 0

    @property
    def metrics_port(self) -> int:
        """The bound Prometheus port."""
        if self._metrics_endpoint is None:
            raise RuntimeError("the server is not started")
        return self._metrics_endpoint.port

    async def start(self, service: Servicer) -> None:
        """Check the backend once, bind and start serving ``service``."""
        settings = self._settings
        self._service = service
        limit = settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=[CallInterceptor(self.metrics, self.redactor, self._authenticator)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (service.name, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        address = f"{settings.host}:{settings.port}"
        if settings.uses_tls:
            self.port = server.add_secure_port(address, server_credentials(settings))
        else:
            self.port = server.add_insecure_port(address)
        await service.start()
        # The first probe should already see the backend's real state.
        await self._check_backend()
        await server.start()
        self._server = server
        self._metrics_endpoint = self.metrics.serve(settings.metrics_host, settings.metrics_port)
        self._watcher = asyncio.create_task(self._watch_backend(), name="health-watcher")
        if self._authenticator is not None and not settings.uses_tls:
            logger.warning("bearer tokens are checked over plaintext; set TLS outside tests")
        logger.info(
            "serving %s on %s:%d (%s, %s); metrics on %s:%d",
            service.name,
            settings.host,
            self.port,
            "mutual TLS"
            if settings.tls_client_ca_file
            else "TLS"
            if settings.uses_tls
            else "plaintext",
            "bearer tokens" if self._authenticator else "no authentication",
            settings.metrics_host,
            self.metrics_port,
        )

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let the ones in flight finish within ``grace``
        seconds (default: the settings' grace period), then release everything."""
        if self._server is None or self._service is None:
            return
        grace = self._settings.grace_period if grace is None else grace
        if self._watcher is not None:
            self._watcher.cancel()
        await self._health.enter_graceful_shutdown()
        logger.info("draining %s: calls in flight get %gs to finish", self._service.name, grace)
        await self._server.stop(grace)
        await self._service.aclose()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        logger.info("%s stopped", self._service.name)
        self._server = None

    async def _watch_backend(self) -> None:
        while True:
            await asyncio.sleep(self._settings.health_interval)
            await self._check_backend()

    async def _check_backend(self) -> None:
        assert self._service is not None
        try:
            async with asyncio.timeout(self._settings.health_timeout):
                await self._service.check()
        except Exception as error:
            serving, reason = False, self.redactor(str(error) or type(error).__name__)
        else:
            serving, reason = True, ""
        if serving != self._serving:
            if serving:
                logger.info("%s backend is up: SERVING", self._service.name)
            else:
                logger.warning("%s backend is down: NOT_SERVING (%s)", self._service.name, reason)
            self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", self._service.name):
            await self._health.set(name, status)


ServicerFactory = Callable[[Any, ServiceMetrics], Servicer]
"""Builds a service's servicer, its models loaded, from its settings and metrics."""


async def _serve(settings: ServerSettings, create_servicer: ServicerFactory) -> int:
    server = ServiceServer(settings)
    install_log_redaction(server.redactor)
    service = create_servicer(settings, server.metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await server.start(service)
    except Exception:
        await service.aclose()
        raise
    await stop.wait()
    logger.info("shutdown signal received")
    await server.drain()
    return 0


def run_service(settings: ServerSettings, create_servicer: ServicerFactory) -> int:
    """Run the service ``create_servicer`` builds until SIGTERM or SIGINT, then drain.

    The settings are logged once, without secrets.

    Returns:
        0 after a clean drain.
    """
    logger.info("settings: %s", settings.public_view())
    check_before_start(settings)
    return asyncio.run(_serve(settings, create_servicer))


def check_before_start(settings: ServerSettings) -> None:
    """What would otherwise fail only after the models have loaded, checked first: the
    ports are free and the TLS and token files readable.

    Raises:
        SettingsError: Naming the flag, with every problem found.
    """
    problems = []
    for flag, host, port in (
        ("--port", settings.host, settings.port),
        ("--metrics-port", settings.metrics_host, settings.metrics_port),
    ):
        if port and (problem := _port_problem(host, port)):
            problems.append(f"{flag} {port}: {problem}; pick a free one with {flag}")
    files = {
        "--tls-cert": settings.tls_cert_file,
        "--tls-key": settings.tls_key_file,
        "--tls-client-ca": settings.tls_client_ca_file,
        "--auth-tokens-file": settings.auth_tokens_file,
    }
    for flag, path in files.items():
        if path is not None:
            try:
                path.read_bytes()
            except OSError as error:
                problems.append(f"{flag} {path}: {error.strerror}")
    if problems:
        raise SettingsError("; ".join(problems))


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound, or None; bound and let go at once, with the
    address reuse the servers use."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            return f"{host}:{port} is in use" if error.errno == errno.EADDRINUSE else str(error)
    return None
