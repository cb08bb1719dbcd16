"""The Kafka transport: every stage a consumer group on its topic.

Topics are named ``<prefix>.<version>.<topic>`` (``unsafechain.v1.prompts``) and keyed by
case id; each has a dead-letter topic ``<topic>.dlq``. :class:`MessageRunner` owns the
delivery of a stage: poll a batch, process it, retry a failing case with backoff
within a bound, produce the outputs, flush, and only then commit the batch's offsets
(at-least-once). A case that still fails goes to the dead-letter topic with its
reason, and the stage's ``give_up`` outputs (the case marked failed) go on, so it is
kept. A redelivered case is harmless because the sink stores each case id once.
:class:`DeliveryRunner` is the same delivery for any other message a pipeline follows
(the datasets a build announces, say).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from google.protobuf.message import DecodeError, Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
)
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from pydantic import Field, model_validator

from unsafechain.domain.settings import ConfigPath, SetupError, StrictModel
from unsafechain.runtime.metrics import MetricsEndpoint
from unsafechain.streaming.stages import Emitted
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)

# Headers of a dead-lettered message: why, where, after how many tries, which build.
ERROR_HEADER, STAGE_HEADER, ATTEMPTS_HEADER, BUILD_HEADER = "error", "stage", "attempts", "build"

# Bound on the broker calls made only for metrics, so a rebalance never stalls a worker.
_METRICS_CALL_TIMEOUT_MS = 2_000
# Bound on every other blocking broker call of a worker's loop (commit, flush, send).
BROKER_CALL_TIMEOUT_MS = 60_000

M = TypeVar("M", bound=Message)
"""The message a runner's topic carries."""

Handler = Callable[[case_pb2.Case], Awaitable[Emitted]]


class KafkaSecuritySettings(StrictModel):
    """How the clients authenticate to the brokers and protect the connection.

    Attributes:
        protocol: ``PLAINTEXT``, ``SSL`` (TLS), ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        ca_file: PEM CA bundle to verify the brokers with (TLS); None: the system's.
        cert_file: PEM client certificate, for brokers that require one (mutual TLS).
        key_file: PEM private key of ``cert_file``.
        sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
        sasl_username: The SASL user.
        sasl_password_env: Name of the environment variable holding the SASL password;
            the password itself never appears in a config file, a log line or an error.
    """

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password_env: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecuritySettings:
        tls = self.protocol in ("SSL", "SASL_SSL")
        sasl = self.protocol.startswith("SASL_")
        if not tls and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError(
                f"protocol: {self.protocol} has no TLS for ca_file, cert_file, key_file"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: a client certificate needs both cert_file and key_file")
        given = [self.sasl_mechanism, self.sasl_username, self.sasl_password_env]
        if sasl and not all(given):
            raise ValueError(
                f"protocol: {self.protocol} needs sasl_mechanism, sasl_username and "
                "sasl_password_env"
            )
        if not sasl and any(given):
            raise ValueError(f"protocol: {self.protocol} takes no SASL settings")
        return self

    def client_arguments(self) -> dict[str, Any]:
        """The kafka-python arguments of every client: the protocol, TLS files and SASL
        credentials (the password read from its environment variable).

        Raises:
            SetupError: The password's variable is named but not set.
        """
        arguments: dict[str, Any] = {"security_protocol": self.protocol}
        for name, path in (
            ("ssl_cafile", self.ca_file),
            ("ssl_certfile", self.cert_file),
            ("ssl_keyfile", self.key_file),
        ):
            if path is not None:
                arguments[name] = str(path)
        if self.sasl_password_env:
            password = os.environ.get(self.sasl_password_env)
            if not password:
                raise SetupError(
                    f"kafka.security.sasl_password_env: environment variable "
                    f"{self.sasl_password_env} is not set"
                )
            arguments.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=password,
            )
        return arguments


