"""The paper's runbook (configs/paper/): the fifteen training runs are the reference
LoRA recipes on the paper's datasets, and the three evaluations plan the six models of
each base on the twelve benchmarks, offline, before any run exists."""

from __future__ import annotations

from pathlib import Path

import datasets
import huggingface_hub
import pytest

from unsafechain.cli import main
from unsafechain.domain.settings import text_for_service
from unsafechain.evaluation.benchmarks import BENCHMARKS
from unsafechain.evaluation.config import load_eval_config
from unsafechain.evaluation.pipeline import plan_evaluation
from unsafechain.training.settings import (
    TrainingSettings,
    load_training_settings,
    training_settings_from_text,
)

ROOT = Path(__file__).parents[2]
PAPER = ROOT / "configs" / "paper"
MODELS = ("r1-distill-qwen-1.5b", "r1-distill-qwen-7b", "r1-distill-llama-8b")
DATASETS = {
    "safechain": ("data/safechain/train.jsonl", None, "safechain"),
    "star1": ("data/star1/star1.jsonl", None, "star1"),
    "unsafechain-full": ("out/unsafechain", "full", "unsafechain"),
    "unsafechain-random-1k": ("out/unsafechain", "random", "unsafechain"),
    "unsafechain-selected-1k": ("out/unsafechain", "selected", "unsafechain"),
}
TRAINING = sorted((PAPER / "train").glob("*.yaml"))
EVALS = sorted(PAPER.glob("eval-*.yaml"))
RUNS = [(model, dataset) for model in MODELS for dataset in DATASETS]


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable at once, as it is here (without this, each hub benchmark
    waits out the hub client's retries). The libraries read HF_HUB_OFFLINE when they
    are imported, so their flags are set too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    # The configs name paths relative to the repository root, as they are run.
    monkeypatch.chdir(ROOT)


def as_submitted(path: Path) -> TrainingSettings:
    """A paper training config as `train --server` sends it from the repository's root
    and the training service reads it (README step 3): text whose relative paths start
    from the working directory."""
    return training_settings_from_text(text_for_service(path, TrainingSettings), where=str(path))


def recipe_part(settings: TrainingSettings) -> dict:
    """Everything of a run but its data and its folder: the recipe."""
    return settings.model_dump(mode="json", exclude={"dataset": True, "output": {"dir"}})


def test_there_is_one_training_config_per_model_and_dataset():
    assert [path.stem for path in TRAINING] == sorted(f"{m}-{d}" for m, d in RUNS)


@pytest.mark.parametrize(("model", "dataset"), RUNS, ids=lambda value: value)
def test_a_training_config_is_its_models_lora_recipe_on_its_dataset(model, dataset):
    settings = load_training_settings(PAPER / "train" / f"{model}-{dataset}.yaml")
    recipe = load_training_settings(ROOT / "configs" / "training" / f"{model}-lora.yaml")
    assert recipe_part(settings) == recipe_part(recipe)
    assert settings.model.quantization == "8bit"
    path, subset, layout = DATASETS[dataset]
    # Relative paths start from the file's folder: the repository's data/, out/, runs/.
    assert (settings.dataset.path, settings.dataset.subset, settings.dataset.layout) == (
        ROOT / path,
        subset,
        layout,
    )
    assert settings.output.dir == ROOT / f"runs/paper/{model}-{dataset}"


@pytest.mark.parametrize("path", TRAINING, ids=lambda path: path.stem)
def test_a_training_config_sent_to_the_service_means_what_the_file_means(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    relative = path.relative_to(ROOT)  # as the README runs it, from the root
    local, sent = load_training_settings(relative), as_submitted(relative)
    assert sent == local
    assert not sent.dataset.path.is_absolute()
    assert sent.output.dir.as_posix().startswith("runs/paper/")


def test_there_is_one_evaluation_per_model():
    assert [path.name for path in EVALS] == sorted(f"eval-{model}.yaml" for model in MODELS)


@pytest.mark.parametrize("path", EVALS, ids=lambda path: path.stem)
def test_an_evaluation_plans_six_models_on_twelve_benchmarks_offline(path, offline):
    config = load_eval_config(path)
    model = path.stem.removeprefix("eval-")
    recipe = load_training_settings(ROOT / "configs" / "training" / f"{model}-lora.yaml")
    assert [b.name for b in config.benchmarks] == list(BENCHMARKS)
    assert (config.sampling.samples, config.sampling.temperature, config.sampling.top_p) == (
        5,
        0.6,
        0.95,
    )
    generator = config.models["r1"]
    assert (generator.backend, generator.model) == ("transformers", recipe.model.base)
    assert (generator.device, generator.dtype) == ("cuda", "bfloat16")
    assert config.models["guard"].model == "meta-llama/Llama-Guard-3-8B"

    plan = plan_evaluation(config, dry_run=True)
    text = plan.describe()
    assert text.startswith("evaluation of 6 model(s) on 12 benchmark(s), K=5")
    names = [c.name for c in config.candidates]
    assert names == [
        "base",
        "safechain",
        "star1",
        "unsafechain-full",
        "unsafechain-random-1k",
        "unsafechain-selected-1k",
    ]
    for name in names:
        assert f"\n  {name}: transformers {recipe.model.base}" in text
    for name in BENCHMARKS:
        assert f"\n  {name} (" in text
    # Not read here, planned from the published sizes; WildChat's subset has none.
    assert "strongreject (safety): 313 prompts expected" in text
    assert "wildchat_toxic (safety): size unknown" in text
    assert all(c.base == "base" for c in config.candidates[1:])


def test_the_evaluated_runs_are_exactly_the_training_runs():
    trained = {load_training_settings(path).output.dir for path in TRAINING}
    evaluated = [
        candidate.training_run
        for path in EVALS
        for candidate in load_eval_config(path).candidates
        if candidate.training_run is not None
    ]
    assert len(evaluated) == len(set(evaluated)) == 15
    assert set(evaluated) == trained
    # Each evaluation takes its own model's runs.
    for path in EVALS:
        model = path.stem.removeprefix("eval-")
        runs = [c.training_run for c in load_eval_config(path).candidates if c.training_run]
        assert all(str(run).startswith(f"{ROOT}/runs/paper/{model}-") for run in runs)


def test_the_dry_run_command_succeeds(offline, capsys):
    assert main(["eval", "--config", str(EVALS[0]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "evaluation of 6 model(s) on 12 benchmark(s)" in out
    assert "work: " in out
