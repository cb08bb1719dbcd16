"""The Kafka transport against a real broker, with stage workers as separate processes
running tiny real models."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kafka import KafkaProducer, TopicPartition

from tests.support.builds import write_build_config
from tests.support.kafka_broker import FAST_GROUP_SETTINGS, free_port, kafka_section, topic_messages
from unsafechain.cli import main
from unsafechain.dataset.config import load_config
from unsafechain.dataset.kafka import create_build_topics, run_kafka_build
from unsafechain.dataset.pipeline import STAGE_NAMES, run_build
from unsafechain.streaming.kafka import (
    ConsumerLag,
    KafkaSettings,
    MessageRunner,
    create_topics,
    dead_letter_topic,
    make_consumer,
    topic_name,
)
from unsafechain.streaming.stages import stage_failed
from unsafechain.v1 import case_pb2

pytestmark = pytest.mark.integration

PROMPTS = Path(__file__).parents[2] / "pipelines" / "unsafechain" / "demo" / "prompts"


def _config(tmp_path: Path, standin_models, bootstrap: str, prefix: str, prompts: int) -> Path:
    lines = (PROMPTS / "redteam.jsonl").read_text().splitlines()
    lines += (PROMPTS / "benign.jsonl").read_text().splitlines()
    source = tmp_path / "prompts.jsonl"
    # Half red-team, half benign prompts, so both routes are taken.
    source.write_text("\n".join(lines[: prompts // 2] + lines[-(prompts - prompts // 2) :]) + "\n")
    path = write_build_config(tmp_path, standin_models, [{"name": "mixed", "path": str(source)}])
    config = yaml.safe_load(path.read_text())
    # Short samples keep nine processes on two cores within the time budget.
    config["generation"] |= {"samples": 2, "max_new_tokens": 24}
    config["correction"] |= {"max_attempts": 1, "max_new_tokens": 24}
    config["kafka"] = kafka_section(bootstrap, prefix)
    path.write_text(yaml.safe_dump(config))
    return path


class Workers:
    """Stage worker processes, each logging to its own file."""

    def __init__(self, config: Path, logs: Path):
        self._config = config
        self._logs = logs
        self.processes: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}

    def start(self, name: str, stage: str) -> None:
        port = free_port()
        # One torch thread each: several workers share two cores.
        env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with (self._logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "unsafechain.cli",
                    "worker",
                    stage,
                    "--config",
                    str(self._config),
                    "--metrics-port",
                    str(port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.metrics_ports[name] = port

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every worker; return their exit codes."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        return codes


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def _outcomes(output: Path) -> dict[str, tuple]:
    rows = [json.loads(line) for line in (output / "dataset.jsonl").read_text().splitlines()]
    failed = [json.loads(line) for line in (output / "failed.jsonl").read_text().splitlines()]
    return {row["id"]: (row["status"], row.get("response")) for row in rows + failed}


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, standin_models, bootstrap):
    """A build with two workers per stage and a poison message among the prompts."""
    tmp_path = tmp_path_factory.mktemp("kafka-build")
    path = _config(tmp_path, standin_models, bootstrap, "scaled", prompts=8)
    assert main(["topics", "create", "--config", str(path)]) == 0
    workers = Workers(path, tmp_path)
    for stage in STAGE_NAMES:
        for replica in (1, 2):
            workers.start(f"{stage}-{replica}", stage)
    settings = load_config(path).kafka
    producer = KafkaProducer(bootstrap_servers=[bootstrap])
    producer.send(topic_name(settings, "prompts"), key=b"poison", value=b"\xff\xff\xff\xff")
    producer.flush()
    producer.close()
    started = time.monotonic()
    result = run_kafka_build(load_config(path), progress=False)
    seconds = time.monotonic() - started
    metrics = _settled_lag(workers.metrics_ports["generate-1"])
    exit_codes = workers.stop_all()
    return path, result, seconds, metrics, exit_codes


def _settled_lag(port: int, timeout: float = 20) -> str:
    """The worker's metrics once its lag (measured every few seconds, off the consume
    loop) reads 0 on every partition it holds, or when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = [
            line for line in text.splitlines() if line.startswith("unsafechain_kafka_consumer_lag{")
        ]
        if (lines and all(line.endswith(" 0.0") for line in lines)) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.mark.timeout(280)