class KafkaSettings(StrictModel):
    """The Kafka transport (``unsafechain build --bus kafka`` and ``unsafechain worker``).

    Attributes:
        bootstrap_servers: Brokers to connect to first, ``host:port``.
        topic_prefix: First part of every topic and consumer group name.
        version: Version of the message contract, part of every topic name, so a
            breaking change runs on new topics beside the old ones.
        partitions: Partitions per topic: the most workers a stage can use at once.
        replication_factor: Copies of each partition the cluster keeps.
        max_retries: Extra tries of a case whose stage fails (a backend down, a
            timeout), before it goes to the stage's dead-letter topic and is kept as
            failed.
        retry_backoff_seconds: Wait before the first retry, doubled for each further one.
        max_poll_records: Messages a worker takes per poll, i.e. cases in flight per
            worker (backpressure: a worker never holds more).
        max_poll_interval_ms: Longest time a worker may take over one batch before the
            group gives its partitions to another worker; leave room for the retries.
        session_timeout_ms: Time without heartbeats after which a worker counts as dead.
        heartbeat_interval_ms: Time between heartbeats.
        idle_timeout_seconds: ``build --bus kafka`` stops with an error when no case
            arrives for this long (no workers running, a stage stuck).
        stall_warning_seconds: ``build --bus kafka`` warns when no case has arrived for
            this long, naming each stage with messages no worker has consumed, and again
            every as long.
        security: TLS and SASL towards the brokers; plaintext by default.
    """

    bootstrap_servers: Annotated[tuple[str, ...], Field(min_length=1)] = ("127.0.0.1:9092",)
    topic_prefix: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = "unsafechain"
    version: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")] = "v1"
    partitions: Annotated[int, Field(ge=1)] = 4
    replication_factor: Annotated[int, Field(ge=1)] = 1
    max_retries: Annotated[int, Field(ge=0)] = 3
    retry_backoff_seconds: Annotated[float, Field(ge=0)] = 0.5
    max_poll_records: Annotated[int, Field(ge=1)] = 8
    max_poll_interval_ms: Annotated[int, Field(ge=1000)] = 300_000
    session_timeout_ms: Annotated[int, Field(ge=1000)] = 10_000
    heartbeat_interval_ms: Annotated[int, Field(ge=100)] = 3_000
    idle_timeout_seconds: Annotated[float, Field(gt=0)] = 600.0
    stall_warning_seconds: Annotated[float, Field(gt=0)] = 30.0
    security: KafkaSecuritySettings = KafkaSecuritySettings()


class PermanentError(Exception):
    """A case that no retry can help (it belongs to another configuration, say): it
    goes to the dead-letter topic at once."""


class Unrecoverable(Exception):
    """The worker cannot go on (a service it needs stays unreachable, or refuses its
    credentials): raised by a handler, it stops the runner without committing the batch
    in hand, which the group redelivers, and :meth:`DeliveryRunner.run` raises it."""


def topic_name(settings: KafkaSettings, topic: str) -> str:
    """The Kafka topic of a build topic, e.g. ``unsafechain.v1.prompts``."""
    return f"{settings.topic_prefix}.{settings.version}.{topic}"


def dead_letter_topic(settings: KafkaSettings, topic: str) -> str:
    """The dead-letter topic of a build topic, e.g. ``unsafechain.v1.prompts.dlq``."""
    return f"{topic_name(settings, topic)}.dlq"


def group_name(settings: KafkaSettings, stage: str) -> str:
    """The consumer group of a stage, e.g. ``unsafechain.v1.generate``."""
    return f"{settings.topic_prefix}.{settings.version}.{stage}"


BROKER_CHECK_SECONDS = 5.0
"""How long :func:`require_broker` waits for a bootstrap server to accept."""


def require_broker(settings: KafkaSettings, timeout: float = BROKER_CHECK_SECONDS) -> None:
    """Fail fast, naming the setting, when no bootstrap server accepts a connection:
    the Kafka client alone would retry for half a minute and end in a traceback.

    Raises:
        SetupError: None of ``kafka.bootstrap_servers`` answers within ``timeout``.
    """
    problems = []
    for server in settings.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout):
                return
        except (OSError, ValueError) as error:
            problems.append(f"{server}: {getattr(error, 'strerror', None) or error}")
    raise SetupError(
        f"kafka.bootstrap_servers: no broker answers ({'; '.join(problems)}); start one "
        "(`make kafka-up` for a local one) or pass --bootstrap HOST:PORT"
    )


_PROBE_TIMEOUT_MS = 5_000
"""Bound on each call of an offsets probe."""


