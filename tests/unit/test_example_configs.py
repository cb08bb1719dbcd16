from pathlib import Path

import pytest

from unsafechain.dataset.config import load_config

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "pipelines" / "unsafechain" / "demo" / "demo.yaml"
CONFIGS = [DEMO, *sorted((ROOT / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_shipped_configurations_are_valid(path):
    config = load_config(path)
    assert config.generation.params().n >= 1