def test_two_workers_per_stage_build_the_same_dataset_as_the_embedded_build(distributed, tmp_path):
    path, result, seconds, _, _ = distributed
    embedded = run_build(load_config(path, {"build.output": str(tmp_path / "embedded")}))
    assert _outcomes(result.output) == _outcomes(embedded.output)
    # The poison message among the prompts is the one dead letter, counted as undecodable.
    assert result.manifest["counts"] == embedded.manifest["counts"] | {"dead_lettered": 1}
    assert result.manifest["dead_letters"] == {"by_stage": {}, "undecodable": 1}
    statuses = {status for status, _ in _outcomes(result.output).values()}
    assert len(statuses) > 1, statuses
    print(f"distributed build: {seconds:.1f} s")


def test_each_case_is_stored_exactly_once(distributed):
    _, result, _, _, _ = distributed
    stored = _ids(result.output / "cases.jsonl")
    assert len(stored) == len(set(stored)) == result.manifest["counts"]["cases"] == 8


def test_poison_message_ends_in_the_dead_letter_topic_with_its_reason(distributed, bootstrap):
    path, result, _, _, _ = distributed
    settings = load_config(path).kafka
    letters = topic_messages(bootstrap, dead_letter_topic(settings, "prompts"), settings.partitions)
    assert [letter.key for letter in letters] == [b"poison"]
    headers = {key: value.decode() for key, value in letters[0].headers}
    assert headers["stage"] == "generate"
    assert headers["attempts"] == "1"
    assert headers["error"].startswith("undecodable message")
    assert letters[0].value == b"\xff\xff\xff\xff"
    assert result.manifest["counts"]["cases"] == 8


def test_workers_export_consumer_lag_and_leave_cleanly_on_sigterm(distributed):
    _, _, _, metrics, exit_codes = distributed
    lag_lines = [
        line for line in metrics.splitlines() if line.startswith("unsafechain_kafka_consumer_lag{")
    ]
    assert lag_lines, metrics
    assert all('group="scaled.v1.generate"' in line for line in lag_lines)
    assert all(line.endswith(" 0.0") for line in lag_lines), lag_lines
    assert exit_codes == dict.fromkeys(exit_codes, 0)


@pytest.mark.timeout(240)
def test_worker_killed_mid_build_and_restarted_loses_and_duplicates_nothing(
    tmp_path, standin_models, bootstrap
):
    path = _config(tmp_path, standin_models, bootstrap, "killed", prompts=10)
    config = load_config(path)
    create_build_topics(config.kafka)
    workers = Workers(path, tmp_path)
    for stage in STAGE_NAMES:
        workers.start(stage, stage)
    outcome: dict[str, object] = {}

    def build() -> None:
        try:
            outcome["result"] = run_kafka_build(config, progress=False)
        except Exception as error:  # reported by the assertion below
            outcome["error"] = error

    builder = threading.Thread(target=build)
    builder.start()
    try:
        cases = tmp_path / "out" / "cases.jsonl"
        deadline = time.monotonic() + 150
        while not (cases.exists() and _ids(cases)) and time.monotonic() < deadline:
            time.sleep(0.2)
        stored_at_kill = len(_ids(cases))
        workers.kill("judge")
        workers.start("judge-restarted", "judge")
        builder.join(timeout=180)
    finally:
        codes = workers.stop_all()
    assert "error" not in outcome, outcome
    assert 0 < stored_at_kill < 10, "the kill did not land mid-build"
    result = outcome["result"]
    stored = _ids(cases)
    assert sorted(stored) == sorted(set(stored)) and len(stored) == 10
    written = _ids(result.output / "dataset.jsonl") + _ids(result.output / "failed.jsonl")
    assert sorted(written) == sorted(stored)
    assert codes["judge"] == -signal.SIGKILL


