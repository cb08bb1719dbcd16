"""Fine-tuning the stand-in generator on a real tiny build: the trained span, packing,
resuming after SIGKILL, and what a finished run leaves."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from unsafechain.cli import main
from unsafechain.domain.reasoning import split_reasoning
from unsafechain.training.checkpoints import RUN_STATE, TRAINER_STATE, last_checkpoint
from unsafechain.training.data import read_training_data
from unsafechain.training.engine import build_trainer, prepared_counts, run_training
from unsafechain.training.plan import plan_training
from unsafechain.training.settings import TrainingSettings

pytestmark = pytest.mark.integration

OPENED = "<think>\n"


@pytest.fixture
def build(training_build: Path) -> Path:
    return training_build


def _raw(standin_models, build: Path, folder: Path, **sections) -> dict:
    raw: dict = {
        "model": {"base": str(standin_models.generator)},
        "dataset": {"path": str(build), "subset": "full"},
        "training": {
            "epochs": 1,
            "learning_rate": 1e-3,
            "effective_batch_size": 4,
            "per_device_batch_size": 2,
            "max_length": 512,
        },
        "checkpoints": {"every_steps": 2},
        "logging": {"every_steps": 1},
        "hardware": {"device": "cpu", "cpu_threads": 1},
        "output": {"dir": str(folder)},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def _settings(standin_models, build: Path, folder: Path, **sections) -> TrainingSettings:
    return TrainingSettings.model_validate(_raw(standin_models, build, folder, **sections))


def test_the_label_mask_is_the_assistant_span_token_for_token_reasoning_included(
    standin_models, build, tmp_path
):
    settings = _settings(standin_models, build, tmp_path / "run")
    trainer = build_trainer(settings)
    rows = read_training_data(settings.dataset, "sft").rows
    # The model's own tokenizer and template, as inference uses them.
    own = AutoTokenizer.from_pretrained(standin_models.generator)
    assert len(trainer.train_dataset) == len(rows) > 10
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        prompt = own.apply_chat_template(
            row.messages()[:1], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        # The generation prompt opens the think section, so the opening tag is prompt:
        # the trained span starts inside the reasoning, where sampling starts.
        assert own.decode(prompt).endswith(f"<｜Assistant｜>{OPENED}")
        assert row.response.startswith(OPENED)
        span = own(row.response.removeprefix(OPENED) + own.eos_token, add_special_tokens=False)[
            "input_ids"
        ]
        assert example["input_ids"] == prompt + span
        assert example["labels"] == [-100] * len(prompt) + span
        trained = own.decode(span)
        parts = split_reasoning(row.response)
        assert trained.startswith(parts.reasoning)
        assert f"{parts.reasoning}\n</think>\n\n{parts.answer}<｜end▁of▁sentence｜>" == trained


def _loss_over_every_row(trainer) -> tuple[float, int]:
    trainer.model.eval()
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return loss.item(), int((batch["labels"] != -100).sum())


def test_the_packed_loss_equals_the_unpacked_one_on_the_same_rows(standin_models, build, tmp_path):
    padded = build_trainer(_settings(standin_models, build, tmp_path / "a"))
    packed = build_trainer(
        _settings(standin_models, build, tmp_path / "b", training={"packing": True})
    )
    assert "attention_mask" in padded.data_collator([padded.train_dataset[0]])
    collated = packed.data_collator([packed.train_dataset[0]])
    assert "attention_mask" not in collated and "position_ids" in collated
    assert len(packed.train_dataset) < len(padded.train_dataset)
    padded_loss, padded_tokens = _loss_over_every_row(padded)
    packed_loss, packed_tokens = _loss_over_every_row(packed)
    assert packed_tokens == padded_tokens > 0
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_dry_run_plan_counts_what_the_trainer_prepares(
    standin_models, build, tmp_path, packing
):
    settings = _settings(standin_models, build, tmp_path / "run", training={"packing": packing})
    plan = plan_training(settings)
    assert plan.counts == prepared_counts(build_trainer(settings), settings)
    assert plan.total_steps == plan.steps_per_epoch == -(-plan.counts.sequences // 4)


@pytest.mark.parametrize(
    ("relative", "subset", "kind"),
    [("datasets", "full", "datasets"), ("release/full.jsonl", None, "jsonl")],
)
def test_the_datasets_export_and_the_release_give_the_build_folders_rows(
    standin_models, build, tmp_path, relative, subset, kind
):
    folder = plan_training(_settings(standin_models, build, tmp_path / "run"))
    other = plan_training(
        _settings(
            standin_models,
            build,
            tmp_path / "run",
            dataset={"path": str(build / relative), "subset": subset},
        )
    )
    assert (other.data["kind"], other.data["subset"]) == (kind, "full")
    assert other.data["build_id"] == folder.data["build_id"] is not None
    assert other.counts == folder.counts


def test_the_dry_run_prints_the_plan_and_the_first_row_with_its_trained_span(
    standin_models, build, tmp_path, capsys
):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(standin_models, build, tmp_path / "run")))
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "rows read" in printed and "steps" in printed and "tokens" in printed
    first = json.loads((build / "subsets" / "full.jsonl").read_text().splitlines()[0])
    reasoning = split_reasoning(first["response"]).reasoning
    assert f"<｜Assistant｜>{OPENED}⟦{reasoning}\n</think>" in printed
    assert printed.rstrip().endswith("<｜end▁of▁sentence｜>⟧")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"subset": "test"}, "'test' is the build's held-out test split"),
        ({"path": "release/test.jsonl", "subset": None}, "held-out test split"),
    ],
)
def test_the_command_refuses_the_held_out_split(
    standin_models, build, tmp_path, capsys, dataset, message
):
    if "path" in dataset:
        dataset = {**dataset, "path": str(build / dataset["path"])}
    raw = _raw(standin_models, build, tmp_path / "run", dataset=dataset)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_a_finished_run_leaves_adapter_merged_model_tokenizer_record_card_and_curve(
    standin_models, build, tmp_path
):
    output = tmp_path / "run"
    settings = _settings(standin_models, build, output, output={"merge": True})
    seen: list[dict] = []
    result = run_training(settings, progress=False, on_metrics=seen.append)
    assert result.state == "succeeded"
    assert result.global_step == result.max_steps == 6
    assert [entry["step"] for entry in seen] == [1, 2, 3, 4, 5, 6]
    assert all(entry["tokens_per_second"] > 0 for entry in seen[1:])

    record = json.loads((output / "run.json").read_text())
    manifest = json.loads((build / "manifest.json").read_text())
    data = record["dataset"]
    assert (data["build_id"], data["config_fingerprint"]) == (
        manifest["build_id"],
        manifest["config_fingerprint"],
    )
    assert (data["subset"], data["rows"]) == ("full", manifest["subsets"]["full"])
    assert data["tokens"] > data["trained_tokens"] > 0
    hyper = record["hyperparameters"]
    assert (hyper["learning_rate"], hyper["gradient_accumulation_steps"], hyper["seed"]) == (
        1e-3,
        2,
        0,
    )
    assert hyper["lora"] == {
        "rank": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
    }
    assert record["trainer_arguments"]["learning_rate"] == 1e-3
    assert {"torch", "transformers", "trl", "peft", "accelerate"} <= set(record["libraries"])
    assert [e["step"] for e in record["metrics"]["history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert record["wall_seconds"] > 0
    assert record["chat_template"]["origin"] == "r1-distill"
    assert (output / "loss.png").read_bytes().startswith(b"\x89PNG")
    card = (output / "README.md").read_text()
    assert manifest["build_id"] in card and "loss.png" in card

    # The tokenizer carries the training template and fits the model's embeddings.
    tokenizer = AutoTokenizer.from_pretrained(output / "tokenizer")
    assert "{%- generation %}" in tokenizer.chat_template
    merged = AutoModelForCausalLM.from_pretrained(output / "merged").eval()
    assert merged.get_input_embeddings().num_embeddings == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(standin_models.generator).eval()
    inputs = tokenizer.apply_chat_template(
        read_training_data(settings.dataset, "sft").rows[0].messages(),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        base_logits = base(input_ids=inputs["input_ids"]).logits
        adapted = PeftModel.from_pretrained(base, output / "adapter").eval()
        adapter_logits = adapted(input_ids=inputs["input_ids"]).logits
        merged_logits = merged(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)

    # The same command on a finished run returns it without training again.
    again = run_training(settings, progress=False)
    assert (again.run_id, again.global_step) == (result.run_id, 6)
    assert len(json.loads((output / RUN_STATE).read_text())["sessions"]) == 1


def _whole_checkpoint(output: Path) -> Path | None:
    return next(output.glob(f"checkpoint-*/{TRAINER_STATE}"), None)


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(
    standin_models, build, tmp_path
):
    output = tmp_path / "run"
    raw = _raw(
        standin_models,
        build,
        output,
        training={"epochs": 20, "max_steps": 60, "per_device_batch_size": 1},
        checkpoints={"every_steps": 10, "keep": 3},
        logging={"every_steps": 5},
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "unsafechain.cli", "train", "--config", str(config)]
    command.append("--no-progress")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _whole_checkpoint(output) is None:
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    assert first.returncode == -signal.SIGKILL
    killed_at = last_checkpoint(output)
    assert killed_at is not None
    assert not (output / "run.json").exists()
    step = int(killed_at.name.removeprefix("checkpoint-"))
    assert 10 <= step < 60
    before = json.loads((killed_at / TRAINER_STATE).read_text())["log_history"]

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "resuming run" in second.stderr and killed_at.name in second.stderr
    assert re.search(r"step 60/60 epoch [\d.]+ loss [\d.]+ lr [\d.e-]+ tokens/s \d+", second.stderr)
    sessions = json.loads((output / RUN_STATE).read_text())["sessions"]
    assert [s["resumed_from"] for s in sessions] == [None, killed_at.name]
    assert "finished_at" not in sessions[0]
    assert (sessions[1]["start_step"], sessions[1]["end_step"]) == (step, 60)
    record = json.loads((output / "run.json").read_text())
    assert (record["resumed_from"], record["global_step"]) == (killed_at.name, 60)
    # The history loaded from the checkpoint continues: logged every 5 steps, once each.
    history = record["metrics"]["history"]
    assert history[: len(before)] == before
    logged = [e["step"] for e in history if "loss" in e]
    assert logged == [1, *range(5, 61, 5)]

    # Seeded: the resumed run trained exactly as an uninterrupted one.
    straight = run_training(
        TrainingSettings.model_validate({**raw, "output": {"dir": str(tmp_path / "straight")}}),
        progress=False,
    )
    losses = [e["loss"] for e in record["metrics"]["history"] if "loss" in e]
    expected = [e["loss"] for e in straight.record["metrics"]["history"] if "loss" in e]
    assert losses == pytest.approx(expected, rel=1e-4)


def test_sigterm_stops_the_command_at_the_next_step_with_a_checkpoint(
    standin_models, build, tmp_path
):
    output = tmp_path / "run"
    raw = _raw(
        standin_models,
        build,
        output,
        training={"epochs": 20, "max_steps": 200, "per_device_batch_size": 1},
        checkpoints={"every_steps": 1000},
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "unsafechain.cli", "train", "--config", str(config)]
    run = subprocess.Popen([*command, "--no-progress"], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (output / RUN_STATE).exists():
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 3, out
    stopped = last_checkpoint(output)
    assert stopped is not None and "run the same command to resume" in out
    assert f"stopped at step {stopped.name.removeprefix('checkpoint-')}/200" in out


def test_should_stop_ends_the_run_at_a_checkpoint_and_the_next_run_resumes_there(
    standin_models, build, tmp_path
):
    output = tmp_path / "run"
    settings = _settings(standin_models, build, output, checkpoints={"every_steps": 100})
    # Polled once per optimizer step: the third poll asks to stop.
    polls = iter([False, False, True])
    stopped = run_training(settings, progress=False, should_stop=lambda: next(polls))
    assert (stopped.state, stopped.global_step) == ("cancelled", 3)
    assert (output / "checkpoint-3" / TRAINER_STATE).is_file()
    assert not (output / "adapter").exists()
    resumed = run_training(settings, progress=False)
    assert (resumed.state, resumed.resumed_from, resumed.global_step) == (
        "succeeded",
        "checkpoint-3",
        6,
    )


def test_dpo_trains_on_the_builds_preference_pairs(standin_models, build, tmp_path):
    output = tmp_path / "run"
    settings = _settings(standin_models, build, output, objective="dpo", dataset={"subset": None})
    result = run_training(settings, progress=False)
    pairs = len((build / "pairs.jsonl").read_text().splitlines())
    assert result.state == "succeeded" and pairs > 0
    assert result.record["dataset"]["rows"] == pairs
    assert result.record["hyperparameters"]["dpo"] == {"beta": 0.1}
    assert (output / "adapter" / "adapter_config.json").is_file()


def test_full_fine_tuning_writes_the_whole_model(standin_models, build, tmp_path):
    output = tmp_path / "run"
    settings = _settings(standin_models, build, output, method="full", training={"max_steps": 2})
    result = run_training(settings, progress=False)
    assert result.record["model"]["trainable_parameters"] == result.record["model"]["parameters"]
    model = AutoModelForCausalLM.from_pretrained(output / "model")
    base = AutoModelForCausalLM.from_pretrained(standin_models.generator)
    changed = [
        name
        for (name, new), (_, old) in zip(
            model.state_dict().items(), base.state_dict().items(), strict=True
        )
        if not torch.equal(new, old)
    ]
    assert changed
