"""The Kafka transport: every stage a consumer group on its topic, the sink in the build
command, the same stages as the embedded build.

Topics are named ``<prefix>.<version>.<topic>`` (``unsafechain.v1.prompts``) and keyed by
case id; each has a dead-letter topic ``<topic>.dlq``. One runner owns delivery: poll a
batch, process it, produce the outputs, flush, and only then commit the batch's offsets
(at-least-once). A redelivered case is harmless because the sink stores each case id
once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, TopicAlreadyExistsError
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from tqdm import tqdm

from unsafechain.dataset.config import BuildConfig, KafkaSettings
from unsafechain.dataset.pipeline import (
    BuildError,
    BuildResult,
    Engines,
    build_provenance,
    build_stage,
    finish_build,
    new_case,
    start_build,
)
from unsafechain.dataset.rows import status_name
from unsafechain.runtime.metrics import MetricsEndpoint
from unsafechain.streaming.stages import (
    GENERATED,
    JUDGED,
    PROMPTS,
    RECORDS,
    TO_CORRECT,
    Emitted,
    fail,
)
from unsafechain.streaming.transport import run_stage
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)

TOPICS = (PROMPTS, GENERATED, JUDGED, TO_CORRECT, RECORDS)
SINK = "sink"

# Headers of a dead-lettered message: why, where, and after how many tries.
ERROR_HEADER, STAGE_HEADER, ATTEMPTS_HEADER = "error", "stage", "attempts"

Handler = Callable[[case_pb2.Case], Awaitable[Emitted]]


def topic_name(settings: KafkaSettings, topic: str) -> str:
    """The Kafka topic of a build topic, e.g. ``unsafechain.v1.prompts``."""
    return f"{settings.topic_prefix}.{settings.version}.{topic}"


def dead_letter_topic(settings: KafkaSettings, topic: str) -> str:
    """The dead-letter topic of a build topic, e.g. ``unsafechain.v1.prompts.dlq``."""
    return f"{topic_name(settings, topic)}.dlq"


def group_name(settings: KafkaSettings, stage: str) -> str:
    """The consumer group of a stage, e.g. ``unsafechain.v1.generate``."""
    return f"{settings.topic_prefix}.{settings.version}.{stage}"


def create_topics(settings: KafkaSettings) -> list[str]:
    """Create every build topic and its dead-letter topic; say which were new.

    Topics that exist already are left as they are, so this can run before every build.
    """
    admin = KafkaAdminClient(bootstrap_servers=list(settings.bootstrap_servers))
    created = []
    try:
        for topic in TOPICS:
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


def make_producer(settings: KafkaSettings) -> KafkaProducer:
    """A producer that waits for every in-sync replica, so a flushed case is durable."""
    return KafkaProducer(
        bootstrap_servers=list(settings.bootstrap_servers), acks="all", linger_ms=5
    )


def make_consumer(settings: KafkaSettings, topic: str, group: str) -> KafkaConsumer:
    """A consumer of ``topic`` in ``group`` that commits only when told to."""
    return KafkaConsumer(
        topic_name(settings, topic),
        bootstrap_servers=list(settings.bootstrap_servers),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.max_poll_records,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )


class ConsumerLag:
    """The Prometheus gauge ``unsafechain_kafka_consumer_lag``: messages per partition a
    group has not committed yet (log end offset minus committed offset).

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

    def update(self, consumer: KafkaConsumer, group: str) -> dict[tuple[str, int], int]:
        """Read the lag of the partitions ``consumer`` holds now and publish it."""
        assigned = list(consumer.assignment())
        ends = consumer.end_offsets(assigned) if assigned else {}
        lags = {}
        # Partitions given to another worker are its to report.
        self.gauge.clear()
        for partition in assigned:
            committed = consumer.committed(partition) or 0
            lag = max(0, ends.get(partition, 0) - committed)
            lags[(partition.topic, partition.partition)] = lag
            self.gauge.labels(group, partition.topic, str(partition.partition)).set(lag)
        return lags

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Serve the metrics over HTTP on ``host:port`` (0: a free port)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread)


@dataclass
class DeadLetter:
    """A message given up on, with why and after how many tries."""

    error: str
    attempts: int
    case: case_pb2.Case | None


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


