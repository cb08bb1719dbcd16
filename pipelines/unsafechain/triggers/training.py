"""Follow the datasets builds announce and submit a configured training run for each.

``unsafechain worker train --config FOLLOW.yaml`` consumes ``<prefix>.<version>.datasets``
in a consumer group of its own (``<prefix>.<version>.train``). For each event it makes a
``TrainingSpec`` from the configured run template and submits it to the training
service with a request id derived from the build and the run
(``<build id>:<run fingerprint>``), and commits the event's offset only once the
service has answered. Delivery is at least once and the service keeps one run per
request id, so each build gets exactly one run: a redelivered event, or a build
announced again, submits nothing new, while another run template for the same build is
a new run.

An undecodable event, and one the service refuses as invalid (INVALID_ARGUMENT), is
dead-lettered on ``<topic>.dlq`` with its reason; an event whose subset has no rows, or
whose build was made with another configuration than ``config_fingerprints`` allows,
is logged and skipped. A service that is unavailable is retried with backoff within
``retry.give_up_after_seconds``; after that the worker stops without committing, so
the event waits for the next worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, model_validator

from unsafechain.backends.base import BackendError, BackendRejected
from unsafechain.dataset.config import DATASETS
from unsafechain.dataset.events import decode_dataset_event
from unsafechain.domain.settings import (
    ConfigError,
    ConfigPath,
    StrictModel,
    load_config_file,
    text_for_service,
)
from unsafechain.runtime.settings import ClientSettings
from unsafechain.streaming.kafka import (
    ConsumerLag,
    DeliveryRunner,
    KafkaSettings,
    PermanentError,
    Unrecoverable,
    stopped_by_signals,
    topic_name,
)
from unsafechain.streaming.stages import Emitted
from unsafechain.training.client import RemoteTrainingClient
from unsafechain.training.settings import (
    TrainingSettings,
    load_training_settings,
    training_settings_from_text,
)
from unsafechain.v1 import events_pb2, training_pb2

logger = logging.getLogger(__name__)

STAGE = "train"
"""The follower's consumer group is ``<prefix>.<version>.train``."""

EXECUTORS = {
    "local": training_pb2.TRAINING_EXECUTOR_LOCAL,
    "kubernetes": training_pb2.TRAINING_EXECUTOR_KUBERNETES,
}

# What a run template's dataset.path and output.dir stand for while it is validated:
# the event gives the one, the follower or the service the other.
_FROM_THE_EVENT = "<the build's output folder>"
_FROM_THE_SERVICE = "<the run's output folder>"


class ServiceRetrySettings(StrictModel):
    """How an unavailable training service is waited for.

    Attributes:
        initial_backoff_seconds: Wait before the first retry, doubled for each further one.
        max_backoff_seconds: Longest wait between two tries.
        give_up_after_seconds: The worker stops (without committing the event, which
            the group redelivers) when the service is still unavailable after this long.
    """

    initial_backoff_seconds: Annotated[float, Field(gt=0)] = 1.0
    max_backoff_seconds: Annotated[float, Field(gt=0)] = 30.0
    give_up_after_seconds: Annotated[float, Field(gt=0)] = 240.0


class FollowSettings(StrictModel):
    """The schema of ``unsafechain worker train --config FILE``.

    Attributes:
        kafka: Where the builds announce (the builds' ``kafka`` section).
        topic: The datasets topic's short name (the builds' ``events.topic``).
        server: The training service.
        run: A run configuration (the schema of ``unsafechain train --config``) used as
            the template of every run; its ``dataset.path`` and ``output.dir`` may be
            left out: the event gives the dataset, ``output_root`` or the service the
            output.
        subset: The subset trained on; default: the template's ``dataset.subset``, else
            ``full``.
        executor: Where the service runs it (``local`` or ``kubernetes``); default: the
            service's.
        output_root: Each run writes to ``<output_root>/<build id>-<run fingerprint>``,
            as the run sees it; default: a folder the service picks.
        config_fingerprints: Follow only builds made with one of these configuration
            fingerprints; empty: every build on the topic.
        retry: Waiting for an unavailable training service.
    """

    kafka: KafkaSettings = KafkaSettings()
    topic: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = DATASETS
    server: ClientSettings
    run: ConfigPath
    subset: Literal["full", "random", "selected"] | None = None
    executor: Literal["local", "kubernetes"] | None = None
    output_root: Annotated[str, Field(min_length=1)] | None = None
    config_fingerprints: tuple[str, ...] = ()
    retry: ServiceRetrySettings = ServiceRetrySettings()

    @model_validator(mode="after")
    def _waits_within_the_poll_interval(self) -> FollowSettings:
        bound = self.kafka.max_poll_interval_ms / 1000
        if self.retry.give_up_after_seconds >= bound:
            raise ValueError(
                f"retry.give_up_after_seconds: {self.retry.give_up_after_seconds:g} s must "
                f"be below kafka.max_poll_interval_ms ({bound:g} s), or the group hands "
                "the event to another worker while this one still waits"
            )
        return self


