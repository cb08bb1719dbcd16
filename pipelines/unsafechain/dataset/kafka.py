"""The dataset build on Kafka: stage workers (``unsafechain worker``) and the build
command, which publishes the prompts and is the sink.

The stages are the embedded build's; the runner of the streaming runtime owns their
delivery. The sink runs in the build command because the output folder has one
writer. It reads the records topic and the dead-letter topics in a consumer group of
its own build (``<prefix>.<version>.sink.<build id>``), so two builds that share a
topic prefix stay apart: each stores its own cases and leaves the others' records
for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf.message import DecodeError
from kafka.consumer.fetcher import ConsumerRecord
from tqdm import tqdm

from unsafechain.dataset.config import BuildConfig, EventSettings
from unsafechain.dataset.pipeline import (
    TOPICS,
    BuildError,
    BuildResult,
    BuildStart,
    DeadLetters,
    ResumeOptions,
    StageEngines,
    build_provenance,
    build_stage,
    finish_build,
    new_case,
    start_build,
)
from unsafechain.dataset.rows import status_name
from unsafechain.domain.files import write_atomically
from unsafechain.streaming.kafka import (
    BROKER_CALL_TIMEOUT_MS,
    BUILD_HEADER,
    STAGE_HEADER,
    ConsumerLag,
    KafkaSettings,
    MessageRunner,
    PermanentError,
    commit,
    create_topics,
    dead_letter_topic,
    decode,
    group_name,
    header,
    make_consumer,
    poll_batch,
    publish_cases,
    stopped_by_signals,
    topic_name,
    uncommitted,
)
from unsafechain.streaming.stages import (
    GENERATED,
    JUDGED,
    PROMPTS,
    RECORDS,
    TO_CORRECT,
    Emitted,
    run_stage,
    stage_failed,
)
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)


def create_build_topics(settings: KafkaSettings, events: EventSettings | None = None) -> list[str]:
    """Create the build's topics and their dead-letter topics, and the topic it
    announces its dataset on unless ``events.publish`` is false; say which were new."""
    events = events or EventSettings()
    announced = [events.topic] if events.publish is not False else []
    return create_topics(settings, [*TOPICS, *announced])


def run_worker(
    config: BuildConfig,
    stage_name: str,
    *,
    metrics_port: int | None = None,
    until: Callable[[], bool] = lambda: False,
) -> None:
    """Run one stage of the build as a member of its consumer group until SIGTERM or
    SIGINT, which finish the batch in hand, commit it and leave the group.

    A stage that fails on a case (a backend down, a timeout) is retried with backoff
    within ``kafka.max_retries``; a case that still fails goes to the dead-letter topic
    and on to the sink marked failed, with its reason. A case made with another
    configuration than the worker's is dead-lettered at once.

    Args:
        config: The build configuration; its ``kafka`` section says where.
        stage_name: ``generate``, ``judge``, ``route`` or ``correct``.
        metrics_port: Serve the consumer lag on this port (0: a free one); none: don't.
        until: Polled between batches; the worker leaves the group when it holds (a
            worker in a thread, which takes no signals).
    """
    stopping = threading.Event()
    # Signals are taken from the start: a worker told to stop while it loads its models
    # leaves as soon as they are loaded, without joining the group.
    with stopped_by_signals(stopping.set, f"{stage_name} worker"):
        _run_worker(config, stage_name, metrics_port, lambda: stopping.is_set() or until())


def _run_worker(
    config: BuildConfig, stage_name: str, metrics_port: int | None, until: Callable[[], bool]
) -> None:
    loop = asyncio.new_event_loop()
    fingerprint = config.fingerprint()
    # Built inside the event loop: gRPC channels bind to the loop that creates them.
    engines = loop.run_until_complete(_engines(config))
    endpoint = None
    try:
        stage = build_stage(stage_name, config, engines)

        async def handle(case: case_pb2.Case) -> Emitted:
            theirs = case.provenance.config_fingerprint
            if theirs and theirs != fingerprint:
                raise PermanentError(
                    f"case of build {case.provenance.build_id} was made with configuration "
                    f"{theirs}; this {stage.name} worker runs {fingerprint}: start the "
                    "workers with the build's configuration, or give each build its own "
                    "kafka.topic_prefix"
                )
            return await run_stage(stage, case, keep_failures=False)

        if until():
            return
        lag = None
        if metrics_port is not None:
            lag = ConsumerLag()
            endpoint = lag.serve("0.0.0.0", metrics_port)
            logger.info("%s: consumer lag served on port %d", stage_name, endpoint.port)
        runner = MessageRunner(
            config.kafka,
            stage.consumes,
            stage.name,
            handle,
            give_up=lambda case, reason: stage_failed(case, stage.name, reason),
            concurrency=config.build.concurrency,
            loop=loop,
            lag=lag,
        )
        logger.info("%s: consuming %s", runner.group, topic_name(config.kafka, stage.consumes))
        runner.run(done=until)
    finally:
        if endpoint:
            endpoint.close()
        loop.run_until_complete(engines.aclose())
        loop.close()


async def _engines(config: BuildConfig) -> StageEngines:
    return StageEngines(config)


STAGE_INPUTS = (("generate", PROMPTS), ("judge", GENERATED), ("route", JUDGED),
                ("correct", TO_CORRECT))  # fmt: skip
"""Each stage worker and the topic it consumes."""


def _warn_stalled(settings: KafkaSettings, idle: float, missing: int) -> None:
    """Say which stages have messages no worker has consumed: those are the stages
    whose workers are not running (or are stuck)."""
    waiting = {
        stage: uncommitted(settings, group_name(settings, stage), topic_name(settings, topic))
        for stage, topic in STAGE_INPUTS
    }
    stalled = [f"{stage} ({count} waiting)" for stage, count in waiting.items() if count]
    if stalled:
        first = next(stage for stage, count in waiting.items() if count)
        logger.warning(
            "no case arrived for %.0f s (%d not stored yet); messages no worker has "
            "consumed: %s; is `unsafechain worker %s --config …` running on topic prefix %r?",
            idle, missing, ", ".join(stalled), first, settings.topic_prefix,
        )  # fmt: skip
    else:
        logger.warning(
            "no case arrived for %.0f s (%d not stored yet); no stage has messages "
            "waiting: they are in the stages' hands (a slow model, a stuck worker)",
            idle, missing,
        )  # fmt: skip


def run_kafka_build(
    config: BuildConfig,
    *,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
    resume: ResumeOptions | None = None,
    republish: bool = False,
) -> BuildResult:
    """Build the dataset ``config`` describes on Kafka: publish the cases not stored yet,
    store what the stage workers deliver to the records topic, count what they
    dead-letter, and write the dataset once every case is stored or dead-lettered.
    Run again on the same output to resume.

    Args:
        config: The build configuration.
        progress: Show a progress bar.
        stop: Polled between batches; the build stops (to be resumed) when it holds.
        resume: What to recompute of an earlier run's cases.
        republish: Publish again the cases an earlier run published that are not
            stored yet (by default they are waited for: they are in flight).

    Raises:
        BuildError: The output folder holds a build with a different configuration; a
            service of a remote stage is not what the config says; no case arrived for
            ``kafka.idle_timeout_seconds``; or the build was stopped.
        SourceError: A prompt source cannot be read at all.
    """
    start = start_build(config, resume)
    try:
        dead_letters = DeadLetters()
        if start.todo:
            _sink_until_stored(config, start, dead_letters, progress, stop, republish)
        return finish_build(config, start, dead_letters, on_kafka=True)
    finally:
        start.close()


class _Sink:
    """Stores this build's records and counts its dead letters.

    A stage that gives up on a case sends it on marked failed and puts its message on
    the dead-letter topic; the two arrive on different topics in either order, so a
    case given up on is done once both are in.
    """

    def __init__(self, start: BuildStart, dead_letters: DeadLetters, bar: tqdm, since_ms: int):
        self._start = start
        self._wanted = {record.id for record in start.todo}
        self._given_up: set[str] = set()
        self._letters: set[tuple[str, str]] = set()
        self._undecodable: set[str] = set()
        self._dead_letters = dead_letters
        self._bar = bar
        self._since_ms = since_ms
        self._counts: dict[str, int] = {}
        self.last_progress = time.monotonic()

    @property
    def done(self) -> bool:
        """Whether every case is stored (and, if a stage gave up on it, its dead letter
        counted) or was dead-lettered as undecodable."""
        ended = self._start.store.ids | self._undecodable
        lettered = {key for _, key in self._letters}
        return self._wanted <= ended and self._given_up <= lettered

    @property
    def missing(self) -> int:
        """Cases neither stored nor dead-lettered."""
        return len(self._wanted - self._start.store.ids - self._undecodable)

    def take(self, record: ConsumerRecord) -> None:
        """Store a record of this build, or count a dead letter."""
        if record.topic.endswith(".dlq"):
            self._dead_letter(record)
            return
        try:
            case = decode(record.value)
        except DecodeError as error:
            # Stages only produce cases they decoded; this one came from elsewhere.
            logger.warning("records: undecodable message at offset %d: %s", record.offset, error)
            return
        if case.provenance.build_id != self._start.build_id:
            return  # Another build's, stored by its own sink.
        if self._start.store.write(case) and case.id in self._wanted:
            if case.status == case_pb2.CASE_STATUS_STAGE_FAILED:
                # Only a stage that gave up fails a case on Kafka.
                self._given_up.add(case.id)
            status = status_name(case.status)
            self._counts[status] = self._counts.get(status, 0) + 1
            self._bar.set_postfix(self._counts, refresh=False)
            self._bar.update()
            self.last_progress = time.monotonic()

    def _dead_letter(self, record: ConsumerRecord) -> None:
        build = header(record, BUILD_HEADER)
        stage = header(record, STAGE_HEADER) or "?"
        key = record.key.decode(errors="replace") if record.key else ""
        if build == self._start.build_id or (build is None and key in self._wanted):
            if (stage, key) in self._letters:
                return  # Redelivered and given up on again: one dead letter.
            self._letters.add((stage, key))
            self._dead_letters.by_stage[stage] += 1
            if build is None:
                # A case of this build no stage could decode: nothing else of it comes.
                self._undecodable.add(key)
        elif build is None and record.timestamp >= self._since_ms:
            self._dead_letters.undecodable += 1
        else:
            return
        self.last_progress = time.monotonic()


PUBLISHED = "published.json"
"""The ids of the cases a Kafka build published, so a restarted build command does not
send again the cases still in flight."""


class _Published:
    """The case ids a build has published, kept in the output folder."""

    def __init__(self, path: Path, build_id: str):
        self._path = path
        self._build_id = build_id
        self.ids: set[str] = set()
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except ValueError:
                logger.warning("%s is damaged; every unstored case is published again", path)
                return
            if state.get("build_id") == build_id:
                self.ids = set(state.get("ids", []))

    def add(self, ids: Iterable[str]) -> None:
        self.ids.update(ids)
        state = {"build_id": self._build_id, "ids": sorted(self.ids)}
        write_atomically(self._path, json.dumps(state) + "\n")


def _sink_until_stored(
    config: BuildConfig,
    start: BuildStart,
    dead_letters: DeadLetters,
    progress: bool,
    stop: Callable[[], bool],
    republish: bool,
) -> None:
    settings = config.kafka
    since_ms = int(datetime.now(UTC).timestamp() * 1000)
    topics = [topic_name(settings, RECORDS), *(dead_letter_topic(settings, t) for t in TOPICS)]
    group = f"{group_name(settings, 'sink')}.{start.build_id}"
    consumer = make_consumer(settings, topics, group)
    stopping = False

    def request_stop() -> None:
        nonlocal stopping
        stopping = True

    try:
        with tqdm(total=len(start.todo), desc="build", unit="case", disable=not progress) as bar:
            sink = _Sink(start, dead_letters, bar, since_ms)
            # Provenance from the config, or from the services of remote stages: no
            # model is loaded to name it.
            provenance = asyncio.run(build_provenance(config, start.build_id))
            published = _Published(start.output / PUBLISHED, start.build_id)
            fresh = start.todo.where(lambda r: republish or r.id not in published.ids)
            if len(fresh) < len(start.todo):
                logger.info(
                    "%d cases were published by an earlier run and are not stored yet: "
                    "waiting for them (--republish sends them again)",
                    len(start.todo) - len(fresh),
                )
            sent = publish_cases(settings, PROMPTS, (new_case(r, provenance) for r in fresh))
            published.add(record.id for record in fresh)
            logger.info("published %d cases to %s", sent, topic_name(settings, PROMPTS))
            warned = 0.0
            with stopped_by_signals(request_stop, group):
                while not sink.done and not stopping and not stop():
                    batch = poll_batch(consumer)
                    for record in batch:
                        sink.take(record)
                    if batch:
                        commit(consumer, "sink")
                    idle = time.monotonic() - sink.last_progress
                    if idle > settings.stall_warning_seconds and (
                        time.monotonic() - warned > settings.stall_warning_seconds
                    ):
                        warned = time.monotonic()
                        _warn_stalled(settings, idle, sink.missing)
                    if idle > settings.idle_timeout_seconds:
                        raise BuildError(
                            f"no case arrived for {idle:.0f} s ({sink.missing} of "
                            f"{len(start.todo)} not stored yet): are the stage workers "
                            "running on these topics (unsafechain worker generate|judge|"
                            f"route|correct --config …, kafka.topic_prefix "
                            f"{settings.topic_prefix!r})? Run again to resume (with "
                            "--republish if the topics were lost)"
                        )
    finally:
        consumer.close(timeout_ms=BROKER_CALL_TIMEOUT_MS)
    if dead_letters.total:
        logger.warning(
            "%d dead letter(s): %s, %d undecodable",
            dead_letters.total,
            dict(dead_letters.by_stage),
            dead_letters.undecodable,
        )
    if not sink.done:
        raise BuildError(f"stopped with {sink.missing} cases not stored; run again to resume")