def test_consumer_lag_is_end_offset_minus_committed_offset(bootstrap):
    settings = KafkaSettings(
        bootstrap_servers=(bootstrap,),
        topic_prefix="lag",
        partitions=1,
        max_poll_records=1,
        **FAST_GROUP_SETTINGS,
    )
    create_topics(settings, ["prompts"])
    producer = KafkaProducer(bootstrap_servers=[bootstrap])
    for index in range(3):
        # One record per batch: Tansu reports the end offset of a batch's first record.
        producer.send(topic_name(settings, "prompts"), key=str(index).encode(), value=b"x")
        producer.flush()
    producer.close()
    consumer = make_consumer(settings, [topic_name(settings, "prompts")], "lag.v1.test")
    lag = ConsumerLag()
    endpoint = lag.serve("127.0.0.1", 0)
    try:
        deadline = time.monotonic() + 30
        while not consumer.poll(timeout_ms=500) and time.monotonic() < deadline:
            pass
        consumer.commit()
        assert lag.update(consumer, "lag.v1.test") == {("lag.v1.prompts", 0): 2}
        text = urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics").read().decode()
        assert (
            'unsafechain_kafka_consumer_lag{group="lag.v1.test",partition="0",'
            'topic="lag.v1.prompts"} 2.0' in text
        )
    finally:
        consumer.close()
        endpoint.close()


def test_a_case_that_keeps_failing_is_retried_then_dead_lettered_and_kept_as_failed(bootstrap):
    settings = KafkaSettings(
        bootstrap_servers=(bootstrap,),
        topic_prefix="retry",
        partitions=1,
        max_retries=2,
        retry_backoff_seconds=0.05,
        **FAST_GROUP_SETTINGS,
    )
    create_topics(settings, ["prompts", "records"])
    producer = KafkaProducer(bootstrap_servers=[bootstrap])
    case = case_pb2.Case(id="c1", prompt=case_pb2.Prompt(id="c1", text="hello"))
    producer.send(topic_name(settings, "prompts"), key=b"c1", value=case.SerializeToString())
    producer.flush()
    producer.close()
    calls = []

    async def broken(case):
        calls.append(time.monotonic())
        raise RuntimeError("boom")

    loop = asyncio.new_event_loop()
    runner = MessageRunner(
        settings,
        "prompts",
        "generate",
        broken,
        give_up=lambda case, reason: stage_failed(case, "generate", reason),
        loop=loop,
    )
    deadline = time.monotonic() + 60
    runner.run(done=lambda: len(calls) == 3 or time.monotonic() > deadline)
    loop.close()

    assert len(calls) == 3
    assert calls[2] - calls[1] >= calls[1] - calls[0] >= 0.05
    [letter] = topic_messages(bootstrap, dead_letter_topic(settings, "prompts"), 1)
    headers = {key: value.decode() for key, value in letter.headers}
    assert headers == {"error": "RuntimeError: boom", "stage": "generate", "attempts": "3"}
    [record] = topic_messages(bootstrap, topic_name(settings, "records"), 1)
    failed = case_pb2.Case.FromString(record.value)
    assert failed.status == case_pb2.CASE_STATUS_STAGE_FAILED
    assert failed.status_reason == "generate: RuntimeError: boom"
    consumer = make_consumer(settings, [topic_name(settings, "prompts")], runner.group)
    assert consumer.committed(TopicPartition(topic_name(settings, "prompts"), 0)) == 1
    consumer.close()


