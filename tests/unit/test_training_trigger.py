"""The training trigger's spec and request id, and its configuration's errors."""

from __future__ import annotations

import pytest
import yaml

from unsafechain.domain.settings import ConfigError
from unsafechain.training.settings import load_training_settings
from unsafechain.triggers.training import load_follow_config, training_request
from unsafechain.v1 import events_pb2, training_pb2

RUN = {
    "model": {"base": "some/model"},
    "objective": "sft",
    "method": "lora",
    "training": {"epochs": 1, "effective_batch_size": 2},
}


def _event(build_id: str = "build-1", **fields) -> events_pb2.DatasetEvent:
    values = {
        "event_id": "e1",
        "build_id": build_id,
        "config_fingerprint": "abc",
        "output_uri": f"/data/{build_id}",
        "subset_rows": {"full": 10, "random": 5, "selected": 5},
        "preference_pairs": 3,
    }
    return events_pb2.DatasetEvent(**(values | fields))


def _follow(tmp_path, run=RUN, **follow):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    config = {"server": {"address": "training:50051"}, "run": str(tmp_path / "run.yaml")}
    (tmp_path / "follow.yaml").write_text(yaml.safe_dump(config | follow))
    return load_follow_config(tmp_path / "follow.yaml")


def test_the_spec_carries_the_template_the_build_and_the_run_folder(tmp_path):
    settings, template = _follow(tmp_path, executor="kubernetes", output_root="/runs/")
    event = _event()
    spec, request_id = training_request(
        template, event, executor=settings.executor, output_root=settings.output_root
    )
    fingerprint = request_id.removeprefix("build-1:")
    assert spec.config == (tmp_path / "run.yaml").read_text()
    assert spec.dataset_uri == "/data/build-1"
    assert spec.subset == "full"
    assert spec.executor == training_pb2.TRAINING_EXECUTOR_KUBERNETES
    assert spec.output_uri == f"/runs/build-1-{fingerprint}"
    # The run fingerprint is the one the run records (run.json) once the service has set
    # dataset.path and dataset.subset from the spec.
    overrides = {"dataset.path": "/data/build-1", "dataset.subset": "full", "output.dir": "x"}
    run = load_training_settings(tmp_path / "run.yaml", overrides)
    assert fingerprint == run.fingerprint()


def test_the_request_id_is_the_same_for_the_same_build_and_new_for_another_run(tmp_path):
    _, template = _follow(tmp_path / "a")
    first = training_request(template, _event())[1]
    again = training_request(template, _event(event_id="e2"))[1]
    other_build = training_request(template, _event("build-2"))[1]
    _, longer = _follow(tmp_path / "b", RUN | {"training": {"epochs": 2}})
    _, selected = _follow(tmp_path / "c", subset="selected")
    assert first == again
    assert len({first, other_build, training_request(longer, _event())[1]}) == 3
    assert training_request(selected, _event())[1] != first
    assert training_request(selected, _event())[0].subset == "selected"


def test_without_an_output_root_the_service_picks_the_folder(tmp_path):
    _, template = _follow(tmp_path)
    spec, _ = training_request(template, _event())
    assert spec.output_uri == ""
    assert spec.executor == training_pb2.TRAINING_EXECUTOR_UNSPECIFIED


def test_the_subset_defaults_to_the_templates_and_dpo_counts_pairs(tmp_path):
    run = RUN | {"dataset": {"path": "ignored", "subset": "random"}, "objective": "dpo"}
    _, template = _follow(tmp_path, run)
    assert template.subset == "random"
    assert template.rows(_event(preference_pairs=0)) == 0
    assert template.rows(_event()) == 3


def test_a_template_with_an_output_folder_needs_an_output_root(tmp_path):
    with pytest.raises(ConfigError, match=r"run: .*output\.dir: every build's run would write"):
        _follow(tmp_path, RUN | {"output": {"dir": "runs/one"}})
    _, template = _follow(tmp_path, RUN | {"output": {"dir": "runs/one"}}, output_root="/r")
    # Sent as text, its relative paths start from the template file's folder still.
    assert template.settings.output.dir == tmp_path / "runs" / "one"
    assert yaml.safe_load(template.text)["output"]["dir"] == str(tmp_path / "runs" / "one")


@pytest.mark.parametrize(
    ("run", "follow", "key"),
    [
        (RUN, {"subset": "test"}, "subset"),
        (RUN, {"server": {}}, "server.address"),
        (RUN, {"executor": "slurm"}, "executor"),
        (RUN, {"retry": {"give_up_after_seconds": 400}}, "retry.give_up_after_seconds"),
        (RUN | {"method": "qlora"}, {}, "run: .*method"),
        (RUN | {"dataset": {"subset": "test"}}, {}, "run: .*dataset.subset"),
    ],
)
def test_a_bad_follow_configuration_names_the_key(tmp_path, run, follow, key):
    with pytest.raises(ConfigError, match=key):
        _follow(tmp_path, run, **follow)


def test_a_missing_run_template_is_named(tmp_path):
    (tmp_path / "follow.yaml").write_text(
        yaml.safe_dump({"server": {"address": "x:1"}, "run": str(tmp_path / "nope.yaml")})
    )
    with pytest.raises(ConfigError, match=r"run: config file not found: .*nope\.yaml"):
        load_follow_config(tmp_path / "follow.yaml")