def uncommitted(settings: KafkaSettings, group: str, topic: str) -> int | None:
    """Messages on ``topic`` (full name) that consumer group ``group`` has not committed,
    summed over the partitions; None when the broker does not answer in time. The probe
    joins no group: it reads offsets only."""
    probe = KafkaConsumer(
        bootstrap_servers=list(settings.bootstrap_servers),
        group_id=group,
        enable_auto_commit=False,
        client_id=_client_id("probe"),
        request_timeout_ms=_PROBE_TIMEOUT_MS,
        **settings.security.client_arguments(),
    )
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(probe.partitions_for_topic(topic) or ())
        ]
        ends = probe.end_offsets(partitions, timeout_ms=_PROBE_TIMEOUT_MS)
        committed = {
            tp: probe.committed(tp, timeout_ms=_PROBE_TIMEOUT_MS) or 0 for tp in partitions
        }
    except KafkaError as error:
        logger.debug("%s: offsets of %s not read: %s", group, topic, error)
        return None
    finally:
        probe.close(timeout_ms=_PROBE_TIMEOUT_MS)
    return sum(max(0, ends.get(tp, 0) - committed[tp]) for tp in partitions)


def create_topics(settings: KafkaSettings, topics: Iterable[str]) -> list[str]:
    """Create every topic of ``topics`` and its dead-letter topic; say which were new.

    Topics that exist already are left as they are, so this can run before every build.
    """
    admin = KafkaAdminClient(
        bootstrap_servers=list(settings.bootstrap_servers),
        **settings.security.client_arguments(),
    )
    created = []
    try:
        for topic in topics:
            for name in (topic_name(settings, topic), dead_letter_topic(settings, topic)):
                try:
                    admin.create_topics(
                        [NewTopic(name, settings.partitions, settings.replication_factor)]
                    )
                except TopicAlreadyExistsError:
                    logger.info("topic %s exists", name)
                    continue
                logger.info("created topic %s (%d partitions)", name, settings.partitions)
                created.append(name)
    finally:
        admin.close()
    return created


def _client_id(role: str) -> str:
    # kafka-python shares one network thread among the clients of a process that have
    # the same client id; each client gets its own, and the broker sees who it is.
    return f"unsafechain-{role}-{os.getpid()}-{next(_CLIENTS)}"


_CLIENTS = itertools.count(1)


_LINGER_MS = 5


def make_producer(settings: KafkaSettings, *, timeout_ms: int | None = None) -> KafkaProducer:
    """A producer that waits for every in-sync replica, so a flushed case is durable.

    Args:
        settings: The Kafka settings.
        timeout_ms: Bound on reaching the brokers, on a send waiting for metadata and on
            a record's delivery; None: the client's defaults (30 s to bootstrap, 60 s to
            block on a send, 120 s to deliver).
    """
    bounds: dict[str, int] = {}
    if timeout_ms is not None:
        bounds = {
            "bootstrap_timeout_ms": timeout_ms,
            "max_block_ms": timeout_ms,
            "request_timeout_ms": timeout_ms,
            # The client requires room for the linger and one request.
            "delivery_timeout_ms": timeout_ms + _LINGER_MS,
        }
    return KafkaProducer(
        bootstrap_servers=list(settings.bootstrap_servers),
        acks="all",
        linger_ms=_LINGER_MS,
        client_id=_client_id("producer"),
        **settings.security.client_arguments(),
        **bounds,
    )


def make_consumer(settings: KafkaSettings, topics: Sequence[str], group: str) -> KafkaConsumer:
    """A consumer of the build topics ``topics`` (full names) in ``group`` that commits
    only when told to."""
    return KafkaConsumer(
        *topics,
        bootstrap_servers=list(settings.bootstrap_servers),
        client_id=_client_id(group),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **settings.security.client_arguments(),
        max_poll_records=settings.max_poll_records,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )


def poll_batch(consumer: KafkaConsumer, timeout_ms: int = 500) -> list[ConsumerRecord]:
    """The next batch of records, in partition order; empty when none came in time."""
    return [
        record for records in consumer.poll(timeout_ms=timeout_ms).values() for record in records
    ]


def commit(consumer: KafkaConsumer, who: str) -> None:
    """Commit what ``consumer`` has taken. A commit lost to a rebalance is logged: the
    new owner of the partitions redoes the batch, and the sink keeps each case once."""
    try:
        consumer.commit(timeout_ms=BROKER_CALL_TIMEOUT_MS)
    except (CommitFailedError, KafkaTimeoutError) as error:
        logger.warning("%s: commit failed (a rebalance, or no answer in time): %s", who, error)


