"""The training engine: one fine-tuning run in this process, with TRL over peft and
accelerate.

:func:`run_training` is what the command line (``unsafechain train``) and the training
service call (:func:`~unsafechain.training.plan.plan_training` validates settings and
computes the plan without loading weights, for ``--dry-run``). Neither knows about
gRPC: a service maps its ``TrainingSpec`` to
:class:`~unsafechain.training.settings.TrainingSettings`, passes ``should_stop`` to
cancel and ``on_metrics`` to follow the run.

The output folder (``output.dir``):

    checkpoint-<step>/   trainer checkpoints (the latest ``checkpoints.keep``)
    tokenizer/           the tokenizer with the training chat template
    adapter/             LoRA: the adapter (and the tokenizer)
    merged/              LoRA with ``output.merge``: the base with the adapter merged in
    model/               full fine-tuning: the model (and the tokenizer)
    run.json             the run record: data, every hyperparameter, versions, metrics
    README.md            the model card
    loss.png             the loss curve
    run-state.json       the run's identity and sessions, for resuming
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from unsafechain.domain.settings import SetupError
from unsafechain.training.checkpoints import RunFolder, last_checkpoint, now
from unsafechain.training.data import TrainingData, read_training_data
from unsafechain.training.hardware import Hardware, gradient_accumulation, resolve_hardware
from unsafechain.training.preparation import (
    TokenCounts,
    dpo_counts,
    dpo_dataset,
    load_training_tokenizer,
    sft_counts,
    sft_dataset,
    trainable_parameters,
)
from unsafechain.training.record import (
    LOSS_CURVE,
    MODEL_CARD,
    RUN_RECORD,
    library_versions,
    plot_loss,
    write_json,
    write_model_card,
)
from unsafechain.training.settings import TrainingSettings

logger = logging.getLogger(__name__)

TOKENIZER_DIR, ADAPTER_DIR, MERGED_DIR, MODEL_DIR = "tokenizer", "adapter", "merged", "model"

RunState = Literal["succeeded", "cancelled"]
"""How a run ended: every step done, or stopped by ``should_stop`` at a checkpoint
(running it again resumes there)."""


class TrainingError(RuntimeError):
    """The run failed after it started; the message says where."""


@dataclass(frozen=True)
class TrainingResult:
    """How a run ended and what it left.

    Attributes:
        run_id: The run's identity, kept across resumes.
        state: ``succeeded`` or ``cancelled``.
        output_dir: The run's folder.
        global_step: Optimizer steps done.
        max_steps: Optimizer steps of the whole run.
        resumed_from: The checkpoint this session resumed from, if any.
        final_loss: The last logged training loss.
        record: The run record (``run.json``).
    """

    run_id: str
    state: RunState
    output_dir: Path
    global_step: int
    max_steps: int
    resumed_from: str | None
    final_loss: float | None
    record: dict[str, Any] = field(repr=False)


class _RunCallback(TrainerCallback):
    """Log lines (loss, learning rate, tokens/s), ``on_metrics`` and ``should_stop``."""

    def __init__(
        self,
        should_stop: Callable[[], bool] | None,
        on_metrics: Callable[[dict], None] | None,
    ):
        self.should_stop = should_stop
        self.on_metrics = on_metrics
        self.cancelled = False
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if self.should_stop is not None and self.should_stop():
            logger.info("stop requested at step %d: saving a checkpoint", state.global_step)
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = True

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        clock, seen = time.perf_counter(), state.num_input_tokens_seen
        rate = None
        if self._last is not None and clock > self._last[0]:
            rate = (seen - self._last[1]) / (clock - self._last[0])
        self._last = (clock, seen)
        # The history entry the trainer just appended; it travels in the checkpoints.
        entry = state.log_history[-1]
        if rate is not None:
            entry["tokens_per_second"] = round(rate, 1)
        logger.info(
            "step %d/%d epoch %.2f loss %.4f lr %.3g tokens/s %s",
            state.global_step,
            state.max_steps,
            logs.get("epoch", 0.0),
            logs["loss"],
            logs.get("learning_rate", 0.0),
            f"{rate:.0f}" if rate is not None else "-",
        )
        if self.on_metrics is not None:
            self.on_metrics({**entry, "max_steps": state.max_steps})


class _ProgressBar(ProgressCallback):
    """The trainer's progress bar, without its printing of every log dict (the log
    lines say it)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


