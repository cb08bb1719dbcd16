import pytest
import yaml

from unsafechain.dataset.config import ConfigError, load_config

BASE = {
    "build": {"output": "out"},
    "sources": [{"name": "demo", "path": "prompts.jsonl"}],
    "models": {"m": {"backend": "transformers", "model": "some/model"}},
    "generation": {"model": "m", "samples": 3},
    "judging": {"judges": [{"name": "guard", "model": "m"}]},
    "correction": {"model": "m"},
}


def _load(tmp_path, config, overrides=None):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, overrides)


def test_valid_config_loads_with_defaults(tmp_path):
    config = _load(tmp_path, BASE)
    assert config.generation.params().n == 3
    assert config.routing.hard_fraction == 1.0
    assert config.correction.max_attempts == 3


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c: c["generation"].update(samples=0), "generation.samples"),
        (lambda c: c["generation"].update(temprature=0.6), "generation.temprature"),
        (lambda c: c["models"]["m"].update(backend="vllm"), "models.m.backend"),
        (lambda c: c["sources"][0].pop("path"), "sources.0.path"),
        (lambda c: c.pop("correction"), "correction"),
        (lambda c: c["judging"]["judges"][0].update(model="nope"), "judging.judges.0.model"),
        (lambda c: c.update(routing={"hard_fraction": 1.5}), "routing.hard_fraction"),
    ],
)
def test_config_errors_name_the_offending_key(tmp_path, change, key):
    config = yaml.safe_load(yaml.safe_dump(BASE))
    change(config)
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, config)
    assert key in str(error.value)


def test_overrides_and_missing_file(tmp_path):
    assert _load(tmp_path, BASE, {"build.output": "elsewhere"}).build.output == "elsewhere"
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_fingerprint_ignores_output_and_concurrency_but_not_sampling(tmp_path):
    first = _load(tmp_path, BASE)
    moved = _load(tmp_path, BASE, {"build.output": "x", "build.concurrency": 9})
    hotter = _load(tmp_path, BASE, {"generation.temperature": 1.0})
    assert first.fingerprint() == moved.fingerprint()
    assert first.fingerprint() != hotter.fingerprint()


def test_the_announcement_is_off_the_fingerprint_and_follows_the_bus_by_default(tmp_path):
    default = _load(tmp_path, BASE)
    announced = _load(tmp_path, BASE, {"events.publish": True, "events.topic": "ready"})
    assert default.fingerprint() == announced.fingerprint()
    assert default.events.topic == "datasets"
    assert (default.events.publishes(on_kafka=True), default.events.publishes(False)) == (
        True,
        False,
    )
    assert announced.events.publishes(on_kafka=False)
    assert not _load(tmp_path, BASE, {"events.publish": False}).events.publishes(True)
    with pytest.raises(ConfigError, match=r"events\.topic"):
        _load(tmp_path, BASE, {"events.topic": "has space"})


ALL_KINDS = [
    {"name": "guard", "model": "m", "report": False},
    {"name": "strongreject", "kind": "rubric", "model": "m", "threshold": 0.4},
    {"name": "xstest", "kind": "refusal", "model": "m", "compliance_is_unsafe": False},
    {
        "name": "panel",
        "kind": "ensemble",
        "members": ["guard", "strongreject"],
        "rule": "any_unsafe",
    },
]


def _with_judges(judges):
    config = yaml.safe_load(yaml.safe_dump(BASE))
    config["judging"]["judges"] = judges
    return config


def test_each_judge_kind_loads_with_its_own_fields(tmp_path):
    judging = _load(tmp_path, _with_judges(ALL_KINDS)).judging
    guard, rubric, refusal, ensemble = judging.judges
    assert (guard.kind, guard.prompt_format, guard.report) == ("llama_guard", "auto", False)
    assert guard.top_logprobs == 5  # what a default TGI server gives
    assert (rubric.kind, rubric.threshold, rubric.template) == ("rubric", 0.4, None)
    assert (refusal.kind, refusal.compliance_is_unsafe) == ("refusal", False)
    assert (ensemble.kind, ensemble.members, ensemble.rule) == (
        "ensemble",
        ["guard", "strongreject"],
        "any_unsafe",
    )
    assert [judge.name for judge in judging.reported] == ["strongreject", "xstest", "panel"]