class ConsumerLag:
    """The Prometheus gauge ``unsafechain_kafka_consumer_lag``: messages per partition a
    group has not committed yet (log end offset minus committed offset).

    Every broker call it makes has a timeout, and a call that times out (during a
    rebalance) skips the update: the metric never holds up the work.

    Args:
        registry: Where the series live; a new registry by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.gauge = Gauge(
            "unsafechain_kafka_consumer_lag",
            "Messages not yet committed by the consumer group, by topic and partition.",
            ("group", "topic", "partition"),
            registry=self.registry,
        )

    def update(
        self,
        consumer: KafkaConsumer,
        group: str,
        partitions: Iterable[TopicPartition] | None = None,
    ) -> dict[tuple[str, int], int]:
        """Read the lag of ``partitions`` (default: those ``consumer`` holds now) for
        ``group`` through ``consumer`` and publish it."""
        assigned = list(consumer.assignment() if partitions is None else partitions)
        try:
            ends = (
                consumer.end_offsets(assigned, timeout_ms=_METRICS_CALL_TIMEOUT_MS)
                if assigned
                else {}
            )
            committed = {
                partition: consumer.committed(partition, timeout_ms=_METRICS_CALL_TIMEOUT_MS)
                for partition in assigned
            }
        except KafkaError as error:
            logger.debug("%s: consumer lag not updated: %s", group, error)
            return {}
        lags = {}
        # Partitions given to another worker are its to report.
        self.gauge.clear()
        for partition in assigned:
            lag = max(0, ends.get(partition, 0) - (committed[partition] or 0))
            lags[(partition.topic, partition.partition)] = lag
            self.gauge.labels(group, partition.topic, str(partition.partition)).set(lag)
        return lags

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve the metrics over HTTP on ``host:port`` (0: a free port)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread)


class LagReporter:
    """Measures a group's consumer lag in a thread of its own, through a consumer of its
    own that never joins the group, so the consume loop makes no call for metrics.

    Args:
        settings: The Kafka settings.
        group: The group whose committed offsets are read.
        lag: Where the lag is published.
        assigned: The partitions the worker holds now (read without a broker call).
        interval: Seconds between measurements.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        group: str,
        lag: ConsumerLag,
        assigned: Callable[[], frozenset[TopicPartition]],
        *,
        interval: float = 5.0,
    ):
        self._group = group
        self._lag = lag
        self._assigned = assigned
        self._interval = interval
        self._stopping = threading.Event()
        # Given the group id only to read its committed offsets: it never subscribes,
        # so it never joins the group.
        self._probe = KafkaConsumer(
            bootstrap_servers=list(settings.bootstrap_servers),
            client_id=_client_id(f"{group}-lag"),
            group_id=group,
            enable_auto_commit=False,
            **settings.security.client_arguments(),
        )
        self._thread = threading.Thread(target=self._run, name=f"{group}-lag", daemon=True)

    def start(self) -> None:
        """Start measuring."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._lag.update(self._probe, self._group, self._assigned())
            self._stopping.wait(self._interval)

    def stop(self) -> None:
        """Stop measuring and close the probe."""
        self._stopping.set()
        self._thread.join(timeout=_METRICS_CALL_TIMEOUT_MS / 1000 * 3)
        self._probe.close(timeout_ms=_METRICS_CALL_TIMEOUT_MS)


@dataclass
class DeadLetter(Generic[M]):
    """A message given up on, with why and after how many tries; ``message`` is None
    when it could not be decoded."""

    error: str
    attempts: int
    message: M | None


def decode(value: bytes) -> case_pb2.Case:
    """The case a message carries.

    Raises:
        DecodeError: The bytes are not a case, or a case without an id.
    """
    case = case_pb2.Case()
    case.ParseFromString(value)
    if not case.id:
        raise DecodeError("case has no id")
    return case


class DeliveryRunner(Generic[M]):
    """Owns delivery for one consumer group: poll, decode, process with retries,
    produce, flush, commit.

    A batch holds at most ``max_poll_records`` messages and the next is polled only
    once the last one's outputs are flushed and its offsets committed, so a worker
    never buffers more than one batch however slow the stages after it are. A message
    that cannot be decoded, or whose handling still fails after the retries, goes to
    the dead-letter topic with its reason.

    Args:
        settings: The Kafka settings.
        consumed: The topic consumed (its short name, e.g. ``prompts``).
        stage: Name of the stage (consumer group and dead-letter header).
        handle: Processes one message and returns what to produce; raises when it
            fails on it, which is retried (:class:`PermanentError`: not retried;
            :class:`Unrecoverable`: the runner stops without committing).
        decode: The message a record's bytes carry; raises ``DecodeError``.
        build_of: The build a message belongs to, for the dead-letter header ("":
            none).
        give_up: The outputs for a message that is dead-lettered, e.g. the case
            marked failed for the sink; none by default.
        concurrency: Messages of a batch processed at once.
        loop: The event loop the handler's engines belong to.
        lag: Where to publish the consumer lag, measured off the consume loop by a
            :class:`LagReporter`; None: not measured.
        lag_interval: Seconds between consumer lag measurements.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        consumed: str,
        stage: str,
        handle: Callable[[M], Awaitable[Emitted]],
        *,
        decode: Callable[[bytes], M],
        build_of: Callable[[M], str],
        give_up: Callable[[M, str], Emitted] | None = None,
        concurrency: int = 4,
        loop: asyncio.AbstractEventLoop,
        lag: ConsumerLag | None = None,
        lag_interval: float = 5.0,
    ):
        self._settings = settings
        self._consumed = consumed
        self._stage = stage
        self._handle = handle
        self._decode = decode
        self._build_of = build_of
        self._give_up = give_up
        self._concurrency = concurrency
        self._loop = loop
        self._lag = lag
        self._lag_interval = lag_interval
        self._assigned: frozenset[TopicPartition] = frozenset()
        self.group = group_name(settings, stage)
        self.stopping = threading.Event()
        self._consumer = make_consumer(settings, [topic_name(settings, consumed)], self.group)
        self._producer = make_producer(settings)

    def run(self, done: Callable[[], bool] = lambda: False) -> None:
        """Process batches until ``done()`` holds or :meth:`stop` is called, then leave
        the group cleanly; the batch in hand is always finished and committed first.

        Raises:
            Unrecoverable: A handler could not go on; the batch in hand is not
                committed.
        """
        reporter = None
        if self._lag is not None:
            reporter = LagReporter(
                self._settings,
                self.group,
                self._lag,
                lambda: self._assigned,
                interval=self._lag_interval,
            )
            reporter.start()
        try:
            while not self.stopping.is_set() and not done():
                batch = poll_batch(self._consumer)
                # What the group gave this worker, as the consumer knows it (no call).
                self._assigned = frozenset(self._consumer.assignment())
                if batch:
                    self._deliver(batch)
        finally:
            if reporter is not None:
                reporter.stop()
            self._consumer.close(timeout_ms=BROKER_CALL_TIMEOUT_MS)
            self._producer.close(timeout=BROKER_CALL_TIMEOUT_MS / 1000)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand."""
        self.stopping.set()

    def _deliver(self, batch: list[ConsumerRecord]) -> None:
        results = self._loop.run_until_complete(self._process_batch(batch))
        futures = []
        for record, result in zip(batch, results, strict=True):
            if isinstance(result, DeadLetter):
                futures.append(self._dead_letter(record, result))
                outputs = (
                    self._give_up(result.message, result.error)
                    if self._give_up and result.message is not None
                    else []
                )
            else:
                outputs = result
            for topic, case in outputs:
                futures.append(
                    self._producer.send(
                        topic_name(self._settings, topic),
                        key=case.id.encode(),
                        value=case.SerializeToString(),
                    )
                )
        self._producer.flush(timeout=BROKER_CALL_TIMEOUT_MS / 1000)
        for future in futures:
            # A send that failed after the producer's own retries (or found no broker in
            # time) stops the worker before the commit, so the batch is redelivered
            # rather than lost.
            future.get(timeout=BROKER_CALL_TIMEOUT_MS / 1000)
        commit(self._consumer, self._stage)

    async def _process_batch(self, batch: list[ConsumerRecord]) -> list[Emitted | DeadLetter[M]]:
        semaphore = asyncio.Semaphore(self._concurrency)

        async def bounded(record: ConsumerRecord) -> Emitted | DeadLetter[M]:
            async with semaphore:
                return await self._attempt(record)

        tasks = [asyncio.ensure_future(bounded(record)) for record in batch]
        try:
            return await asyncio.gather(*tasks)
        except Unrecoverable:
            # The batch is not committed: what the others would do is redone anyway.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _attempt(self, record: ConsumerRecord) -> Emitted | DeadLetter[M]:
        settings = self._settings
        key = _key(record)
        for attempt in range(1, settings.max_retries + 2):
            try:
                # Decoded afresh for every try: a failed try leaves nothing behind.
                message = self._decode(record.value)
            except DecodeError as error:
                # Decoding the same bytes again gives the same error: no retries.
                return DeadLetter(f"undecodable message: {error}", attempt, None)
            try:
                return await self._handle(message)
            except Unrecoverable:
                raise
            except PermanentError as error:
                return DeadLetter(str(error), attempt, self._decode(record.value))
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                logger.warning(
                    "%s: %s attempt %d of %d failed: %s",
                    key,
                    self._stage,
                    attempt,
                    settings.max_retries + 1,
                    reason,
                )
                if attempt > settings.max_retries:
                    return DeadLetter(reason, attempt, self._decode(record.value))
                await asyncio.sleep(settings.retry_backoff_seconds * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last attempt returns")

    def _dead_letter(self, record: ConsumerRecord, letter: DeadLetter[M]) -> Any:
        key = _key(record)
        logger.error(
            "%s: %s gave up after %d attempt(s): %s",
            key,
            self._stage,
            letter.attempts,
            letter.error,
        )
        headers = [
            (ERROR_HEADER, letter.error.encode()),
            (STAGE_HEADER, self._stage.encode()),
            (ATTEMPTS_HEADER, str(letter.attempts).encode()),
        ]
        build = self._build_of(letter.message) if letter.message is not None else ""
        if build:
            headers.append((BUILD_HEADER, build.encode()))
        return self._producer.send(
            dead_letter_topic(self._settings, self._consumed),
            key=record.key,
            value=record.value,
            headers=headers,
        )


def _key(record: ConsumerRecord) -> str:
    return record.key.decode(errors="replace") if record.key else "?"


class MessageRunner(DeliveryRunner[case_pb2.Case]):
    """The delivery of a build stage: a :class:`DeliveryRunner` of cases (keyed by
    case id, dead letters marked with the case's build).

    Args:
        settings: The Kafka settings.
        consumed: The build topic consumed.
        stage: Name of the stage (consumer group and dead-letter header).
        handle: Processes one case and returns what to produce; raises when the stage
            fails on it, which is retried (:class:`PermanentError`: not retried).
        give_up: The outputs for a case that is dead-lettered, e.g. the case marked
            failed for the sink; none by default.
        concurrency: Cases of a batch processed at once.
        loop: The event loop the handler's engines belong to.
        lag: Where to publish the consumer lag; None: not measured.
        lag_interval: Seconds between consumer lag measurements.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        consumed: str,
        stage: str,
        handle: Handler,
        *,
        give_up: Callable[[case_pb2.Case, str], Emitted] | None = None,
        concurrency: int = 4,
        loop: asyncio.AbstractEventLoop,
        lag: ConsumerLag | None = None,
        lag_interval: float = 5.0,
    ):
        super().__init__(
            settings,
            consumed,
            stage,
            handle,
            decode=decode,
            build_of=lambda case: case.provenance.build_id,
            give_up=give_up,
            concurrency=concurrency,
            loop=loop,
            lag=lag,
            lag_interval=lag_interval,
        )


@contextmanager
def stopped_by_signals(stop: Callable[[], None], who: str) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT call ``stop`` (finish the batch in hand)."""
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread can take signals; the caller stops the runner itself.
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        logger.info("%s: signal %d, finishing the batch in hand", who, signum)
        stop()

    previous = {
        signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def publish_cases(settings: KafkaSettings, topic: str, cases: Iterable[case_pb2.Case]) -> int:
    """Send ``cases`` to the build topic ``topic``, keyed by case id; return how many."""
    producer = make_producer(settings)
    try:
        futures = [
            producer.send(
                topic_name(settings, topic), key=case.id.encode(), value=case.SerializeToString()
            )
            for case in cases
        ]
        producer.flush(timeout=BROKER_CALL_TIMEOUT_MS / 1000)
        for future in futures:
            future.get(timeout=BROKER_CALL_TIMEOUT_MS / 1000)
    finally:
        producer.close(timeout=BROKER_CALL_TIMEOUT_MS / 1000)
    return len(futures)


def header(record: ConsumerRecord, name: str) -> str | None:
    """The value of header ``name`` of ``record``, decoded; None when absent."""
    for key, value in record.headers or ():
        if key == name:
            return value.decode(errors="replace")
    return None
