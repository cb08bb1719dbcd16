"""Build configurations over the tiny stand-in models, for tests."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

PROMPTS = Path(__file__).parents[2] / "pipelines" / "unsafechain" / "demo" / "prompts"


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


def build_training_dataset(folder: Path, standin_models) -> Path:
    """Run a real build over the stand-ins (K=2, two prompts per source held out) for
    training to read; its output folder."""
    from unsafechain.dataset.config import load_config
    from unsafechain.dataset.pipeline import run_build

    sources = [
        {"name": "redteam", "path": str(PROMPTS / "redteam.jsonl")},
        {"name": "benign", "path": str(PROMPTS / "benign.jsonl")},
    ]
    path = write_build_config(folder, standin_models, sources)
    raw = yaml.safe_load(path.read_text())
    raw["generation"]["samples"] = 2
    raw["test_split"] = {"size": 2}
    path.write_text(yaml.safe_dump(raw))
    # One torch thread: the tiny models' ops gain nothing from two, and on a shared
    # machine a second thread waits on the other processes (a build ran 15x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_build(load_config(path), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.manifest["counts"]["test_rows"] > 0
    return result.output


def local_model(model: Path) -> dict:
    """A ``models`` entry for a stand-in on the CPU."""
    return {"backend": "transformers", "model": str(model), "device": "cpu"}


def sample_rows(output: Path, model: str, benchmark: str) -> list[dict]:
    """The lines of an evaluation's ``samples/<model>/<benchmark>.jsonl``."""
    import json

    path = output / "samples" / model / f"{benchmark}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
