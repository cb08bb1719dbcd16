"""Prometheus metrics of a service: calls, latencies, calls in flight, backend latency and
judge batch sizes, served over HTTP.

Each server has its own registry, so several servers can live in one process (tests,
the benchmark) without their series mixing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from unsafechain.backends.base import BackendError, ModelBackend
from unsafechain.domain.types import Generation, GenerationRequest, ModelRef

# Judging takes milliseconds, generation on a large model minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

_CALL_LABELS = ("grpc_service", "grpc_method")


def split_method(full_method: str) -> tuple[str, str]:
    """``("unsafechain.v1.JudgeService", "Judge")`` for ``/unsafechain.v1.JudgeService/Judge``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


@dataclass
class CallOutcome:
    """The status code a call ended with, as its handler learns it."""

    code: str = "UNKNOWN"


class MetricsEndpoint:
    """The Prometheus HTTP endpoint, served from a daemon thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread):
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The bound port."""
        return self._server.server_address[1]

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class ServiceMetrics:
    """The metrics one service exports.

    Args:
        registry: Where the series live; a new registry by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.calls = Counter(
            "unsafechain_grpc_requests",
            "gRPC calls handled, by method and status code.",
            (*_CALL_LABELS, "grpc_code"),
            registry=self.registry,
        )
        self.call_seconds = Histogram(
            "unsafechain_grpc_request_duration_seconds",
            "Time from receiving a gRPC call to answering it, by method and status code.",
            (*_CALL_LABELS, "grpc_code"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "unsafechain_grpc_requests_in_flight",
            "gRPC calls being handled now.",
            _CALL_LABELS,
            registry=self.registry,
        )
        self.backend_seconds = Histogram(
            "unsafechain_backend_request_duration_seconds",
            "Time a model backend took per call, by model, operation and outcome.",
            ("model", "operation", "outcome"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "unsafechain_judge_batch_size",
            "(prompt, response) pairs judged together in one model call.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    @contextmanager
    def call(self, full_method: str) -> Iterator[CallOutcome]:
        """Count a call of ``full_method`` in flight while the block runs, then record it
        under the code the block sets on the yielded outcome."""
        service, method = split_method(full_method)
        outcome = CallOutcome()
        gauge = self.in_flight.labels(service, method)
        gauge.inc()
        started = time.perf_counter()
        try:
            yield outcome
        finally:
            gauge.dec()
            self.calls.labels(service, method, outcome.code).inc()
            self.call_seconds.labels(service, method, outcome.code).observe(
                time.perf_counter() - started
            )

    def timed(self, backend: ModelBackend) -> ModelBackend:
        """``backend`` with the latency of every call recorded."""
        return TimedBackend(backend, self.backend_seconds)

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve the metrics over HTTP on ``host:port`` (0: a free port)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread)


class TimedBackend(ModelBackend):
    """A backend that records how long each call to the wrapped one takes.

    Args:
        inner: The backend doing the work.
        seconds: Histogram labelled by model, operation and outcome.
    """

    def __init__(self, inner: ModelBackend, seconds: Histogram):
        self._inner = inner
        self._seconds = seconds

    @property
    def ref(self) -> ModelRef:
        return self._inner.ref

    @property
    def has_chat_template(self) -> bool:
        return self._inner.has_chat_template

    @property
    def adds_bos(self) -> bool:
        return self._inner.adds_bos

    @property
    def prefers_rendered_prompts(self) -> bool:
        return self._inner.prefers_rendered_prompts

    async def generate(self, request: GenerationRequest) -> list[Generation]:
        with self._timing("generate"):
            return await self._inner.generate(request)

    async def generate_many(self, requests: list[GenerationRequest]) -> list[list[Generation]]:
        with self._timing("generate_many"):
            return await self._inner.generate_many(requests)

    async def generate_each(
        self, requests: list[GenerationRequest]
    ) -> list[list[Generation] | BackendError]:
        with self._timing("generate_each"):
            return await self._inner.generate_each(requests)

    async def check(self) -> None:
        await self._inner.check()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @contextmanager
    def _timing(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self._seconds.labels(self._inner.ref.model, operation, outcome).observe(
                time.perf_counter() - started
            )