@pytest.mark.parametrize(
    ("members", "key", "reason"),
    [
        (["guard", "nope"], "judging.judges.3.members.1", "no judge named 'nope'"),
        (["panel"], "judging.judges.3.members.0", "cannot be its own member"),
        (["inner"], "judging.judges.3.members.0", "is an ensemble"),
    ],
)
def test_bad_ensemble_member_names_the_key(tmp_path, members, key, reason):
    inner = {"name": "inner", "kind": "ensemble", "members": ["guard"]}
    judges = [*ALL_KINDS[:3], {**ALL_KINDS[3], "members": members}, inner]
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, _with_judges(judges))
    assert f"{key}: " in str(error.value)
    assert reason in str(error.value)


@pytest.mark.parametrize(
    ("judge", "key"),
    [
        ({"name": "r", "kind": "rubric", "model": "m", "prompt_format": "auto"}, "prompt_format"),
        ({"name": "r", "kind": "rubric", "model": "m", "threshold": 0}, "threshold"),
        ({"name": "r", "kind": "rubric", "model": "m", "top_logprobs": 5}, "top_logprobs"),
        ({"name": "g", "model": "m", "top_logprobs": 21}, "judges.1.llama_guard.top_logprobs"),
        ({"name": "g", "model": "m", "top_logprobs": -1}, "judges.1.llama_guard.top_logprobs"),
        ({"name": "e", "kind": "ensemble", "members": ["guard"], "rule": "vote"}, "rule"),
        ({"name": "x", "kind": "classifier", "model": "m"}, "judging.judges.1"),
    ],
)
def test_judge_fields_are_checked_per_kind(tmp_path, judge, key):
    with pytest.raises(ConfigError, match=key):
        _load(tmp_path, _with_judges([ALL_KINDS[0] | {"report": True}, judge]))


def test_a_build_needs_a_judge_that_reports(tmp_path):
    with pytest.raises(ConfigError, match="at least one judge needs report: true"):
        _load(tmp_path, _with_judges(ALL_KINDS[:1]))


def test_remote_judge_takes_every_judge_kind_the_build_can_configure(tmp_path):
    config = yaml.safe_load(yaml.safe_dump(BASE))
    config["models"]["grader"] = {"backend": "openai", "model": "gpt-4.1"}
    config["judging"]["judges"] = ALL_KINDS
    config["remote"] = {"judge": {"address": "judge:50051"}}
    loaded = _load(tmp_path, config)
    assert [judge.kind for judge in loaded.judging.judges] == [
        "llama_guard",
        "rubric",
        "refusal",
        "ensemble",
    ]
    assert loaded.remote.judge is not None


def test_top_k_is_off_by_default_and_recorded_in_provenance(tmp_path):
    import asyncio

    from unsafechain.dataset.pipeline import build_provenance

    default = asyncio.run(build_provenance(_load(tmp_path, BASE), "b1"))
    cut = asyncio.run(build_provenance(_load(tmp_path, BASE, {"generation.top_k": 40}), "b2"))
    assert (default.sampling.top_k, cut.sampling.top_k) == (0, 40)
    assert _load(tmp_path, BASE).correction.params().top_k == 0


@pytest.mark.parametrize(
    ("model", "section", "refused"),
    [
        ({"backend": "tgi", "base_url": "http://tgi:80"}, "generation", "TGI's Messages API"),
        ({"backend": "openai"}, "correction", "the OpenAI API takes no top_k"),
        ({"backend": "openai", "base_url": "https://api.openai.com/v1/"}, "generation", "the"),
        ({"backend": "openai", "base_url": "http://vllm:8000/v1"}, "generation", None),
        ({"backend": "transformers"}, "correction", None),
    ],
)
def test_a_top_k_the_model_cannot_apply_is_refused_naming_the_key(
    tmp_path, model, section, refused
):
    config = yaml.safe_load(yaml.safe_dump(BASE))
    config["models"]["m"] = {"model": "some/model", **model}
    config[section]["top_k"] = 20
    if refused is None:
        assert _load(tmp_path, config)
        return
    with pytest.raises(ConfigError, match=rf"{section}\.top_k: {refused}.*\(models\.m\)"):
        _load(tmp_path, config)
    # Greedy decoding has no candidates to cut: the setting is moot, not an error.
    config[section]["temperature"] = 0
    assert _load(tmp_path, config)