def _trainer_arguments(
    settings: TrainingSettings,
    hardware: Hardware,
    accumulation: int,
    *,
    progress: bool,
) -> TrainingArguments:
    """The TRL configuration of the run: every hyperparameter from the settings."""
    t, c = settings.training, settings.checkpoints
    common: dict[str, Any] = {
        "output_dir": str(settings.output.dir),
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps or -1,
        "learning_rate": t.learning_rate,
        "per_device_train_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": accumulation,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "activation_checkpointing": t.gradient_checkpointing,
        "seed": t.seed,
        "data_seed": t.seed,
        "max_length": t.max_length,
        "save_strategy": "steps",
        "save_steps": c.every_steps,
        "save_total_limit": c.keep,
        "logging_strategy": "steps",
        "logging_steps": settings.logging.every_steps,
        "logging_first_step": True,
        "include_num_input_tokens_seen": "non_padding",
        "report_to": [],
        "disable_tqdm": not progress,
        "use_cpu": hardware.use_cpu,
        "bf16": hardware.precision == "bf16",
        "fp16": hardware.precision == "fp16",
        "dataloader_num_workers": 0,
    }
    if settings.objective == "dpo":
        return DPOConfig(**common, beta=settings.dpo.beta)
    return SFTConfig(
        **common,
        assistant_only_loss=True,
        packing=t.packing,
        packing_strategy="bfd",
    )


def _load_model(settings: TrainingSettings, hardware: Hardware, vocabulary: int) -> PreTrainedModel:
    """The base model, its embeddings sized to the tokenizer as it reloads."""
    options: dict[str, Any] = {"dtype": hardware.dtype, "revision": settings.model.revision}
    if settings.model.quantization != "none":
        compute = torch.bfloat16 if hardware.precision == "bf16" else torch.float16
        options["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if settings.model.quantization == "8bit"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(settings.model.base, **options)
    except (OSError, ValueError) as error:
        raise SetupError(f"model.base: cannot load {settings.model.base}: {error}") from None
    embeddings: Any = model.get_input_embeddings()
    rows = int(embeddings.num_embeddings)
    if vocabulary > rows:
        # A tokenizer that gained tokens as it reloaded (transformers may rebuild it).
        logger.warning(
            "resizing the embeddings from %d to the tokenizer's %d tokens", rows, vocabulary
        )
        model.resize_token_embeddings(vocabulary)
    if settings.model.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.training.gradient_checkpointing
        )
    return model


def _peft_config(settings: TrainingSettings) -> LoraConfig | None:
    if settings.method != "lora":
        return None
    lora = settings.lora
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def build_trainer(
    settings: TrainingSettings,
    *,
    progress: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    tokenizer: Any = None,
    data: TrainingData | None = None,
) -> Any:
    """The TRL trainer of a run, its data prepared, nothing trained yet.

    Args:
        settings: The run.
        progress: Show the progress bar.
        callbacks: More trainer callbacks.
        tokenizer: The tokenizer with the training template (default: the model's, with
            the template chosen for it).
        data: The rows (default: read from ``settings.dataset``).
    """
    hardware = resolve_hardware(settings)
    accumulation = gradient_accumulation(settings, hardware)
    if data is None:
        data = read_training_data(settings.dataset, settings.objective)
    if tokenizer is None:
        tokenizer, _ = load_training_tokenizer(settings)
    model = _load_model(settings, hardware, len(tokenizer))
    trainable_parameters(model, settings)
    arguments = _trainer_arguments(settings, hardware, accumulation, progress=progress)
    common: dict[str, Any] = {
        "model": model,
        "args": arguments,
        "processing_class": tokenizer,
        "peft_config": _peft_config(settings),
        "callbacks": callbacks,
    }
    trainer: Any
    if settings.objective == "dpo":
        trainer = DPOTrainer(train_dataset=dpo_dataset(data), **common)
    else:
        trainer = SFTTrainer(train_dataset=sft_dataset(data), **common)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_ProgressBar)
    return trainer


def prepared_counts(trainer: Any, settings: TrainingSettings) -> TokenCounts:
    """Rows, sequences and tokens of the data as ``trainer`` prepared it."""
    if settings.objective == "dpo":
        return dpo_counts(trainer.train_dataset, settings.training.max_length)
    dataset = trainer.train_dataset
    rows = (
        sum(len(lengths) for lengths in dataset["seq_lengths"])
        if "seq_lengths" in dataset.column_names
        else len(dataset)
    )
    return sft_counts(rows, dataset)