@dataclass(frozen=True)
class RunTemplate:
    """The run every announced dataset gets.

    Attributes:
        path: The run configuration file.
        text: Its text, sent as the spec's ``config``: its relative paths start from the
            working directory (:func:`unsafechain.domain.settings.text_for_service`).
        settings: It validated, with stand-ins for the dataset and output locations.
        subset: The subset trained on.
    """

    path: Path
    text: str
    settings: TrainingSettings
    subset: str

    def run_settings(self, dataset_uri: str) -> TrainingSettings:
        """The run's settings on the dataset at ``dataset_uri``, as the service makes
        them from the spec (the output folder left as the template has it)."""
        dataset = self.settings.dataset.model_copy(
            update={"path": Path(dataset_uri), "subset": self.subset}
        )
        return self.settings.model_copy(update={"dataset": dataset})

    def fingerprint(self, dataset_uri: str) -> str:
        """The fingerprint of the run on the dataset at ``dataset_uri``
        (:meth:`TrainingSettings.fingerprint`, which ``run.json`` records): what the
        template and the subset compute on that build."""
        return self.run_settings(dataset_uri).fingerprint()

    def rows(self, event: events_pb2.DatasetEvent) -> int:
        """What the run would train on in the build ``event`` announces: preference
        pairs for DPO, else the subset's rows."""
        if self.settings.objective == "dpo":
            return event.preference_pairs
        return event.subset_rows.get(self.subset, 0)


def load_run_template(path: Path, subset: str | None, output_root: str | None) -> RunTemplate:
    """Read and validate the run template ``path``.

    Raises:
        ConfigError: The file is missing or invalid, or sets ``output.dir`` without an
            ``output_root`` (every build's run would go to that one folder).
    """
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raw = None  # load_training_settings names the problem below.
    placeholders: dict[str, object] = {}
    dataset = raw.get("dataset") if isinstance(raw, dict) else None
    if not isinstance(dataset, dict) or "path" not in dataset:
        placeholders["dataset.path"] = _FROM_THE_EVENT
    output = raw.get("output") if isinstance(raw, dict) else None
    if not isinstance(output, dict) or "dir" not in output:
        placeholders["output.dir"] = _FROM_THE_SERVICE
    elif output_root is None:
        raise ConfigError(
            f"{path}: output.dir: every build's run would write to {output['dir']}; "
            "leave it out of the template or set output_root in the follow configuration"
        )
    if raw is None:
        load_training_settings(path)  # raises the ConfigError that names the problem
    # The template goes to the training service as text, read from the service's working
    # directory: its relative paths are rewritten to start from this one.
    text = text_for_service(path, TrainingSettings)
    settings = training_settings_from_text(text, placeholders, where=str(path))
    return RunTemplate(path, text, settings, subset or settings.dataset.subset or "full")


def training_request(
    template: RunTemplate,
    event: events_pb2.DatasetEvent,
    *,
    executor: str | None = None,
    output_root: str | None = None,
) -> tuple[training_pb2.TrainingSpec, str]:
    """The spec and the request id of the run ``template`` gives the build ``event``
    announces.

    The request id is ``<build id>:<run fingerprint>``: the same for every announcement
    of one build and one template, another for another template or subset.
    """
    fingerprint = template.fingerprint(event.output_uri)
    spec = training_pb2.TrainingSpec(
        config=template.text,
        dataset_uri=event.output_uri,
        subset=template.subset,
        executor=EXECUTORS[executor] if executor else training_pb2.TRAINING_EXECUTOR_UNSPECIFIED,
    )
    if output_root:
        spec.output_uri = f"{output_root.rstrip('/')}/{event.build_id}-{fingerprint}"
    return spec, f"{event.build_id}:{fingerprint}"


def load_follow_config(
    path: str | Path, overrides: dict[str, object] | None = None
) -> tuple[FollowSettings, RunTemplate]:
    """Read and validate a follow configuration and the run template it names.

    Raises:
        ConfigError: Either file is missing or invalid; the message names the key.
    """
    settings = load_config_file(path, FollowSettings, overrides)
    try:
        template = load_run_template(settings.run, settings.subset, settings.output_root)
    except ConfigError as error:
        raise ConfigError(f"{path}: run: {error}") from None
    return settings, template


