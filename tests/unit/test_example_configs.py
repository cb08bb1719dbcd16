from pathlib import Path

import pytest

from unsafechain.dataset.config import load_config
from unsafechain.triggers.training import load_follow_config

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "pipelines" / "unsafechain" / "demo" / "demo.yaml"
FOLLOW = sorted((ROOT / "configs").glob("follow-*.yaml"))
CONFIGS = [DEMO, *sorted(set((ROOT / "configs").glob("*.yaml")) - set(FOLLOW))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_shipped_configurations_are_valid(path):
    config = load_config(path)
    assert config.generation.params().n >= 1


@pytest.mark.parametrize("path", FOLLOW, ids=lambda path: path.name)
def test_shipped_follow_configurations_load_with_their_run_templates(path, monkeypatch):
    # Their run templates are named relative to the repository root, as they are run.
    monkeypatch.chdir(ROOT)
    settings, template = load_follow_config(path)
    assert template.settings.model.base
    assert template.subset in ("full", "random", "selected")
    assert settings.server.address


def test_a_follow_configuration_ships():
    assert FOLLOW
