"""``unsafechain check``: every problem of a build configuration on this machine,
together, each naming its key; against local protocol servers for the endpoints (the
OpenAI API's ``/v1/models``, TGI's ``/info``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.http_servers import OpenAIServer, TGIServer
from tests.support.kafka_broker import free_port
from unsafechain.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_logging")]

PROMPTS = Path(__file__).resolve().parents[2] / "pipelines/unsafechain/demo/prompts/redteam.jsonl"


def write(tmp_path: Path, models: dict, **sections) -> Path:
    config = {
        "build": {"output": str(tmp_path / "out")},
        "sources": [{"name": "demo", "path": str(PROMPTS)}],
        "models": models,
        "generation": {"model": "generator"},
        "judging": {"judges": [{"name": "llama_guard", "kind": "llama_guard", "model": "guard"}]},
        "correction": {"model": "corrector"},
        **sections,
    }
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_configuration_whose_endpoints_serve_its_models_is_ready(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHECK_TEST_KEY", "sk-check")
    with (
        OpenAIServer(model="gen", api_key="sk-check") as generator,
        TGIServer(model_id="meta-llama/Llama-Guard-3-8B") as guard,
        OpenAIServer(model="fix", api_key="sk-check") as corrector,
    ):
        models = {
            "generator": {"backend": "openai", "model": "gen", "base_url": generator.base_url,
                          "api_key_env": "CHECK_TEST_KEY"},
            "guard": {"backend": "tgi", "model": "meta-llama/Llama-Guard-3-8B",
                      "base_url": guard.base_url},
            "corrector": {"backend": "openai", "model": "fix", "base_url": corrector.base_url,
                          "api_key_env": "CHECK_TEST_KEY"},
        }  # fmt: skip
        assert main(["check", "--config", str(write(tmp_path, models))]) == 0
    assert "ready (checked files, models, keys, endpoints, services)" in capsys.readouterr().out


def test_every_problem_is_reported_together_naming_its_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHECK_TEST_KEY", "sk-check")
    monkeypatch.delenv("CHECK_TEST_UNSET", raising=False)
    with OpenAIServer(model="other-model", api_key="sk-check") as server:
        base_url = server.base_url
        models = {
            "generator": {"backend": "openai", "model": "gen", "base_url": server.base_url,
                          "api_key_env": "CHECK_TEST_KEY"},
            "guard": {"backend": "transformers", "model": str(tmp_path / "no-guard")},
            "corrector": {"backend": "openai", "model": "fix", "base_url": server.base_url,
                          "api_key_env": "CHECK_TEST_UNSET"},
        }  # fmt: skip
        path = write(
            tmp_path,
            models,
            remote={"judge": {"address": f"127.0.0.1:{free_port()}", "timeout": 2}},
        )
        bootstrap = f"127.0.0.1:{free_port()}"
        code = main(
            ["check", "--config", str(path), "--bus", "kafka", "--bootstrap", bootstrap,
             "--set", f"sources.0.path={tmp_path / 'missing.jsonl'}"]
        )  # fmt: skip
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    found = "\n".join(lines)
    assert f"sources.0.path: {tmp_path / 'missing.jsonl'} is not there" in found
    assert "models.corrector.api_key_env: environment variable CHECK_TEST_UNSET is not set" in found
    assert f"models.generator: {base_url} serves other-model, not gen" in found
    assert "remote.judge: " in found and "UNAVAILABLE" in found
    assert "kafka.bootstrap_servers: no broker answers" in found
    # The guard is judged by the remote service: its missing folder is no problem here.
    assert "models.guard" not in found
    assert len(lines) == 5


def test_a_refused_api_key_and_an_unreachable_endpoint_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHECK_TEST_KEY", "sk-wrong")
    with OpenAIServer(model="gen", api_key="sk-right") as server:
        unreachable = f"http://127.0.0.1:{free_port()}/v1"
        models = {
            "generator": {"backend": "openai", "model": "gen", "base_url": server.base_url,
                          "api_key_env": "CHECK_TEST_KEY"},
            "guard": {"backend": "openai", "model": "g", "base_url": unreachable},
            "corrector": {"backend": "openai", "model": "gen", "base_url": server.base_url,
                          "api_key_env": "CHECK_TEST_KEY"},
        }  # fmt: skip
        assert main(["check", "--config", str(write(tmp_path, models))]) == 2
    err = capsys.readouterr().err
    assert "models.generator: " in err and "answered 401 (the API key is refused)" in err
    assert f"models.guard: cannot reach 127.0.0.1:{unreachable.split(':')[2].split('/')[0]}" in err


def test_a_build_runs_the_local_checks_before_any_model_loads(tmp_path, capsys) -> None:
    models = {
        key: {"backend": "transformers", "model": str(tmp_path / f"no-{key}")}
        for key in ("generator", "guard", "corrector")
    }
    path = write(tmp_path, models)
    assert main(["build", "--config", str(path), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.count("is no folder here") == 3
    assert not (tmp_path / "out").exists()
