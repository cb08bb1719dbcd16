"""Mistakes a user makes at the command line end in one clear error line naming the
setting, never in a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unsafechain.cli import main

pytestmark = pytest.mark.usefixtures("restore_logging")


def _config(tmp_path: Path, **changes) -> Path:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    raw = {
        "build": {"output": str(tmp_path / "out")},
        "sources": [{"name": "s", "path": str(tmp_path / "prompts.jsonl")}],
        "models": {"m": {"backend": "transformers", "model": "/nowhere/no-such-model"}},
        "generation": {"model": "m"},
        "judging": {"judges": [{"name": "guard", "model": "m"}]},
        "correction": {"model": "m"},
    }
    for section, value in changes.items():
        raw[section] = value
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _error(capsys, argv: list[str]) -> str:
    assert main(["--log-level", "CRITICAL", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_model_path_that_is_no_model_names_its_key(tmp_path, capsys):
    err = _error(capsys, ["build", "--config", str(_config(tmp_path)), "--no-progress"])
    assert err.startswith("error: models.m.model: /nowhere/no-such-model is no folder here")


def test_an_unset_api_key_variable_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VARIABLE", raising=False)
    models = {"m": {"backend": "openai", "model": "x", "api_key_env": "NO_SUCH_KEY_VARIABLE"}}
    err = _error(capsys, ["build", "--config", str(_config(tmp_path, models=models))])
    assert "models.m" in err and "NO_SUCH_KEY_VARIABLE is not set" in err


def test_a_missing_correction_templates_folder_names_the_setting(tmp_path, capsys):
    models = {"m": {"backend": "openai", "model": "x", "base_url": "http://127.0.0.1:9/v1"}}
    correction = {"model": "m", "templates": str(tmp_path / "no-templates")}
    path = _config(tmp_path, models=models, correction=correction)
    err = _error(capsys, ["build", "--config", str(path), "--no-progress"])
    assert err.startswith("error: correction.templates: template missing")


def test_a_config_that_is_a_folder_or_not_text_is_a_config_error(tmp_path, capsys):
    assert "is a folder" in _error(capsys, ["build", "--config", str(tmp_path)])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in _error(capsys, ["build", "--config", str(binary)])
