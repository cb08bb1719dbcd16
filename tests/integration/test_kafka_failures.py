"""Kafka builds whose stages fail: the runner retries a failing stage with backoff, a
case that still fails is dead-lettered and kept as failed, the build counts its dead
letters, and a build with no workers stops after its idle bound.

The generator is an OpenAI-compatible local server that follows the API's errors
(503 for the first N calls, then answers); judge and corrector are the stand-ins.
Workers run in threads of this process, as ``unsafechain worker`` runs them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from kafka import KafkaConsumer, TopicPartition

from tests.support.builds import write_build_config
from tests.support.http_servers import Fault, OpenAIServer, completion_from_text
from tests.support.kafka_broker import kafka_section
from unsafechain.dataset.config import BuildConfig, load_config
from unsafechain.dataset.kafka import create_build_topics, run_kafka_build, run_worker
from unsafechain.dataset.pipeline import STAGE_NAMES, BuildError
from unsafechain.streaming.kafka import dead_letter_topic, topic_name

pytestmark = pytest.mark.integration

PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Name a prime.", "Hi!"]
ANSWER = "<think>\nA short, kind answer is best here.\n</think>\n\nHere is a friendly answer."


def _answer(request: dict) -> list:
    return [completion_from_text(ANSWER) for _ in range(request.get("n") or 1)]


def _config(tmp_path: Path, standin_models, bootstrap: str, prefix: str, base_url: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    path = write_build_config(tmp_path, standin_models, [{"name": "chat", "path": str(source)}])
    config = yaml.safe_load(path.read_text())
    # The generator fails fast on its own (one try), so the runner's retries are tested.
    config["models"]["generator"] = {
        "backend": "openai",
        "model": "r1-distill",
        "base_url": base_url,
        "timeout": 10,
        "retry": {"max_attempts": 1},
    }
    config["generation"] |= {"samples": 2, "max_new_tokens": 24}
    config["correction"] |= {"max_attempts": 1, "max_new_tokens": 24}
    config["kafka"] = kafka_section(bootstrap, prefix) | {
        "max_retries": 4,
        "retry_backoff_seconds": 0.2,
        "idle_timeout_seconds": 60,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def _workers(config: BuildConfig, stages=STAGE_NAMES) -> Iterator[list[threading.Thread]]:
    """Stage workers in threads; the build given ``stop=`` below ends if one dies."""
    finished = threading.Event()
    threads = [
        threading.Thread(target=run_worker, args=(config, s), kwargs={"until": finished.is_set})
        for s in stages
    ]
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        finished.set()
        for thread in threads:
            thread.join(timeout=60)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(240)
def test_a_backend_that_fails_for_a_while_is_retried_and_every_case_is_written_once(
    tmp_path, standin_models, bootstrap
):
    with OpenAIServer(model="r1-distill", responder=_answer) as generator:
        # More failures than cases: some cases fail twice or three times first.
        generator.add_faults(*[Fault.unavailable()] * 6)
        config = load_config(
            _config(tmp_path, standin_models, bootstrap, "flaky", f"{generator.url}/v1")
        )
        create_build_topics(config.kafka)
        with _workers(config) as threads:
            result = run_kafka_build(
                config, progress=False, stop=lambda: not all(t.is_alive() for t in threads)
            )
        calls = len(generator.requests)
    counts = result.manifest["counts"]
    written = _ids(result.output / "dataset.jsonl") + _ids(result.output / "failed.jsonl")
    assert sorted(written) == sorted(set(written)) and len(written) == len(PROMPTS)
    failed = [
        json.loads(line) for line in (result.output / "failed.jsonl").read_text().splitlines()
    ]
    assert not [row for row in failed if row["status"] == "stage_failed"], failed
    assert counts["generated"] == 2 * len(PROMPTS)
    assert counts["dead_lettered"] == 0
    # Every fault was used up, each by one try; a rebalance may redeliver a case.
    assert calls >= len(PROMPTS) + 6


@pytest.mark.timeout(240)
def test_a_backend_that_never_recovers_dead_letters_every_case_and_keeps_it_as_failed(
    tmp_path, standin_models, bootstrap
):
    with OpenAIServer(model="r1-distill", responder=_answer) as generator:
        generator.add_faults(*[Fault.unavailable()] * 1000)
        config = load_config(
            _config(tmp_path, standin_models, bootstrap, "down", f"{generator.url}/v1")
        )
        create_build_topics(config.kafka)
        with _workers(config, stages=("generate",)) as threads:
            result = run_kafka_build(
                config, progress=False, stop=lambda: not all(t.is_alive() for t in threads)
            )
        calls = len(generator.requests)
    retries = config.kafka.max_retries
    assert calls == len(PROMPTS) * (retries + 1)
    failed = [
        json.loads(line) for line in (result.output / "failed.jsonl").read_text().splitlines()
    ]
    assert sorted(row["id"] for row in failed) == sorted(_ids(result.output / "cases.jsonl"))
    assert len(failed) == len(PROMPTS)
    for row in failed:
        assert row["status"] == "stage_failed"
        assert row["status_reason"].startswith("generate: ")
        assert "503" in row["status_reason"] or "navailable" in row["status_reason"]
        [stage] = row["provenance"]["stages"]
        assert stage["stage"] == "generate" and stage["error"]
    assert result.manifest["counts"]["dead_lettered"] == len(PROMPTS)
    assert result.manifest["dead_letters"] == {
        "by_stage": {"generate": len(PROMPTS)},
        "undecodable": 0,
    }
    assert dead_letter_topic(config.kafka, "prompts").endswith("prompts.dlq")


def test_a_build_without_workers_stops_after_its_idle_bound_with_a_clear_error(
    tmp_path, standin_models, bootstrap, caplog
):
    """Before it gives up, the build says which stage has messages no worker consumed."""
    path = _config(tmp_path, standin_models, bootstrap, "idle", "http://127.0.0.1:9/v1")
    config = load_config(
        path, {"kafka.idle_timeout_seconds": 4, "kafka.stall_warning_seconds": 1.5}
    )
    create_build_topics(config.kafka)
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="unsafechain.dataset.kafka"),
        pytest.raises(BuildError, match=r"no case arrived for .* are the stage workers running"),
    ):
        run_kafka_build(config, progress=False)
    assert time.monotonic() - started < 30
    warnings = [
        r.getMessage() for r in caplog.records if "no worker has consumed" in r.getMessage()
    ]
    assert warnings, caplog.text
    # The count is the broker's offsets (Tansu counts a produced batch as one).
    assert re.search(r"consumed: generate \([1-9][0-9]* waiting\);", warnings[0]), warnings[0]
    assert (
        "is `unsafechain worker generate --config …` running on topic prefix 'idle'" in warnings[0]
    )
    assert "judge (" not in warnings[0]


@pytest.mark.timeout(240)
def test_cases_of_another_configuration_on_the_same_topics_are_dead_lettered_not_lost(
    tmp_path, standin_models, bootstrap
):
    with OpenAIServer(model="r1-distill", responder=_answer) as generator:
        url = f"{generator.url}/v1"
        ours = load_config(_config(tmp_path / "a", standin_models, bootstrap, "shared", url))
        theirs = load_config(
            _config(tmp_path / "b", standin_models, bootstrap, "shared", url),
            {"generation.temperature": 0.3},
        )
        create_build_topics(ours.kafka)
        with _workers(ours, stages=("generate",)) as threads:
            result = run_kafka_build(
                theirs, progress=False, stop=lambda: not all(t.is_alive() for t in threads)
            )
    failed = [
        json.loads(line) for line in (result.output / "failed.jsonl").read_text().splitlines()
    ]
    assert len(failed) == len(PROMPTS)
    assert all("was made with configuration" in row["status_reason"] for row in failed)
    assert result.manifest["counts"]["dead_lettered"] == len(PROMPTS)


def _messages_on(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], consumer_timeout_ms=1500)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    count = sum(1 for _ in consumer)
    consumer.close()
    return count


def test_a_restarted_build_waits_for_the_cases_in_flight_instead_of_publishing_them_again(
    tmp_path, standin_models, bootstrap
):
    path = _config(tmp_path, standin_models, bootstrap, "restart", "http://127.0.0.1:9/v1")
    config = load_config(path, {"kafka.idle_timeout_seconds": 2})
    create_build_topics(config.kafka)
    prompts = topic_name(config.kafka, "prompts")
    partitions = config.kafka.partitions
    for _ in range(2):
        with pytest.raises(BuildError, match="no case arrived"):
            run_kafka_build(config, progress=False)
        assert _messages_on(bootstrap, prompts, partitions) == len(PROMPTS)
    with pytest.raises(BuildError, match="no case arrived"):
        run_kafka_build(config, progress=False, republish=True)
    assert _messages_on(bootstrap, prompts, partitions) == 2 * len(PROMPTS)
