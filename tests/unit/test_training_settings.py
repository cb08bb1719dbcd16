"""The run configuration: validation, the reference recipes, hardware and the run folder."""

from pathlib import Path

import pytest
import yaml

from unsafechain.domain.settings import ConfigError, SetupError
from unsafechain.training.checkpoints import RunFolder, RunFolderError, last_checkpoint
from unsafechain.training.hardware import resolve_hardware
from unsafechain.training.settings import TrainingSettings, load_training_settings

ROOT = Path(__file__).parents[2]
RECIPES = sorted((ROOT / "configs" / "training").glob("*.yaml"))


def _settings(**sections) -> TrainingSettings:
    raw = {"model": {"base": "m"}, "dataset": {"path": "d"}, "output": {"dir": "o"}, **sections}
    return TrainingSettings.model_validate(raw)


def _write(tmp_path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_test_split_is_refused_by_name(tmp_path):
    path = _write(
        tmp_path,
        {
            "model": {"base": "m"},
            "dataset": {"path": "d", "subset": "test"},
            "output": {"dir": "o"},
        },
    )
    with pytest.raises(ConfigError, match=r"dataset\.subset: 'test' is the build's held-out test"):
        load_training_settings(path)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"method": "full", "model": {"base": "m", "quantization": "8bit"}}, "cannot be fully"),
        ({"method": "full", "output": {"dir": "o", "merge": True}}, "only a LoRA adapter"),
        ({"objective": "dpo", "training": {"packing": True}}, "packing applies to sft"),
        (
            {"training": {"effective_batch_size": 8, "per_device_batch_size": 3}},
            "not a multiple of per_device_batch_size 3",
        ),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"training": {"lr": 1e-5}}, "training.lr: Extra inputs are not permitted"),
    ],
)
def test_inconsistent_settings_are_refused_with_the_key(tmp_path, sections, message):
    raw = {"model": {"base": "m"}, "dataset": {"path": "d"}, "output": {"dir": "o"}, **sections}
    with pytest.raises(ConfigError, match=message):
        load_training_settings(_write(tmp_path, raw))


def test_the_fingerprint_ignores_the_output_and_logging_but_not_the_hyperparameters():
    base = _settings()
    assert _settings(output={"dir": "elsewhere", "merge": True}).fingerprint() == base.fingerprint()
    assert _settings(logging={"every_steps": 1}).fingerprint() == base.fingerprint()
    assert _settings(training={"learning_rate": 2e-5}).fingerprint() != base.fingerprint()


def test_the_reference_recipes_are_the_papers():
    assert len(RECIPES) == 6
    recipes = {path.stem: load_training_settings(path) for path in RECIPES}
    models = {
        "qwen-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        "qwen-7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        "llama-8b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    }
    for short, name in models.items():
        lora = recipes[f"r1-distill-{short}-lora"]
        assert lora.model.base == name and lora.method == "lora" and lora.objective == "sft"
        assert lora.model.quantization == "8bit"
        assert (lora.lora.rank, lora.lora.alpha, lora.lora.dropout) == (16, 32, 0.05)
        assert lora.lora.target_modules == ("q_proj", "v_proj")
        t = lora.training
        assert (t.epochs, t.learning_rate, t.effective_batch_size, t.max_length) == (
            2,
            1e-5,
            8,
            2048,
        )
        full = recipes[f"r1-distill-{short}-full-star1"]
        assert full.model.base == name and full.method == "full"
        t = full.training
        assert (t.epochs, t.learning_rate, t.effective_batch_size, t.max_length) == (
            5,
            1e-5,
            128,
            8192,
        )
        assert (t.lr_scheduler, t.warmup_ratio) == ("cosine", 0.05)


def test_8_bit_loading_is_refused_without_bitsandbytes_and_a_gpu():
    settings = _settings(model={"base": "m", "quantization": "8bit"}, hardware={"device": "cpu"})
    with pytest.raises(SetupError, match="8bit loading needs bitsandbytes and a CUDA GPU"):
        resolve_hardware(settings)


def test_the_cpu_runs_fp32_and_refuses_mixed_precision():
    assert resolve_hardware(_settings(hardware={"device": "cpu"})).precision == "fp32"
    with pytest.raises(SetupError, match="bf16 needs a GPU"):
        resolve_hardware(_settings(hardware={"device": "cpu", "precision": "bf16"}))


def test_a_run_folder_holding_another_run_is_refused(tmp_path):
    folder = RunFolder.claim(tmp_path, "settings-a", "data-a")
    folder.start_session(None)
    again = RunFolder.claim(tmp_path, "settings-a", "data-a")
    assert again.run_id == folder.run_id and len(again.sessions) == 1
    with pytest.raises(RunFolderError, match="other settings"):
        RunFolder.claim(tmp_path, "settings-b", "data-a")
    with pytest.raises(RunFolderError, match="other data"):
        RunFolder.claim(tmp_path, "settings-a", "data-b")


def test_a_checkpoint_cut_short_by_a_kill_is_passed_over(tmp_path):
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(
            f'{{"global_step": {step}}}'
        )
    (tmp_path / "checkpoint-15").mkdir()
    (tmp_path / "checkpoint-15" / "trainer_state.json").write_text('{"global_st')
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
