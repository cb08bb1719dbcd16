"""Build configurations over the tiny stand-in models, for tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_build_config(folder: Path, standin_models, sources: list[dict], *, seed: int = 3) -> Path:
    """Write a build configuration that runs every stage on the stand-in models, K=3.

    Returns:
        The YAML file's path; the build's output is ``folder / "out"``.
    """
    config = {
        "build": {"output": str(folder / "out"), "seed": seed, "concurrency": 2},
        "sources": sources,
        "models": {
            role: {
                "backend": "transformers",
                "model": str(getattr(standin_models, role)),
                "device": "cpu",
            }
            for role in ("generator", "judge", "corrector")
        },
        "generation": {
            "model": "generator",
            "samples": 3,
            "temperature": 0.7,
            "max_new_tokens": 96,
        },
        "judging": {"judges": [{"name": "guard", "model": "judge"}]},
        "correction": {"model": "corrector", "max_attempts": 2, "max_new_tokens": 96},
    }
    path = folder / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