class TrainingTrigger:
    """Submits the template's run for each announced build.

    Args:
        settings: The follow configuration.
        template: The run template.
        client: The training service's client.
        stopping: Whether the worker was asked to stop (ends the wait for an
            unavailable service).
    """

    def __init__(
        self,
        settings: FollowSettings,
        template: RunTemplate,
        client: RemoteTrainingClient,
        stopping: Callable[[], bool] = lambda: False,
    ):
        self._settings = settings
        self._template = template
        self._client = client
        self._stopping = stopping

    async def handle(self, event: events_pb2.DatasetEvent) -> Emitted:
        """Submit the run of the build ``event`` announces, unless it is skipped.

        Raises:
            PermanentError: The service refused the run as invalid.
            Unrecoverable: The service stayed unavailable, the worker was asked to stop
                while waiting for it, or it failed otherwise (credentials, say).
        """
        build = event.build_id
        wanted = self._settings.config_fingerprints
        if wanted and event.config_fingerprint not in wanted:
            logger.info(
                "%s: skipped: made with configuration %s, not one of %s",
                build,
                event.config_fingerprint,
                ", ".join(wanted),
            )
            return []
        if not self._template.rows(event):
            what = "preference pairs" if self._template.settings.objective == "dpo" else "rows"
            logger.info("%s: skipped: subset %s has no %s", build, self._template.subset, what)
            return []
        spec, request_id = training_request(
            self._template,
            event,
            executor=self._settings.executor,
            output_root=self._settings.output_root,
        )
        run, created = await self._submit(spec, request_id, build)
        if created:
            logger.info("%s: submitted run %s (request %s)", build, run.id, request_id)
        else:
            logger.info("%s: run %s was submitted before (request %s)", build, run.id, request_id)
        return []

    async def _submit(
        self, spec: training_pb2.TrainingSpec, request_id: str, build: str
    ) -> tuple[training_pb2.TrainingRun, bool]:
        retry = self._settings.retry
        deadline = time.monotonic() + retry.give_up_after_seconds
        delay = retry.initial_backoff_seconds
        while True:
            try:
                return await self._client.submit(spec, request_id)
            except BackendRejected as error:
                raise PermanentError(f"the training service refused the run: {error}") from None
            except BackendError as error:
                if not error.retryable:
                    raise Unrecoverable(f"{build}: submitting its run failed: {error}") from None
                if time.monotonic() + delay > deadline:
                    raise Unrecoverable(
                        f"{build}: the training service is still unavailable after "
                        f"{retry.give_up_after_seconds:g} s: {error}"
                    ) from None
                logger.warning("%s: %s; trying again in %.1f s", build, error, delay)
                if await self._stopped_within(delay):
                    raise Unrecoverable(
                        f"{build}: stopped while waiting for the training service"
                    ) from None
                delay = min(delay * 2, retry.max_backoff_seconds)

    async def _stopped_within(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while not self._stopping():
            left = end - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.2))
        return True


def follow_datasets(
    settings: FollowSettings,
    template: RunTemplate,
    *,
    metrics_port: int | None = None,
    until: Callable[[], bool] = lambda: False,
) -> None:
    """Submit the template's run for every build announced on the datasets topic until
    SIGTERM or SIGINT, which finish the event in hand, commit it and leave the group.

    Args:
        settings: The follow configuration.
        template: The run template.
        metrics_port: Serve the consumer lag on this port (0: a free one); none: don't.
        until: Polled between batches; the worker leaves the group when it holds (a
            worker in a thread, which takes no signals).

    Raises:
        Unrecoverable: The training service stayed unavailable or failed the submit
            otherwise; the event in hand is not committed.
    """
    stopping = threading.Event()
    with stopped_by_signals(stopping.set, "train worker"):
        try:
            _follow(settings, template, metrics_port, stopping.is_set, until)
        except Unrecoverable as error:
            if not stopping.is_set():
                raise
            logger.info("%s; the event is redelivered to the next worker", error)


def _follow(
    settings: FollowSettings,
    template: RunTemplate,
    metrics_port: int | None,
    stopping: Callable[[], bool],
    until: Callable[[], bool],
) -> None:
    loop = asyncio.new_event_loop()
    # Built inside the event loop: gRPC channels bind to the loop that creates them.
    client = loop.run_until_complete(_client(settings.server))
    endpoint = None
    try:
        trigger = TrainingTrigger(settings, template, client, lambda: stopping() or until())
        lag = None
        if metrics_port is not None:
            lag = ConsumerLag()
            endpoint = lag.serve("0.0.0.0", metrics_port)
            logger.info("%s: consumer lag served on port %d", STAGE, endpoint.port)
        runner = DeliveryRunner(
            settings.kafka,
            settings.topic,
            STAGE,
            trigger.handle,
            decode=decode_dataset_event,
            build_of=lambda event: event.build_id,
            # One event at a time, in the order of its partition.
            concurrency=1,
            loop=loop,
            lag=lag,
        )
        logger.info(
            "%s: consuming %s; submitting %s (subset %s) to %s",
            runner.group,
            topic_name(settings.kafka, settings.topic),
            template.path,
            template.subset,
            settings.server.address,
        )
        runner.run(done=lambda: stopping() or until())
    finally:
        if endpoint:
            endpoint.close()
        loop.run_until_complete(client.aclose())
        loop.close()


async def _client(settings: ClientSettings) -> RemoteTrainingClient:
    return RemoteTrainingClient(settings)