def _many_prompts_config(
    tmp_path: Path, standin_models, bootstrap: str, prefix: str, count: int
) -> Path:
    """A build of ``count`` distinct prompts, half of them red-team, on short samples."""
    redteam = [json.loads(line)["prompt"] for line in (PROMPTS / "redteam.jsonl").open()]
    benign = [json.loads(line)["prompt"] for line in (PROMPTS / "benign.jsonl").open()]
    pool = [*redteam, *benign]
    source = tmp_path / "prompts.jsonl"
    source.write_text(
        "".join(
            json.dumps({"prompt": f"{pool[i % len(pool)]} (case {i})"}) + "\n" for i in range(count)
        )
    )
    path = write_build_config(tmp_path, standin_models, [{"name": "many", "path": str(source)}])
    config = yaml.safe_load(path.read_text())
    config["generation"] |= {"samples": 2, "max_new_tokens": 16}
    config["correction"] |= {"max_attempts": 1, "max_new_tokens": 16}
    # The numbered prompts are near-duplicates of each other by design.
    config["deduplication"] = {"near": False}
    config["kafka"] = kafka_section(bootstrap, prefix) | {"idle_timeout_seconds": 120}
    path.write_text(yaml.safe_dump(config))
    return path


def _build_in_thread(config) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def build() -> None:
        try:
            outcome["result"] = run_kafka_build(config, progress=False)
        except Exception as error:  # reported by the test's assertions
            outcome["error"] = error

    builder = threading.Thread(target=build)
    builder.start()
    return builder, outcome


def _wait_for_stored(cases: Path, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = len(_ids(cases)) if cases.exists() else 0
        if stored >= at_least:
            return stored
        time.sleep(0.2)
    raise AssertionError(f"fewer than {at_least} cases stored after {timeout} s")


def _wait_for_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{path.name} never logged {text!r}"
        time.sleep(0.2)


def _assert_written_once(output: Path, count: int) -> None:
    stored = _ids(output / "cases.jsonl")
    assert len(stored) == len(set(stored)) == count
    written = _ids(output / "dataset.jsonl") + _ids(output / "failed.jsonl")
    assert sorted(written) == sorted(stored)


@pytest.mark.timeout(420)
def test_workers_killed_and_restarted_three_times_mid_build_lose_and_duplicate_nothing(
    tmp_path, standin_models, bootstrap
):
    count = 100
    config = load_config(_many_prompts_config(tmp_path, standin_models, bootstrap, "chaos", count))
    create_build_topics(config.kafka)
    workers = Workers(tmp_path / "build.yaml", tmp_path)
    for stage in STAGE_NAMES:
        for replica in (1, 2):
            workers.start(f"{stage}-{replica}", stage)
    started = time.monotonic()
    builder, outcome = _build_in_thread(config)
    cases = tmp_path / "out" / "cases.jsonl"
    try:
        stored = 0
        for round_, victim in enumerate(("judge-1", "generate-2", "correct-1")):
            stored = _wait_for_stored(cases, stored + 10, timeout=150)
            assert stored < count, "the build ended before the kills"
            workers.kill(victim)
            workers.start(f"{victim}-r{round_}", victim.rsplit("-", 1)[0])
        builder.join(timeout=300)
    finally:
        workers.stop_all()
    seconds = time.monotonic() - started
    assert not builder.is_alive(), "the build did not finish in time"
    assert "error" not in outcome, outcome
    _assert_written_once(tmp_path / "out", count)
    print(f"{count} cases with three kills: {seconds:.0f} s")


@pytest.mark.timeout(420)
def test_a_second_worker_joining_late_takes_over_partitions_and_nothing_wedges(
    tmp_path, standin_models, bootstrap
):
    count = 100
    config = load_config(_many_prompts_config(tmp_path, standin_models, bootstrap, "late", count))
    create_build_topics(config.kafka)
    workers = Workers(tmp_path / "build.yaml", tmp_path)
    for stage in STAGE_NAMES:
        workers.start(f"{stage}-1", stage)
    builder, outcome = _build_in_thread(config)
    try:
        _wait_for_stored(tmp_path / "out" / "cases.jsonl", 5, timeout=150)
        for stage in STAGE_NAMES:
            workers.start(f"{stage}-2", stage)
        builder.join(timeout=300)
        for stage in STAGE_NAMES:
            _wait_for_log(tmp_path / f"{stage}-2.log", ": consuming ", timeout=60)
    finally:
        codes = workers.stop_all()
    assert not builder.is_alive(), "the build did not finish in time"
    assert "error" not in outcome, outcome
    _assert_written_once(tmp_path / "out", count)
    assert codes == dict.fromkeys(codes, 0)
