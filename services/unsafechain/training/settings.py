"""The settings of a fine-tuning run: the schema of ``unsafechain train --config FILE``.

One frozen model holds everything a run needs, so that a run is described once: the
command line reads it from YAML, and the training service maps its ``TrainingSpec``
onto it (``base_model`` → ``model.base``, ``dataset_uri`` → ``dataset.path``,
``method`` → ``method``, ``lora`` → ``lora``, ``epochs``, ``learning_rate``,
``effective_batch_size``, ``max_length`` and ``seed`` → ``training.*``,
``output_uri`` → ``output.dir``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from unsafechain.domain.settings import (
    ConfigPath,
    StrictModel,
    load_config_file,
    load_config_text,
    path_or_hub_name,
)
from unsafechain.runtime.settings import ServerSettings, add_server_arguments, flag

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

    base: Annotated[str, BeforeValidator(path_or_hub_name), Field(min_length=1)]
    revision: str | None = None
    quantization: Literal["none", "8bit", "4bit"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: ConfigPath | None = None


DatasetLayout = Literal["unsafechain", "safechain", "star1"]
"""The columns of a released dataset file: UnsafeChain's ``prompt`` / ``response``,
SafeChain's ``instruction`` / ``response`` (its ``label`` is True for an *unsafe*
response: such rows are left out), STAR-1's ``question`` / ``response``."""

RELEASE_COLUMNS: dict[str, tuple[str, str]] = {
    "unsafechain": ("prompt", "response"),
    "safechain": ("instruction", "response"),
    "star1": ("question", "response"),
}


class DatasetSettings(StrictModel):
    """The dataset a build wrote, or a public release of one.

    Attributes:
        path: The build's output folder, its ``datasets/`` export, a JSONL file of rows
            with ``prompt`` and ``response`` (``release/<name>.jsonl``,
            ``subsets/<name>.jsonl``), or for DPO ``pairs.jsonl`` (a build folder gives
            its ``pairs.jsonl``); with another ``layout``, a released file (JSONL, JSON
            or Parquet) in that layout.
        subset: ``full``, ``random`` or ``selected`` of a build folder or ``datasets/``
            export (default ``full``); a file is its own subset. ``test``, the held-out
            split, is refused.
        layout: The columns of a released file: ``unsafechain`` (the default),
            ``safechain`` or ``star1``.
    """

    path: ConfigPath
    subset: str | None = None
    layout: DatasetLayout = "unsafechain"

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

    dir: ConfigPath
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


def training_settings_from_text(
    text: str, overrides: dict[str, object] | None = None, *, where: str
) -> TrainingSettings:
    """Validate a run configuration given as YAML or JSON text (``--config-json``, a
    submitted spec's ``config``); ``where`` names it in messages.

    Raises:
        ConfigError: The text is invalid; the message names the key.
    """
    return load_config_text(text, TrainingSettings, overrides, where=where)


# ---------------------------------------------------------------------------
# The training service: ``unsafechain serve training``.
# ---------------------------------------------------------------------------

ExecutorName = Literal["local", "kubernetes"]


class LocalExecutorSettings(StrictModel):
    """Runs as processes beside the service, on its machine.

    Attributes:
        max_concurrent_runs: Runs training at once; more wait as PENDING (one GPU
            holds one run).
        command: How to start ``unsafechain`` (default: this interpreter, ``-m
            unsafechain.cli``).
        stop_grace_seconds: After SIGTERM, the time a run has to save its checkpoint
            before it is killed (cancel, or the service shutting down).
        max_restarts: Times a run is started again, resuming from its checkpoint,
            when the service finds its process gone after a restart of the service.
    """

    max_concurrent_runs: Annotated[int, Field(ge=1)] = 1
    command: Annotated[tuple[str, ...], Field(min_length=1)] = (
        sys.executable,
        "-m",
        "unsafechain.cli",
    )
    stop_grace_seconds: Annotated[float, Field(gt=0)] = 120.0
    max_restarts: Annotated[int, Field(ge=0)] = 3


class VolumeSettings(StrictModel):
    """A PersistentVolumeClaim mounted into every run's pod.

    Attributes:
        claim: The claim's name.
        mount_path: Where the run sees it (paths in a run's configuration, such as the
            dataset and the output folder, are paths under it).
        read_only: Mount it read-only.
    """

    claim: Annotated[str, Field(min_length=1)]
    mount_path: Annotated[str, Field(pattern=r"^/")]
    read_only: bool = False


class SecretKeySettings(StrictModel):
    """One key of a Kubernetes Secret.

    Attributes:
        name: The Secret's name.
        key: The key in it.
    """

    name: Annotated[str, Field(min_length=1)]
    key: Annotated[str, Field(min_length=1)] = "token"


class TolerationSettings(StrictModel):
    """A pod toleration, as Kubernetes spells it.

    Attributes:
        key: The taint key tolerated; None with ``operator: Exists`` tolerates every taint.
        operator: ``Equal`` matches ``value``; ``Exists`` any value of ``key``.
        value: The taint value matched by ``operator: Equal``.
        effect: The taint effect tolerated; None: every effect.
        tolerationSeconds: How long a ``NoExecute`` taint is tolerated before the pod is
            evicted; None: forever.
    """

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None  # the Kubernetes field name