class MessageRunner:
    """Owns delivery for one consumer group: poll, process, produce, flush, commit.

    A batch holds at most ``max_poll_records`` messages and the next is polled only
    once the last one's outputs are flushed and its offsets committed, so a worker
    never buffers more than one batch however slow the stages after it are.

    Args:
        settings: The Kafka settings.
        consumed: The build topic consumed.
        stage: Name of the stage (consumer group and dead-letter header).
        handle: Processes one case and returns what to produce.
        give_up: The outputs for a case that is dead-lettered, e.g. the case marked
            failed for the sink; none by default.
        dead_letter: Whether a message that still fails after the retries goes to the
            dead-letter topic; if not, the error stops the runner before the commit
            (the sink: a case it cannot store must not be skipped).
        concurrency: Cases of a batch processed at once.
        loop: The event loop the handler's engines belong to.
        lag: Where to publish the consumer lag.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        consumed: str,
        stage: str,
        handle: Handler,
        *,
        give_up: Callable[[case_pb2.Case, str], Emitted] | None = None,
        dead_letter: bool = True,
        concurrency: int = 4,
        loop: asyncio.AbstractEventLoop,
        lag: ConsumerLag | None = None,
    ):
        self._settings = settings
        self._consumed = consumed
        self._stage = stage
        self._handle = handle
        self._give_up = give_up
        self._uses_dead_letters = dead_letter
        self._semaphore_size = concurrency
        self._loop = loop
        self._lag = lag or ConsumerLag()
        self.group = group_name(settings, stage)
        self.stopping = threading.Event()
        self._consumer = make_consumer(settings, consumed, self.group)
        self._producer = make_producer(settings)

    def run(self, done: Callable[[], bool] = lambda: False) -> None:
        """Process batches until ``done()`` holds or :meth:`stop` is called, then leave
        the group cleanly; the batch in hand is always finished and committed first."""
        try:
            while not self.stopping.is_set() and not done():
                batch = [
                    record
                    for records in self._consumer.poll(timeout_ms=500).values()
                    for record in records
                ]
                if batch:
                    self._deliver(batch)
                self._lag.update(self._consumer, self.group)
        finally:
            self._consumer.close()
            self._producer.close()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand."""
        self.stopping.set()

    def _deliver(self, batch: list) -> None:
        results = self._loop.run_until_complete(self._process_batch(batch))
        futures = []
        for record, result in zip(batch, results, strict=True):
            if isinstance(result, DeadLetter):
                futures.append(self._dead_letter(record, result))
                outputs = (
                    self._give_up(result.case, result.error)
                    if self._give_up and result.case
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
        self._producer.flush()
        for future in futures:
            # A send that failed after the producer's own retries stops the worker
            # before the commit, so the batch is redelivered rather than lost.
            future.get()
        try:
            self._consumer.commit()
        except CommitFailedError as error:
            # The group gave these partitions to another worker, which redoes the
            # batch; the sink keeps each case once.
            logger.warning("%s: commit failed after a rebalance: %s", self._stage, error)

    async def _process_batch(self, batch: list) -> list[Emitted | DeadLetter]:
        semaphore = asyncio.Semaphore(self._semaphore_size)

        async def bounded(record) -> Emitted | DeadLetter:
            async with semaphore:
                return await self._attempt(record)

        return await asyncio.gather(*(bounded(record) for record in batch))

    async def _attempt(self, record) -> Emitted | DeadLetter:
        settings = self._settings
        for attempt in range(1, settings.max_retries + 2):
            try:
                case = decode(record.value)
            except DecodeError as error:
                # Decoding the same bytes again gives the same error: no retries.
                return DeadLetter(f"undecodable message: {error}", attempt, None)
            try:
                return await self._handle(case)
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                logger.warning(
                    "case %s: %s attempt %d failed: %s", case.id, self._stage, attempt, reason
                )
                if attempt > settings.max_retries:
                    if not self._uses_dead_letters:
                        raise
                    return DeadLetter(reason, attempt, decode(record.value))
                await asyncio.sleep(settings.retry_backoff_seconds * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last attempt returns")

    def _dead_letter(self, record, letter: DeadLetter):
        key = record.key.decode(errors="replace") if record.key else "?"
        logger.error(
            "case %s: %s gave up after %d attempt(s): %s",
            key,
            self._stage,
            letter.attempts,
            letter.error,
        )
        return self._producer.send(
            dead_letter_topic(self._settings, self._consumed),
            key=record.key,
            value=record.value,
            headers=[
                (ERROR_HEADER, letter.error.encode()),
                (STAGE_HEADER, self._stage.encode()),
                (ATTEMPTS_HEADER, str(letter.attempts).encode()),
            ],
        )


@contextmanager
def _stopped_by_signals(runner: MessageRunner) -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT stop ``runner`` after its batch in hand."""
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread can take signals; the caller stops the runner itself.
        yield
        return

    def stop(signum, _frame) -> None:
        logger.info("%s: signal %d, finishing the batch in hand", runner.group, signum)
        runner.stop()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_worker(config: BuildConfig, stage_name: str, *, metrics_port: int | None = None) -> None:
    """Run one stage of the build as a member of its consumer group until SIGTERM or
    SIGINT, which finish the batch in hand, commit it and leave the group.

    Args:
        config: The build configuration; its ``kafka`` section says where.
        stage_name: ``generate``, ``judge``, ``route`` or ``correct``.
        metrics_port: Serve the consumer lag on this port (0: a free one); none: don't.
    """
    loop = asyncio.new_event_loop()
    # Built inside the event loop: gRPC channels bind to the loop that creates them.
    engines = loop.run_until_complete(_engines(config))
    endpoint = None
    try:
        stage = build_stage(stage_name, config, engines)

        async def handle(case: case_pb2.Case) -> Emitted:
            return await run_stage(stage, case)

        lag = ConsumerLag()
        if metrics_port is not None:
            endpoint = lag.serve("0.0.0.0", metrics_port)
            logger.info("%s: consumer lag served on port %d", stage_name, endpoint.port)
        runner = MessageRunner(
            config.kafka,
            stage.consumes,
            stage.name,
            handle,
            give_up=lambda case, reason: fail(case, stage.name, reason),
            concurrency=config.build.concurrency,
            loop=loop,
            lag=lag,
        )
        logger.info("%s: consuming %s", runner.group, topic_name(config.kafka, stage.consumes))
        with _stopped_by_signals(runner):
            runner.run()
    finally:
        if endpoint:
            endpoint.close()
        loop.run_until_complete(engines.aclose())
        loop.close()


async def _engines(config: BuildConfig) -> Engines:
    return Engines(config)


def publish_cases(settings: KafkaSettings, cases: Iterable[case_pb2.Case]) -> int:
    """Send ``cases`` to the prompts topic, keyed by case id; return how many."""
    producer = make_producer(settings)
    try:
        futures = [
            producer.send(
                topic_name(settings, PROMPTS), key=case.id.encode(), value=case.SerializeToString()
            )
            for case in cases
        ]
        producer.flush()
        for future in futures:
            future.get()
    finally:
        producer.close()
    return len(futures)


def run_kafka_build(config: BuildConfig, *, progress: bool = True) -> BuildResult:
    """Build the dataset ``config`` describes on Kafka: publish the cases not stored yet,
    store what the stage workers deliver to the records topic, and write the dataset
    once every case is stored. Run again on the same output to resume.

    The sink runs here because the output folder has one writer; stage workers
    (``unsafechain worker``) do the rest.

    Raises:
        BuildError: The output folder holds a build with a different configuration.
        SourceError: A prompt source cannot be read at all.
    """
    start = start_build(config)
    store = start.store
    try:
        if start.todo:
            loop = asyncio.new_event_loop()
            try:
                _sink_until_stored(config, start, loop, progress)
            finally:
                loop.close()
        return finish_build(config, start)
    finally:
        store.close()


def _sink_until_stored(config, start, loop: asyncio.AbstractEventLoop, progress: bool) -> None:
    store = start.store
    wanted = {record.id for record in start.todo}
    counts: dict[str, int] = {}

    with tqdm(total=len(wanted), desc="build", unit="case", disable=not progress) as bar:

        async def handle(case: case_pb2.Case) -> Emitted:
            if case.provenance.build_id != start.build_id:
                logger.warning(
                    "case %s: from build %s, not this one; skipped",
                    case.id,
                    case.provenance.build_id,
                )
            elif store.write(case) and case.id in wanted:
                counts[status_name(case.status)] = counts.get(status_name(case.status), 0) + 1
                bar.set_postfix(counts, refresh=False)
                bar.update()
            return []

        runner = MessageRunner(
            config.kafka, RECORDS, SINK, handle, dead_letter=False, loop=loop, concurrency=1
        )
        # The models are loaded here only to name them in each case's provenance.
        engines = loop.run_until_complete(_engines(config))
        try:
            provenance = build_provenance(start.build_id, engines)
        finally:
            loop.run_until_complete(engines.aclose())
        sent = publish_cases(config.kafka, (new_case(r, provenance) for r in start.todo))
        logger.info("published %d cases to %s", sent, topic_name(config.kafka, PROMPTS))
        with _stopped_by_signals(runner):
            runner.run(done=lambda: wanted <= store.ids)
        if not wanted <= store.ids:
            missing = len(wanted - store.ids)
            raise BuildError(f"stopped with {missing} cases not stored; run again to resume")
