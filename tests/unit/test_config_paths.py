"""Relative paths in a configuration file start from the file's folder; those given on
the command line, by the environment or in text sent to a service start from the
working directory; hub names stay hub names (issue 14, item 3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from unsafechain.cli import main
from unsafechain.dataset.config import load_config
from unsafechain.domain.settings import FileText, load_config_text, text_for_service
from unsafechain.runtime.settings import settings_from_values
from unsafechain.training.settings import (
    TrainingServiceSettings,
    TrainingSettings,
    load_training_settings,
)

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "unsafechain" / "demo" / "demo.yaml"


def _build_config(folder: Path) -> Path:
    """A build configuration in ``folder/conf`` with a folder ``models/gen`` and one
    ``gpt2`` beside it."""
    (folder / "conf" / "models" / "gen").mkdir(parents=True)
    (folder / "conf" / "gpt2").mkdir()
    config = {
        "build": {"output": "out/build"},
        "sources": [
            {"name": "local", "path": "data/prompts.jsonl"},  # one slash, a file suffix
            {"name": "nested", "path": "./more/prompts.csv"},
            {"name": "hub", "path": "openai/gsm8k", "format": "hub", "loader": "gsm8k"},
            {"name": "absolute", "path": "/srv/prompts.jsonl"},
            {"name": "home", "path": "~/prompts.jsonl"},
        ],
        "models": {
            "generator": {"backend": "transformers", "model": "models/gen"},  # exists there
            "guard": {"backend": "transformers", "model": "meta-llama/Llama-Guard-3-8B"},
            "corrector": {"backend": "openai", "model": "./not-a-path"},  # a served name
            "local": {"backend": "transformers", "model": "gpt2"},  # a folder there
            "deep": {"backend": "transformers", "model": "a/b/c", "adapter": "../adapter"},
        },
        "generation": {"model": "generator"},
        "judging": {"judges": [{"name": "guard", "kind": "llama_guard", "model": "guard"}]},
        "correction": {"model": "corrector", "templates": "templates"},
    }
    path = folder / "conf" / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_build_configs_paths_start_from_its_folder_and_hub_names_stay(tmp_path, monkeypatch):
    _build_config(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("../conf/build.yaml"))
    assert config.build.output == "../conf/out/build"
    assert [source.path for source in config.sources] == [
        "../conf/data/prompts.jsonl",
        "../conf/more/prompts.csv",
        "openai/gsm8k",
        "/srv/prompts.jsonl",
        os.path.expanduser("~/prompts.jsonl"),
    ]
    models = config.models
    assert models["generator"].model == "../conf/models/gen"
    assert models["guard"].model == "meta-llama/Llama-Guard-3-8B"
    assert models["corrector"].model == "./not-a-path"
    assert models["local"].model == "../conf/gpt2"
    assert (models["deep"].model, models["deep"].adapter) == ("../conf/a/b/c", "../adapter")
    assert config.correction.templates == "../conf/templates"
    # Nothing past validation is a marked string.
    assert _plain(config.model_dump(mode="python"))


def test_set_values_and_text_keep_the_working_directory(tmp_path, monkeypatch):
    path = _build_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = load_config(path, {"build.output": "mine", "sources.0.path": "here.jsonl"})
    assert config.build.output == "mine"
    assert config.sources[0].path == "here.jsonl"
    assert config.sources[1].path == str(tmp_path / "conf" / "more" / "prompts.csv")
    # Text with no file (a request field, --config-json): from the working directory.
    text = load_config_text(path.read_text(), type(config), where="--config-json")
    assert text.build.output == "out/build"
    assert text.sources[1].path == "./more/prompts.csv"


def test_a_services_config_file_paths_start_from_its_folder_and_the_environments_do_not(
    tmp_path, monkeypatch
):
    folder = tmp_path / "conf"
    folder.mkdir()
    config = folder / "training.yaml"
    config.write_text(yaml.safe_dump({"state_dir": "state", "output_root": "runs"}))
    monkeypatch.chdir(tmp_path)
    settings = settings_from_values(TrainingServiceSettings, {}, config)
    assert (settings.state_dir, settings.output_root) == (folder / "state", folder / "runs")
    monkeypatch.setenv("UNSAFECHAIN_OUTPUT_ROOT", "env/runs")
    settings = settings_from_values(TrainingServiceSettings, {"state_dir": "flag"}, config)
    assert (settings.state_dir, settings.output_root) == (Path("flag"), Path("env/runs"))


def _plain(value: object) -> bool:
    """Whether no string in a dumped model is still marked as read from a file."""
    if isinstance(value, str):
        return not isinstance(value, FileText)
    if isinstance(value, dict):
        return all(_plain(key) and _plain(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(item) for item in value)
    return True


RUN = {
    "model": {"base": "../models/tiny", "chat_template": "chat.jinja"},
    "dataset": {"path": "../out/build", "subset": "full"},
    "output": {"dir": "../runs/one"},
}


def test_a_run_config_sent_to_a_service_means_there_what_the_file_means_here(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "run.yaml"
    path.write_text("# a comment\n" + yaml.safe_dump(RUN | {"training": {"epochs": 2}}))
    monkeypatch.chdir(tmp_path)
    local = load_training_settings(Path("conf/run.yaml"))
    text = text_for_service(Path("conf/run.yaml"), TrainingSettings)
    assert yaml.safe_load(text) == {
        "model": {"base": "models/tiny", "chat_template": "conf/chat.jinja"},
        "dataset": {"path": "out/build", "subset": "full"},
        "output": {"dir": "runs/one"},
        "training": {"epochs": 2},
    }
    assert load_config_text(text, TrainingSettings, where="spec") == local
    hub = RUN | {"model": {"base": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}}
    path.write_text(yaml.safe_dump(hub))
    sent = yaml.safe_load(text_for_service(Path("conf/run.yaml"), TrainingSettings))
    assert sent["model"]["base"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def test_the_demo_plans_from_any_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--config", str(DEMO), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # The output and the prompts are the repository's, wherever the command runs.
    assert out.startswith(f"build {DEMO.parents[3] / 'out' / 'demo'}\n")
    assert "prompts: 28 read" in out


def test_a_missing_local_model_names_the_resolved_folder(tmp_path, monkeypatch, capsys):
    config = yaml.safe_load(DEMO.read_text())
    config["models"]["generator"]["model"] = "../standins/generator"
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "demo.yaml"
    config["sources"] = [
        {"name": "demo-redteam", "path": str(DEMO.parent / "prompts" / "redteam.jsonl")}
    ]
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path / "conf")
    assert main(["check", "--config", "demo.yaml"]) != 0
    err = capsys.readouterr()
    message = err.out + err.err
    assert "../standins/generator is no folder here" in message
    assert "starts from the file's folder" in message


@pytest.mark.parametrize("value", ["", "x"])
def test_an_empty_or_plain_output_is_validated_as_before(tmp_path, value):
    path = _build_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["build"]["output"] = value
    path.write_text(yaml.safe_dump(raw))
    if value:
        assert load_config(path).build.output == str(path.parent / value)
    else:
        with pytest.raises(ValueError, match=r"build\.output"):
            load_config(path)