class KubernetesExecutorSettings(StrictModel):
    """Runs as Kubernetes Jobs on GPU nodes, created and watched by the service.

    Attributes:
        kubeconfig: A kubeconfig file; None: the pod's service account (in a cluster),
            else ``~/.kube/config``.
        context: The kubeconfig context; None: its current one.
        namespace: Where the Jobs go.
        instance: Names this service's Jobs (``app.kubernetes.io/instance``), so two
            services in one namespace keep to their own.
        image: The training image (it holds ``unsafechain`` and the CUDA libraries).
        image_pull_policy: ``IfNotPresent``, ``Always`` or ``Never``.
        image_pull_secrets: Secrets holding registry credentials.
        command: The image's ``unsafechain`` command.
        service_account: The pods' service account; None: the namespace's default.
        gpus: ``nvidia.com/gpu`` per run.
        cpu: CPU request (``"8"``); None: none.
        memory: Memory request and limit (``"64Gi"``); None: none.
        node_selector: Node labels a run's node must carry.
        tolerations: Taints a run's pod tolerates (GPU nodes are often tainted).
        dataset_volume: The claim holding the builds' datasets.
        output_volume: The claim the runs write their output to; where the service
            puts a run's output folder (``output_root``) must be under it.
        hub_token_secret: The Secret key holding the Hugging Face token, given to the
            run as ``HF_TOKEN`` (gated models, pushing).
        env: More environment variables of the run.
        backoff_limit: Times a failed pod is replaced; each new pod resumes from the
            last checkpoint.
        active_deadline_seconds: A run still going after this long is stopped and
            fails (DeadlineExceeded); None: no limit.
        ttl_seconds_after_finished: A finished Job (and its pod) is deleted after
            this long; the service keeps the run's record. None: kept.
        termination_grace_seconds: Time a stopped pod has to save its checkpoint.
        shm_size: Size of the memory-backed ``/dev/shm``; None: the runtime's small
            default.
        request_timeout_seconds: Bound on every call to the API server.
        watch_seconds: Length of one watch request; the watch is then renewed.
    """

    kubeconfig: ConfigPath | None = None
    context: str | None = None
    namespace: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] = "default"
    instance: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=63)] = (
        "unsafechain"
    )
    image: Annotated[str, Field(min_length=1)]
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    command: Annotated[tuple[str, ...], Field(min_length=1)] = ("unsafechain",)
    service_account: str | None = None
    gpus: Annotated[int, Field(ge=0)] = 1
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[TolerationSettings, ...] = ()
    dataset_volume: VolumeSettings | None = None
    output_volume: VolumeSettings | None = None
    hub_token_secret: SecretKeySettings | None = None
    env: dict[str, str] = Field(default_factory=dict)
    backoff_limit: Annotated[int, Field(ge=0)] = 2
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = 7 * 24 * 3600
    termination_grace_seconds: Annotated[int, Field(ge=0)] = 300
    shm_size: str | None = "8Gi"
    request_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    watch_seconds: Annotated[int, Field(ge=1)] = 300


class TrainingServiceSettings(ServerSettings):
    """The training service: where its runs' records and outputs go, and the
    executors that run them.

    Attributes:
        state_dir: The service's own folder: one record per run (the source of truth
            for runs across restarts of the service) and the local runs' logs. Put it
            on a volume.
        output_root: Where a run's output folder goes when its spec names none
            (``<output_root>/<run id>``), as the run sees it.
        defaults: A run configuration file every submitted run starts from (a recipe
            of ``configs/training/``); the spec's ``config`` and fields go over it.
        default_executor: Where a run runs when its spec does not say.
        local: The local executor.
        kubernetes: The Kubernetes executor; None: runs cannot go to Kubernetes.
    """

    service: ClassVar[str] = "training"
    config_sections: ClassVar[tuple[str, ...]] = (
        "state_dir",
        "output_root",
        "defaults",
        "default_executor",
        "local",
        "kubernetes",
    )

    state_dir: ConfigPath = Path("training-service")
    output_root: ConfigPath = Path("training-runs")
    defaults: ConfigPath | None = None
    default_executor: ExecutorName = "local"
    local: LocalExecutorSettings = LocalExecutorSettings()
    kubernetes: KubernetesExecutorSettings | None = None

    @model_validator(mode="after")
    def _executor_configured(self) -> TrainingServiceSettings:
        if self.default_executor == "kubernetes" and self.kubernetes is None:
            raise ValueError("default_executor: kubernetes needs the kubernetes section")
        volume = self.kubernetes.output_volume if self.kubernetes else None
        if volume is not None and not _under(self.output_root, volume.mount_path):
            raise ValueError(
                f"output_root: {self.output_root} is not under the output volume's "
                f"mount_path {volume.mount_path}; the runs could not write there"
            )
        return self


def _under(path: Path, folder: str) -> bool:
    return Path(path).is_relative_to(folder)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``unsafechain serve training``."""
    add_server_arguments(parser)
    runs = parser.add_argument_group("runs")
    flag(runs, "--state-dir", "state_dir", "the service's folder of run records and logs")
    flag(runs, "--output-root", "output_root", "where runs' output folders go by default")
    flag(runs, "--defaults", "defaults", "a run configuration every run starts from")
    flag(
        runs,
        "--executor",
        "default_executor",
        "where runs go by default",
        choices=["local", "kubernetes"],
    )
    flag(
        runs,
        "--max-concurrent-runs",
        "local.max_concurrent_runs",
        "local runs training at once",
        type=int,
    )
    kube = parser.add_argument_group("kubernetes executor (the rest in --config)")
    flag(kube, "--kubeconfig", "kubernetes.kubeconfig", "kubeconfig file")
    flag(kube, "--namespace", "kubernetes.namespace", "namespace of the Jobs")
    flag(kube, "--image", "kubernetes.image", "the training image")


SETTINGS = TrainingServiceSettings
"""The service's settings class, for ``unsafechain serve training``."""
