"""``unsafechain worker train`` against a real broker and a real gRPC server on loopback:
each announced build gets exactly one run, whatever is redelivered.

The gRPC server here, :class:`StandInTrainingService`, is a test double of the
training service's ``SubmitTrainingRun`` with the contract's request-id dedup (a
request id seen before returns the earlier run, ``created=false``), and it can do what
the real one cannot be made to do on cue: hold its answer (to kill the worker between
a submit and its commit) and refuse a chosen build. The chain with the real service,
whose run then trains, is
``tests/integration/test_training_service.py::test_an_announced_build_is_trained_once_however_often_it_is_announced``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from kafka import KafkaProducer

from tests.support.kafka_broker import committed_offsets, free_port, kafka_section, topic_messages
from unsafechain.streaming.kafka import create_topics, dead_letter_topic, topic_name
from unsafechain.triggers.training import follow_datasets, load_follow_config
from unsafechain.v1 import events_pb2, training_pb2, training_pb2_grpc

pytestmark = pytest.mark.integration

RUN = {
    "model": {"base": "some/reasoning-model"},
    "objective": "sft",
    "method": "lora",
    "training": {"epochs": 1, "effective_batch_size": 2},
}
REFUSED = "build-refused"


@dataclass
class Submit:
    request_id: str
    spec: training_pb2.TrainingSpec
    created: bool


class StandInTrainingService(training_pb2_grpc.TrainingServiceServicer):
    """``SubmitTrainingRun`` with request-id dedup; refuses the build ``REFUSED`` as
    invalid. ``hold`` cleared keeps each answer back until it is set again."""

    def __init__(self):
        self.lock = threading.Lock()
        self.submits: list[Submit] = []
        self.arrived: list[str] = []
        self.runs: dict[str, training_pb2.TrainingRun] = {}
        self.hold = threading.Event()
        self.hold.set()

    def SubmitTrainingRun(self, request, context):
        with self.lock:
            self.arrived.append(request.request_id)
        if request.request_id.startswith(f"{REFUSED}:"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.subset: no such subset")
        self.hold.wait(timeout=60)
        with self.lock:
            created = request.request_id not in self.runs
            if created:
                self.runs[request.request_id] = training_pb2.TrainingRun(
                    id=f"run-{len(self.runs) + 1}",
                    spec=request.spec,
                    state=training_pb2.TRAINING_RUN_STATE_PENDING,
                    request_id=request.request_id,
                )
            self.submits.append(Submit(request.request_id, request.spec, created))
            run = self.runs[request.request_id]
        return training_pb2.SubmitTrainingRunResponse(run=run, created=created)

    def for_build(self, build_id: str) -> list[Submit]:
        with self.lock:
            return [s for s in self.submits if s.request_id.startswith(f"{build_id}:")]


@contextmanager
def training_service(port: int | None = None) -> Iterator[tuple[StandInTrainingService, int]]:
    service = StandInTrainingService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    training_pb2_grpc.add_TrainingServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f"127.0.0.1:{port or 0}")
    server.start()
    try:
        yield service, port
    finally:
        service.hold.set()
        server.stop(grace=0)


def _follow_config(folder: Path, bootstrap: str, prefix: str, port: int, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(RUN))
    config = {
        "kafka": kafka_section(bootstrap, prefix),
        "server": {"address": f"127.0.0.1:{port}", "timeout": 10},
        "run": str(folder / "run.yaml"),
        "subset": "selected",
        "executor": "local",
        "output_root": str(folder / "runs"),
        "retry": {"initial_backoff_seconds": 0.2, "give_up_after_seconds": 4.5},
    }
    path = folder / "follow.yaml"
    path.write_text(yaml.safe_dump(config | extra))
    return path


def _event(build_id: str, selected: int = 4) -> events_pb2.DatasetEvent:
    return events_pb2.DatasetEvent(
        event_id=f"{build_id}-event",
        build_id=build_id,
        config_fingerprint="0123456789abcdef",
        output_uri=f"/data/{build_id}",
        subset_rows={"full": 8, "random": 4, "selected": selected},
        preference_pairs=2,
    )


def _publish(bootstrap: str, topic: str, *messages: tuple[bytes, bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=[bootstrap], acks="all")
    for key, value in messages:
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=30)
    producer.close(timeout=30)


def _announce(bootstrap: str, topic: str, *events: events_pb2.DatasetEvent) -> None:
    _publish(bootstrap, topic, *((e.build_id.encode(), e.SerializeToString()) for e in events))


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@contextmanager
def _follower(path: Path) -> Iterator[threading.Thread]:
    """``unsafechain worker train`` in a thread of this process."""
    settings, template = load_follow_config(path)
    stop = threading.Event()
    thread = threading.Thread(
        target=follow_datasets, args=(settings, template), kwargs={"until": stop.is_set}
    )
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=60)


def _topic(path: Path) -> tuple[str, str]:
    settings, _ = load_follow_config(path)
    create_topics(settings.kafka, ["datasets"])
    return topic_name(settings.kafka, "datasets"), dead_letter_topic(settings.kafka, "datasets")


@pytest.mark.timeout(240)
def test_each_build_gets_one_run_and_what_is_redelivered_undecodable_refused_or_empty_is_not(
    tmp_path, bootstrap
):
    with training_service() as (service, port):
        path = _follow_config(tmp_path, bootstrap, "trigger-follow", port)
        topic, dlq = _topic(path)
        first, second = _event("build-a"), _event("build-b")
        # The same build announced twice (a re-finished build), poison, an empty subset,
        # a build the service refuses, and another build.
        _announce(bootstrap, topic, first, first)
        _publish(bootstrap, topic, (b"poison", b"\xff\xff\xff\xff"))
        _announce(bootstrap, topic, _event("build-empty", selected=0), _event(REFUSED), second)
        with _follower(path) as thread:
            _wait(
                lambda: committed_offsets(bootstrap, topic, "trigger-follow.v1.train") == 6,
                60,
                "commits",
            )
            assert thread.is_alive()

    a = service.for_build("build-a")
    assert [s.created for s in a] == [True, False]
    assert a[0].request_id == a[1].request_id
    spec = a[0].spec
    fingerprint = a[0].request_id.removeprefix("build-a:")
    assert spec.config == (tmp_path / "run.yaml").read_text()
    assert spec.dataset_uri == "/data/build-a"
    assert spec.subset == "selected"
    assert spec.executor == training_pb2.TRAINING_EXECUTOR_LOCAL
    assert spec.output_uri == f"{tmp_path / 'runs'}/build-a-{fingerprint}"
    [b] = service.for_build("build-b")
    assert b.created and b.request_id.startswith("build-b:")
    assert service.for_build("build-empty") == []
    assert sum(r.startswith(f"{REFUSED}:") for r in service.arrived) == 1
    letters = topic_messages(bootstrap, dlq)
    reasons = {m.key: dict(m.headers)["error"].decode() for m in letters}
    assert set(reasons) == {b"poison", REFUSED.encode()}
    assert reasons[b"poison"].startswith("undecodable message")
    assert "INVALID_ARGUMENT: spec.subset: no such subset" in reasons[REFUSED.encode()]
    assert dict(next(m for m in letters if m.key == REFUSED.encode()).headers)["build"] == (
        REFUSED.encode()
    )


@pytest.mark.timeout(240)
def test_an_unavailable_service_is_retried_until_it_answers(tmp_path, bootstrap, caplog):
    caplog.set_level(logging.WARNING, logger="unsafechain.triggers.training")
    port = free_port()
    # Room to wait for the service however slow the machine: the worker would give up
    # (exit without committing) after give_up_after_seconds.
    path = _follow_config(
        tmp_path,
        bootstrap,
        "trigger-outage",
        port,
        kafka=kafka_section(bootstrap, "trigger-outage") | {"max_poll_interval_ms": 90_000},
        retry={"initial_backoff_seconds": 0.2, "give_up_after_seconds": 60},
    )
    topic, _ = _topic(path)
    _announce(bootstrap, topic, _event("build-late"))
    with _follower(path) as thread:
        _wait(lambda: "trying again in" in caplog.text, 30, "a failed try")
        with training_service(port) as (service, _):
            _wait(lambda: service.for_build("build-late"), 30, "the submit")
            _wait(
                lambda: committed_offsets(bootstrap, topic, "trigger-outage.v1.train") == 1,
                90,
                "commit",
            )
        assert thread.is_alive()
    [submit] = service.for_build("build-late")
    assert submit.created
    assert "build-late: " in caplog.text and "UNAVAILABLE" in caplog.text


def _worker(path: Path, log: Path) -> subprocess.Popen:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "unsafechain.cli", "worker", "train", "--config", str(path)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
        )


@pytest.mark.timeout(300)
def test_a_worker_killed_before_it_commits_submits_nothing_new_when_started_again(
    tmp_path, bootstrap
):
    with training_service() as (service, port):
        path = _follow_config(tmp_path, bootstrap, "trigger-killed", port)
        topic, _ = _topic(path)
        _announce(bootstrap, topic, _event("build-k"))
        service.hold.clear()  # the service takes the run but keeps its answer back
        first = _worker(path, tmp_path / "worker-1.log")
        try:
            _wait(lambda: service.arrived, 60, "the first submit")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            service.hold.set()
        _wait(lambda: service.for_build("build-k"), 10, "the first run to be created")
        assert committed_offsets(bootstrap, topic, "trigger-killed.v1.train") == 0
        second = _worker(path, tmp_path / "worker-2.log")
        try:
            _wait(lambda: len(service.for_build("build-k")) == 2, 60, "the redelivered submit")
            _wait(
                lambda: committed_offsets(bootstrap, topic, "trigger-killed.v1.train") == 1,
                90,
                "commit",
            )
        finally:
            second.send_signal(signal.SIGTERM)
            code = second.wait(timeout=60)
    submits = service.for_build("build-k")
    assert [s.created for s in submits] == [True, False]
    assert submits[0].request_id == submits[1].request_id
    assert len(service.runs) == 1
    assert code == 0, (tmp_path / "worker-2.log").read_text()
