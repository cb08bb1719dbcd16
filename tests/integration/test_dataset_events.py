"""A finished build announces its dataset on the datasets topic of a real broker: once,
with what its manifest says; and a broker out of reach at the end leaves the dataset
written and the build failed with where it is, until the build is run again."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import yaml

from tests.support.builds import write_build_config
from tests.support.kafka_broker import free_port, kafka_section, topic_messages
from unsafechain.cli import main
from unsafechain.dataset.config import load_config
from unsafechain.dataset.events import EVENTS, decode_dataset_event
from unsafechain.dataset.kafka import create_build_topics, run_kafka_build, run_worker
from unsafechain.dataset.pipeline import STAGE_NAMES, run_build
from unsafechain.streaming.kafka import topic_name

pytestmark = pytest.mark.integration

PROMPTS = Path(__file__).parents[2] / "pipelines" / "unsafechain" / "demo" / "prompts"


def _config(folder: Path, standin_models, bootstrap: str, prefix: str, events=None) -> Path:
    """A two-prompt build (one red-team, one benign) at K=1."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (PROMPTS / "redteam.jsonl").read_text().splitlines()[:1]
    lines += (PROMPTS / "benign.jsonl").read_text().splitlines()[:1]
    source = folder / "prompts.jsonl"
    source.write_text("\n".join(lines) + "\n")
    path = write_build_config(folder, standin_models, [{"name": "mixed", "path": str(source)}])
    config = yaml.safe_load(path.read_text())
    # Long enough for the stand-ins to finish a completion, so the build has rows.
    config["generation"] |= {"samples": 1}
    config["correction"] |= {"max_attempts": 1}
    config["assembly"] = {"random_size": 1, "selected_size": 1}
    config["kafka"] = kafka_section(bootstrap, prefix)
    if events is not None:
        config["events"] = events
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_event_matches_the_manifest(message, output: Path) -> None:
    manifest = json.loads((output / "manifest.json").read_text())
    event = decode_dataset_event(message.value)
    assert message.key == manifest["build_id"].encode()
    assert event.build_id == manifest["build_id"]
    assert event.config_fingerprint == manifest["config_fingerprint"]
    assert event.output_uri == str(output.resolve())
    expected_rows = dict(manifest["subsets"])
    if manifest["counts"]["test_rows"]:
        expected_rows["test"] = manifest["counts"]["test_rows"]
    assert dict(event.subset_rows) == expected_rows
    pairs = (output / "pairs.jsonl").read_text().splitlines()
    assert event.preference_pairs == len([line for line in pairs if line.strip()])
    assert dict(event.counts) == manifest["counts"]
    digest = hashlib.sha256((output / "dataset.jsonl").read_bytes()).hexdigest()
    assert event.dataset_sha256 == digest
    assert event.finished_at.ToDatetime().isoformat() in manifest["finished_at"]
    assert event.platform_version == manifest["platform_version"]
    announcements = json.loads((output / EVENTS).read_text())["announcements"]
    assert announcements[-1]["event_id"] == event.event_id
    assert announcements[-1]["topic"] == message.topic
    assert announcements[-1]["offset"] == message.offset


def test_an_embedded_build_asked_to_publish_announces_its_dataset_once(
    tmp_path, standin_models, bootstrap
):
    config = load_config(
        _config(tmp_path, standin_models, bootstrap, "announce", {"publish": True})
    )
    create_build_topics(config.kafka, config.events)
    result = run_build(config, progress=False)
    [message] = topic_messages(bootstrap, topic_name(config.kafka, "datasets"))
    _assert_event_matches_the_manifest(message, result.output)
    assert result.announcement is not None
    assert result.announcement.event_id == decode_dataset_event(message.value).event_id
    assert result.manifest["counts"]["written"] > 0


def test_an_embedded_build_announces_nothing_by_default(tmp_path, standin_models, bootstrap):
    config = load_config(_config(tmp_path, standin_models, bootstrap, "quiet"))
    create_build_topics(config.kafka, config.events)
    result = run_build(config, progress=False)
    assert result.announcement is None
    assert topic_messages(bootstrap, topic_name(config.kafka, "datasets")) == []
    assert not (result.output / EVENTS).exists()


@pytest.mark.timeout(240)
def test_a_kafka_build_announces_its_dataset_by_default(tmp_path, standin_models, bootstrap):
    config = load_config(_config(tmp_path, standin_models, bootstrap, "announced-kafka"))
    created = create_build_topics(config.kafka, config.events)
    assert "announced-kafka.v1.datasets" in created
    finished = threading.Event()
    workers = [
        threading.Thread(target=run_worker, args=(config, s), kwargs={"until": finished.is_set})
        for s in STAGE_NAMES
    ]
    for worker in workers:
        worker.start()
    try:
        result = run_kafka_build(
            config, progress=False, stop=lambda: not all(w.is_alive() for w in workers)
        )
    finally:
        finished.set()
        for worker in workers:
            worker.join(timeout=60)
    [message] = topic_messages(bootstrap, topic_name(config.kafka, "datasets"))
    _assert_event_matches_the_manifest(message, result.output)


def test_a_broker_out_of_reach_fails_the_build_with_the_dataset_written_until_run_again(
    tmp_path, standin_models, bootstrap, capsys
):
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    path = _config(
        tmp_path, standin_models, bootstrap, "outage", {"publish": True, "timeout_seconds": 2}
    )
    output = (tmp_path / "out").resolve()
    create_build_topics(load_config(path).kafka)

    assert main(["build", "--config", str(path), "--no-progress", "--bootstrap", down]) == 2
    error = capsys.readouterr().err
    assert f"the dataset is written to {output}, but its event was not published" in error
    assert f"no Kafka broker at {down} answered within 2 s" in error
    assert "Run the same build command again to publish it" in error
    manifest = json.loads((output / "manifest.json").read_text())
    rows = (output / "dataset.jsonl").read_text().splitlines()
    assert len(rows) == manifest["counts"]["written"] > 0
    assert manifest["counts"]["cases"] == 2
    assert not (output / EVENTS).exists()
    topic = topic_name(load_config(path).kafka, "datasets")
    assert topic_messages(bootstrap, topic) == []

    # Run again, the broker reachable: the finished build is finished again (nothing
    # recomputed) and announced.
    assert main(["build", "--config", str(path), "--no-progress"]) == 0
    assert f"announced on {topic} (event " in capsys.readouterr().out
    [message] = topic_messages(bootstrap, topic)
    _assert_event_matches_the_manifest(message, output)
    again = json.loads((output / "manifest.json").read_text())
    assert again["build_id"] == manifest["build_id"]
    assert again["counts"]["resumed"] == 2
    assert (output / "dataset.jsonl").read_text().splitlines() == rows
