"""The plan of a run, computed without loading weights: ``unsafechain train --dry-run``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from unsafechain.domain.settings import SetupError
from unsafechain.training.data import read_training_data
from unsafechain.training.hardware import Hardware, gradient_accumulation, resolve_hardware
from unsafechain.training.preparation import (
    TokenCounts,
    count_dpo_pairs,
    count_sft_rows,
    load_training_tokenizer,
    trainable_parameters,
)
from unsafechain.training.settings import TrainingSettings
from unsafechain.training.templates import SPAN_END, SPAN_START, TrainingTemplate, mark_trained_span


@dataclass(frozen=True)
class TrainingPlan:
    """What a run would do, computed without loading weights.

    Attributes:
        settings: The validated settings.
        data: The dataset's provenance (``TrainingData.provenance``).
        template: The training chat template chosen.
        counts: Rows, sequences and tokens as the trainer prepares them.
        hardware: Device and precision.
        gradient_accumulation: Forward passes per optimizer step on one device.
        steps_per_epoch: Optimizer steps per epoch.
        total_steps: Optimizer steps of the run.
        parameters: The model's parameters (from its configuration).
        trainable_parameters: Those the run trains (LoRA: the adapter's).
        first_row: The first row as the model reads it, trained tokens between ⟦ and ⟧.
    """

    settings: TrainingSettings
    data: dict[str, Any]
    template: TrainingTemplate
    counts: TokenCounts
    hardware: Hardware
    gradient_accumulation: int
    steps_per_epoch: int
    total_steps: int
    parameters: int
    trainable_parameters: int
    first_row: str

    def describe(self) -> str:
        """The plan as the command line prints it."""
        s, c = self.settings, self.counts
        t = s.training
        unit = "pairs" if s.objective == "dpo" else "rows"
        method = (
            f"LoRA r={s.lora.rank} alpha={s.lora.alpha} dropout={s.lora.dropout} on "
            f"{', '.join(s.lora.target_modules)}"
            if s.method == "lora"
            else "full fine-tuning"
        )
        checkpoints = self.total_steps // s.checkpoints.every_steps
        lines = [
            f"model      {s.model.base} (quantization {s.model.quantization}, "
            f"{self.parameters:,} parameters, {self.trainable_parameters:,} trained)",
            f"objective  {s.objective.upper()}, {method}",
            f"dataset    {self.data['path']} ({self.data['kind']}), subset {self.data['subset']}, "
            f"build {self.data['build_id']} (config {self.data['config_fingerprint']})",
            f"data       {self.data['rows']} {unit} read, {c.rows} trained "
            f"({self.data['rows'] - c.rows} left without a trained token at max length "
            f"{t.max_length}); {c.sequences} sequences"
            + (" (packed, best-fit decreasing)" if t.packing else ""),
            f"tokens     {c.tokens:,} in the sequences, {c.trained_tokens:,} trained",
            f"batches    {t.effective_batch_size} sequences per step = "
            f"{t.per_device_batch_size} per device x {self.gradient_accumulation} accumulation "
            f"x {self.hardware.devices} devices",
            f"steps      {self.steps_per_epoch} per epoch, {self.total_steps} in all"
            + (f" (max_steps {t.max_steps})" if t.max_steps else f" ({t.epochs:g} epochs)"),
            f"schedule   lr {t.learning_rate:g}, {t.lr_scheduler}, warm-up ratio "
            f"{t.warmup_ratio:g}; seed {t.seed}",
            f"hardware   {'cpu' if self.hardware.use_cpu else 'cuda'}, {self.hardware.precision}, "
            f"weights {str(self.hardware.dtype).removeprefix('torch.')}",
            f"output     {s.output.dir}: a checkpoint every {s.checkpoints.every_steps} steps "
            f"({checkpoints} in the run), keep {s.checkpoints.keep or 'all'}",
            f"template   {self.template.describe()}",
            "",
            f"first row, the trained tokens between {SPAN_START} and {SPAN_END}:",
            self.first_row,
        ]
        return "\n".join(lines)


def optimizer_steps(
    sequences: int, settings: TrainingSettings, accumulation: int, devices: int
) -> tuple[int, int]:
    """Optimizer steps per epoch and in all, as the trainer counts them."""
    per_device = math.ceil(sequences / devices)
    batches = math.ceil(per_device / settings.training.per_device_batch_size)
    per_epoch = max(math.ceil(batches / accumulation), 1)
    if settings.training.max_steps:
        return per_epoch, settings.training.max_steps
    return per_epoch, math.ceil(settings.training.epochs * per_epoch)


def meta_model(settings: TrainingSettings) -> torch.nn.Module:
    """The model's architecture on the meta device: its modules, no weights."""
    try:
        config = AutoConfig.from_pretrained(settings.model.base, revision=settings.model.revision)
    except (OSError, ValueError) as error:
        raise SetupError(
            f"model.base: cannot load the configuration of {settings.model.base}: {error}"
        ) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan_training(settings: TrainingSettings) -> TrainingPlan:
    """Validate ``settings`` against the model and the data, and compute the plan.

    Loads the tokenizer and the model's configuration, never its weights.

    Raises:
        SetupError: The settings cannot run here (a missing GPU, a bad template, LoRA
            modules the model lacks, a dataset that is the test split …).
    """
    hardware = resolve_hardware(settings)
    accumulation = gradient_accumulation(settings, hardware)
    data = read_training_data(settings.dataset, settings.objective)
    tokenizer, template = load_training_tokenizer(settings)
    model = meta_model(settings)
    trainable = trainable_parameters(model, settings)
    parameters = sum(p.numel() for p in model.parameters())
    if settings.objective == "dpo":
        counts = count_dpo_pairs(tokenizer, data, settings.training.max_length)
        first = [
            {"role": "user", "content": data.pairs[0].prompt},
            {"role": "assistant", "content": data.pairs[0].chosen},
        ]
    else:
        counts = count_sft_rows(tokenizer, data, settings)
        first = data.rows[0].messages()
    per_epoch, total = optimizer_steps(counts.sequences, settings, accumulation, hardware.devices)
    return TrainingPlan(
        settings=settings,
        data=data.provenance(),
        template=template,
        counts=counts,
        hardware=hardware,
        gradient_accumulation=accumulation,
        steps_per_epoch=per_epoch,
        total_steps=total,
        parameters=parameters,
        trainable_parameters=trainable,
        first_row=mark_trained_span(tokenizer, first, max_length=settings.training.max_length),
    )
