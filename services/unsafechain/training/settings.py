"""The settings of a fine-tuning run: the schema of ``unsafechain train --config FILE``.

One frozen model holds everything a run needs, so that a run is described once: the
command line reads it from YAML, and the training service maps its ``TrainingSpec``
onto it (``base_model`` → ``model.base``, ``dataset_uri`` → ``dataset.path``,
``method`` → ``method``, ``lora`` → ``lora``, ``epochs``, ``learning_rate``,
``effective_batch_size``, ``max_length`` and ``seed`` → ``training.*``,
``output_uri`` → ``output.dir``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from unsafechain.domain.settings import StrictModel, load_config_file

TEST_SPLIT = "test"
"""The build's held-out split: never trained on."""

Objective = Literal["sft", "dpo"]
"""``sft``: supervised fine-tuning on the rows; ``dpo``: preference optimisation on the
build's ``pairs.jsonl`` (chosen = the correction, rejected = the unsafe original)."""

Method = Literal["lora", "full"]
"""Which weights change: a LoRA adapter, or every weight."""


class ModelSettings(StrictModel):
    """The model to fine-tune.

    Attributes:
        base: A local folder (``save_pretrained`` layout) or a Hub name; a Hub name
            needs a network or a filled Hugging Face cache.
        revision: Hub revision (branch, tag or commit) of ``base``.
        quantization: ``8bit`` or ``4bit`` loads the frozen base through bitsandbytes
            for LoRA (the reference LoRA recipe loads in 8-bit); needs bitsandbytes and a
            CUDA GPU, and is refused where they are missing.
        dtype: Weights dtype at load; ``auto``: bfloat16 on a GPU with bf16 precision,
            else float32.
        chat_template: A Jinja file with the training chat template to use instead of
            the one derived from the model's own (see ``unsafechain.training.templates``).
    """

    base: Annotated[str, Field(min_length=1)]
    revision: str | None = None
    quantization: Literal["none", "8bit", "4bit"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: Path | None = None


class DatasetSettings(StrictModel):
    """The dataset a build wrote.

    Attributes:
        path: The build's output folder, its ``datasets/`` export, a JSONL file of rows
            with ``prompt`` and ``response`` (``release/<name>.jsonl``,
            ``subsets/<name>.jsonl``), or for DPO ``pairs.jsonl`` (a build folder gives
            its ``pairs.jsonl``).
        subset: ``full``, ``random`` or ``selected`` of a build folder or ``datasets/``
            export (default ``full``); a file is its own subset. ``test``, the held-out
            split, is refused.
    """

    path: Path
    subset: str | None = None

    @field_validator("subset")
    @classmethod
    def _never_the_test_split(cls, subset: str | None) -> str | None:
        if subset == TEST_SPLIT:
            raise ValueError(
                "'test' is the build's held-out test split and is never trained on; "
                "choose full, random or selected"
            )
        return subset


class LoraSettings(StrictModel):
    """The LoRA adapter (``method: lora``).

    Attributes:
        rank: Rank r of the update matrices.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter's input.
        target_modules: Names of the linear modules adapted, e.g. ``q_proj``, ``v_proj``.
    """

    rank: Annotated[int, Field(ge=1)] = 16
    alpha: Annotated[int, Field(ge=1)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = ("q_proj", "v_proj")


class DpoSettings(StrictModel):
    """Preference optimisation (``objective: dpo``).

    Attributes:
        beta: Strength of the pull towards the reference model (the base).
    """

    beta: Annotated[float, Field(gt=0)] = 0.1


class OptimizationSettings(StrictModel):
    """The training hyperparameters.

    Attributes:
        epochs: Passes over the data (fractions allowed).
        max_steps: Stop after this many optimizer steps instead; for smoke runs.
        learning_rate: Peak learning rate.
        effective_batch_size: Sequences per optimizer step, over every device:
            ``per_device_batch_size`` x gradient accumulation x devices. With packing a
            sequence is a packed block of up to ``max_length`` tokens.
        per_device_batch_size: Sequences per forward pass on one device.
        max_length: Tokens per sequence; longer rows are cut at the end.
        lr_scheduler: Learning-rate schedule after the warm-up.
        warmup_ratio: Share of the steps spent warming up linearly.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping norm.
        packing: Pack rows into blocks of ``max_length`` tokens (best-fit decreasing,
            padding-free, each row attending only to itself); SFT only.
        gradient_checkpointing: Recompute activations in the backward pass, trading
            time for memory.
        seed: Seeds the adapter's initialisation, dropout and the data order.
    """

    epochs: Annotated[float, Field(gt=0)] = 2
    max_steps: Annotated[int, Field(ge=1)] | None = None
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    effective_batch_size: Annotated[int, Field(ge=1)] = 8
    per_device_batch_size: Annotated[int, Field(ge=1)] = 1
    max_length: Annotated[int, Field(ge=8)] = 2048
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    packing: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _whole_accumulation(self) -> OptimizationSettings:
        if self.effective_batch_size % self.per_device_batch_size:
            raise ValueError(
                f"effective_batch_size: {self.effective_batch_size} is not a multiple of "
                f"per_device_batch_size {self.per_device_batch_size}"
            )
        return self


class CheckpointSettings(StrictModel):
    """Checkpoints, from which a run that was stopped or killed resumes.

    Attributes:
        every_steps: Save a checkpoint every this many optimizer steps.
        keep: Keep only the latest this many checkpoints (None: all).
    """

    every_steps: Annotated[int, Field(ge=1)] = 100
    keep: Annotated[int, Field(ge=1)] | None = 2


class LoggingSettings(StrictModel):
    """Periodic log lines (loss, learning rate, tokens/s) and the metrics history.

    Attributes:
        every_steps: Log every this many optimizer steps.
    """

    every_steps: Annotated[int, Field(ge=1)] = 10


class HardwareSettings(StrictModel):
    """Where and in which precision the run computes.

    Attributes:
        device: ``auto``: a CUDA GPU where there is one, else the CPU.
        precision: ``auto``: bf16 mixed precision on a GPU that supports it, else fp32.
            The CPU runs fp32.
        cpu_threads: torch threads on the CPU (None: torch's default). One thread is
            fastest for tiny models on a shared machine.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cpu_threads: Annotated[int, Field(ge=1)] | None = None


class OutputSettings(StrictModel):
    """Where the run writes.

    Attributes:
        dir: The run's folder: checkpoints, the adapter (or the model), the tokenizer
            with the training template, ``run.json``, ``README.md`` and ``loss.png``.
            Starting a run again on the same folder resumes it.
        merge: With LoRA, also write the base model with the adapter merged in
            (``merged/``).
    """

    dir: Path
    merge: bool = False


class TrainingSettings(StrictModel):
    """Everything one fine-tuning run needs.

    Attributes:
        model: The model to fine-tune.
        dataset: The dataset a build wrote, and which subset.
        objective: ``sft`` or ``dpo``.
        method: ``lora`` or ``full``.
        lora: The adapter, for ``method: lora``.
        dpo: Preference optimisation, for ``objective: dpo``.
        training: The hyperparameters.
        checkpoints: Checkpoint interval and retention.
        logging: Log interval.
        hardware: Device, precision, CPU threads.
        output: The run's folder.
    """

    model: ModelSettings
    dataset: DatasetSettings
    objective: Objective = "sft"
    method: Method = "lora"
    lora: LoraSettings = LoraSettings()
    dpo: DpoSettings = DpoSettings()
    training: OptimizationSettings = OptimizationSettings()
    checkpoints: CheckpointSettings = CheckpointSettings()
    logging: LoggingSettings = LoggingSettings()
    hardware: HardwareSettings = HardwareSettings()
    output: OutputSettings

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSettings:
        if self.model.quantization != "none" and self.method != "lora":
            raise ValueError(
                f"model.quantization: a {self.model.quantization} base cannot be fully "
                "fine-tuned; use method: lora"
            )
        if self.output.merge and self.method != "lora":
            raise ValueError("output.merge: only a LoRA adapter is merged; method is full")
        if self.training.packing and self.objective != "sft":
            raise ValueError("training.packing: packing applies to sft, not dpo")
        return self

    def fingerprint(self) -> str:
        """Identifies what the run computes: a run resumes only on settings with the same
        fingerprint. The output folder, logging and CPU threads do not count, nor
        whether the adapter is also merged."""
        content = self.model_dump(
            mode="json", exclude={"output": True, "logging": True, "hardware": {"cpu_threads"}}
        )
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_training_settings(
    path: str | Path, overrides: dict[str, object] | None = None
) -> TrainingSettings:
    """Read and validate a run configuration (YAML).

    Args:
        path: The file.
        overrides: Dotted keys to set after reading, e.g. ``{"output.dir": "x"}``.

    Raises:
        ConfigError: The file is missing or invalid; the message names the key.
    """
    return load_config_file(path, TrainingSettings, overrides)
