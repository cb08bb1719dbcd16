"""A finished build's announcement: one ``DatasetEvent`` on ``<prefix>.<version>.datasets``.

The event is made from the manifest the build just wrote, so it says exactly what the
manifest says; it is keyed by build id, so every announcement of one build lands on
one partition, in order. Each announcement that the brokers acknowledged is recorded in
``events.json`` beside the manifest (the manifest describes the dataset and is written
before anything is announced; ``events.json`` keeps every announcement of it, a build
finished again adding one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from kafka.errors import KafkaError

from unsafechain.dataset.config import EventSettings
from unsafechain.streaming.kafka import KafkaSettings, make_producer, topic_name
from unsafechain.streaming.store import write_atomically
from unsafechain.v1 import events_pb2

logger = logging.getLogger(__name__)

EVENTS = "events.json"
"""The build's announcements, in its output folder."""

TEST_SUBSET = "test"


class EventNotPublished(Exception):
    """The brokers could not be reached, or did not acknowledge the event in time."""


@dataclass(frozen=True)
class Announcement:
    """An event the brokers acknowledged.

    Attributes:
        event_id: The event's id.
        topic: The topic it went to.
        partition: Its partition.
        offset: Its offset there.
        published_at: When the brokers acknowledged it (ISO 8601, UTC).
    """

    event_id: str
    topic: str
    partition: int
    offset: int
    published_at: str


def dataset_event(output: Path, manifest: Mapping[str, Any]) -> events_pb2.DatasetEvent:
    """The event announcing the dataset a build wrote to ``output`` with ``manifest``.

    ``subset_rows`` has ``full``, ``random`` and ``selected``, and ``test`` when the
    build held rows out; ``counts`` has the manifest's counts.
    """
    counts = {
        key: value
        for key, value in manifest["counts"].items()
        if isinstance(value, int) and not isinstance(value, bool)
    }
    subset_rows = dict(manifest["subsets"])
    if counts.get("test_rows"):
        subset_rows[TEST_SUBSET] = counts["test_rows"]
    event = events_pb2.DatasetEvent(
        event_id=uuid.uuid4().hex,
        build_id=manifest["build_id"],
        config_fingerprint=manifest["config_fingerprint"],
        output_uri=str(output.resolve()),
        subset_rows=subset_rows,
        preference_pairs=_lines(output / manifest["files"]["pairs"]),
        counts=counts,
        dataset_sha256=_sha256(output / "dataset.jsonl"),
        platform_version=manifest["platform_version"],
    )
    event.finished_at.FromDatetime(datetime.fromisoformat(manifest["finished_at"]))
    return event


def _lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish_event(
    kafka: KafkaSettings, events: EventSettings, event: events_pb2.DatasetEvent
) -> Announcement:
    """Send ``event`` keyed by its build id and wait until every in-sync replica has it.

    Raises:
        EventNotPublished: No broker answered, or the event was not acknowledged,
            within ``events.timeout_seconds``.
    """
    topic = topic_name(kafka, events.topic)
    timeout = events.timeout_seconds
    brokers = ", ".join(kafka.bootstrap_servers)
    try:
        producer = make_producer(kafka, timeout_ms=int(timeout * 1000))
    except KafkaError as error:
        raise EventNotPublished(
            f"no Kafka broker at {brokers} answered within {timeout:g} s ({error})"
        ) from None
    try:
        future = producer.send(topic, key=event.build_id.encode(), value=event.SerializeToString())
        producer.flush(timeout=timeout)
        metadata = future.get(timeout=timeout)
    except KafkaError as error:
        raise EventNotPublished(
            f"the event was not acknowledged on {topic} at {brokers} within {timeout:g} s ({error})"
        ) from None
    finally:
        producer.close(timeout=timeout)
    return Announcement(
        event_id=event.event_id,
        topic=topic,
        partition=metadata.partition,
        offset=metadata.offset,
        published_at=datetime.now(UTC).isoformat(),
    )


def announce(
    kafka: KafkaSettings, events: EventSettings, output: Path, manifest: Mapping[str, Any]
) -> Announcement:
    """Publish the event of the build in ``output`` and record it in ``events.json``.

    Raises:
        EventNotPublished: The brokers could not be reached or did not acknowledge it.
    """
    event = dataset_event(output, manifest)
    announcement = publish_event(kafka, events, event)
    _record(output / EVENTS, event.build_id, announcement)
    logger.info(
        "%s: announced on %s (event %s, partition %d, offset %d)",
        event.build_id,
        announcement.topic,
        announcement.event_id,
        announcement.partition,
        announcement.offset,
    )
    return announcement


def _record(path: Path, build_id: str, announcement: Announcement) -> None:
    earlier: list[dict[str, Any]] = []
    if path.exists():
        try:
            state = json.loads(path.read_text())
            if state.get("build_id") == build_id:
                earlier = list(state["announcements"])
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("%s is damaged; it is started afresh", path)
    state = {"build_id": build_id, "announcements": [*earlier, asdict(announcement)]}
    write_atomically(path, json.dumps(state, indent=2) + "\n")


def decode_dataset_event(value: bytes) -> events_pb2.DatasetEvent:
    """The dataset event a message carries.

    Raises:
        DecodeError: The bytes are not a dataset event, or one without a build id or
            an output location.
    """
    event = events_pb2.DatasetEvent()
    event.ParseFromString(value)
    if not event.build_id:
        raise DecodeError("dataset event has no build_id")
    if not event.output_uri:
        raise DecodeError(f"dataset event of {event.build_id} has no output_uri")
    return event