def run_training(
    settings: TrainingSettings,
    *,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_metrics: Callable[[dict], None] | None = None,
) -> TrainingResult:
    """Run (or resume) one fine-tuning run in this process.

    A folder that already holds this run (same settings and data) resumes from its
    latest whole checkpoint; a finished one is returned as it is.

    Args:
        settings: The run.
        progress: Show a progress bar.
        should_stop: Polled after every optimizer step; True saves a checkpoint and ends
            the run as ``cancelled`` (running it again resumes).
        on_metrics: Called with each logged metrics entry (``step``, ``loss``,
            ``learning_rate``, ``tokens_per_second``, ``epoch``, ``max_steps`` …).

    Raises:
        SetupError: The settings cannot run here: the dataset cannot be trained on
            (``DatasetError``), the chat template fails its checks (``TemplateError``),
            the output folder holds another run (``RunFolderError``) …
        TrainingError: Training failed.
    """
    with _torch_threads(settings.hardware.cpu_threads):
        return _run(settings, progress=progress, should_stop=should_stop, on_metrics=on_metrics)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` for the run, and given back after it (the
    setting is process-wide, and a service runs more than one run)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(
    settings: TrainingSettings,
    *,
    progress: bool,
    should_stop: Callable[[], bool] | None,
    on_metrics: Callable[[dict], None] | None,
) -> TrainingResult:
    started = time.perf_counter()
    hardware = resolve_hardware(settings)
    data = read_training_data(settings.dataset, settings.objective)
    output = settings.output.dir
    folder = RunFolder.claim(output, settings.fingerprint(), data.fingerprint())
    finished = _finished_record(output, folder.run_id)
    if finished is not None:
        logger.info("run %s in %s is already finished", folder.run_id, output)
        return _result(finished)
    tokenizer, template = load_training_tokenizer(settings)
    # Train with the tokenizer as it reloads from the output, so that what is trained
    # is what is saved (a tokenizer can gain a token on reload).
    tokenizer.save_pretrained(output / TOKENIZER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(output / TOKENIZER_DIR)
    callback = _RunCallback(should_stop, on_metrics)
    trainer = build_trainer(
        settings, progress=progress, callbacks=[callback], tokenizer=tokenizer, data=data
    )
    counts = prepared_counts(trainer, settings)
    # Counted before training: merging the adapter at the end removes it from the model.
    parameters = {
        "parameters": trainer.model.num_parameters(),
        "trainable_parameters": trainer.model.num_parameters(only_trainable=True),
    }
    if counts.rows < len(data):
        logger.warning(
            "%d of %d rows have no trained token left at max_length %d and are left out",
            len(data) - counts.rows,
            len(data),
            settings.training.max_length,
        )
    resume = last_checkpoint(output)
    session = folder.start_session(resume)
    if resume is not None:
        logger.info("resuming run %s from %s", folder.run_id, resume)
    else:
        logger.info("starting run %s in %s", folder.run_id, output)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except KeyboardInterrupt:
        folder.end_session(
            session,
            state="interrupted",
            step=trainer.state.global_step,
            seconds=time.perf_counter() - started,
        )
        raise
    except Exception as error:
        folder.end_session(
            session,
            state="failed",
            step=trainer.state.global_step,
            seconds=time.perf_counter() - started,
        )
        raise TrainingError(
            f"training failed at step {trainer.state.global_step}: {error}"
        ) from error
    state: RunState = "cancelled" if callback.cancelled else "succeeded"
    outputs = {"tokenizer": TOKENIZER_DIR}
    if state == "succeeded":
        outputs |= _save_model(trainer, settings, tokenizer)
    seconds = time.perf_counter() - started
    folder.end_session(session, state=state, step=trainer.state.global_step, seconds=seconds)
    record = {
        "run_id": folder.run_id,
        "state": state,
        "output_dir": str(output),
        "finished_at": now(),
        "wall_seconds": round(seconds, 2),
        "sessions": folder.sessions,
        "resumed_from": resume.name if resume else None,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epoch": trainer.state.epoch,
        "dataset": {**data.provenance(), **_counts_record(counts)},
        "model": {
            "base": settings.model.base,
            "revision": settings.model.revision,
            "quantization": settings.model.quantization,
            "dtype": str(hardware.dtype).removeprefix("torch."),
            **parameters,
        },
        "chat_template": template.record(),
        "hyperparameters": _hyperparameters(settings, hardware, trainer.args),
        "trainer_arguments": _jsonable(trainer.args.to_dict()),
        "settings": settings.model_dump(mode="json"),
        "settings_fingerprint": settings.fingerprint(),
        "libraries": library_versions(),
        "metrics": {
            "history": trainer.state.log_history,
            "final": _final(trainer.state.log_history),
        },
        "outputs": outputs,
    }
    write_json(output / RUN_RECORD, record)
    if state == "succeeded":
        title = (
            f"{Path(settings.model.base).name}: {settings.objective.upper()} "
            f"{settings.method}, run {folder.run_id}"
        )
        plot_loss(
            output / LOSS_CURVE,
            trainer.state.log_history,
            title=title,
            loss_label=(
                "DPO loss (chosen over rejected)"
                if settings.objective == "dpo"
                else "training loss (assistant tokens)"
            ),
            resumed_at=tuple(s["start_step"] for s in folder.sessions if s["resumed_from"]),
        )
        write_model_card(output / MODEL_CARD, record)
        logger.info("run %s finished: %s", folder.run_id, output)
    return _result(record)


def _save_model(trainer: Any, settings: TrainingSettings, tokenizer: Any) -> dict[str, str]:
    """Write the adapter (and the merged model) or the full model, with the tokenizer."""
    output = settings.output.dir
    if settings.method == "full":
        trainer.save_model(str(output / MODEL_DIR))
        tokenizer.save_pretrained(output / MODEL_DIR)
        return {"model": MODEL_DIR}
    model = trainer.model
    model.save_pretrained(output / ADAPTER_DIR)
    tokenizer.save_pretrained(output / ADAPTER_DIR)
    saved = {"adapter": ADAPTER_DIR}
    if settings.output.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(output / MERGED_DIR)
        tokenizer.save_pretrained(output / MERGED_DIR)
        saved["merged"] = MERGED_DIR
    return saved


def _counts_record(counts: TokenCounts) -> dict[str, int]:
    return {
        "rows_trained": counts.rows,
        "sequences": counts.sequences,
        "tokens": counts.tokens,
        "trained_tokens": counts.trained_tokens,
    }


def _hyperparameters(settings: TrainingSettings, hardware: Hardware, args: Any) -> dict[str, Any]:
    t = settings.training
    return {
        "objective": settings.objective,
        "method": settings.method,
        **({"lora": settings.lora.model_dump(mode="json")} if settings.method == "lora" else {}),
        **({"dpo": settings.dpo.model_dump(mode="json")} if settings.objective == "dpo" else {}),
        "epochs": t.epochs,
        "max_steps": t.max_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler": t.lr_scheduler,
        "warmup_ratio": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "effective_batch_size": t.effective_batch_size,
        "per_device_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "devices": hardware.devices,
        "max_length": t.max_length,
        "packing": t.packing,
        "gradient_checkpointing": t.gradient_checkpointing,
        "optimizer": getattr(args.optim, "value", str(args.optim)),
        "precision": hardware.precision,
        "seed": t.seed,
        "checkpoint_every_steps": settings.checkpoints.every_steps,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _final(history: list[dict]) -> dict[str, Any]:
    losses = [entry for entry in history if "loss" in entry]
    summary: dict[str, Any] = next(
        (entry for entry in reversed(history) if "train_runtime" in entry), {}
    )
    return {**(losses[-1] if losses else {}), **summary}


def _finished_record(output: Path, run_id: str) -> dict | None:
    path = output / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("run_id") == run_id and record.get("state") == "succeeded":
        return record
    return None


def _result(record: dict[str, Any]) -> TrainingResult:
    losses = [entry["loss"] for entry in record["metrics"]["history"] if "loss" in entry]
    return TrainingResult(
        run_id=record["run_id"],
        state=record["state"],
        output_dir=Path(record["output_dir"]),
        global_step=record["global_step"],
        max_steps=record["max_steps"],
        resumed_from=record["resumed_from"],
        final_loss=float(losses[-1]) if losses else None,
        record=record,
    )
