import pytest
import yaml

from unsafechain.pipelines.build.config import ConfigError, load_config

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
