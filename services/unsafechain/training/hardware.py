"""Where a run computes: CPU or GPU, the precision, the weights' dtype, the devices."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from accelerate import PartialState

from unsafechain.domain.settings import SetupError
from unsafechain.training.settings import TrainingSettings


@dataclass(frozen=True, slots=True)
class Hardware:
    """Where the run computes and in which precision.

    Attributes:
        use_cpu: Whether the run stays on the CPU.
        precision: ``fp32``, or ``bf16`` / ``fp16`` mixed precision.
        dtype: The weights' dtype at load.
        devices: Processes taking part (data parallel), for the gradient accumulation.
    """

    use_cpu: bool
    precision: str
    dtype: torch.dtype
    devices: int


def resolve_hardware(settings: TrainingSettings) -> Hardware:
    """The device and precision the settings ask for on this machine.

    Raises:
        SetupError: A GPU, bf16 support or bitsandbytes is asked for and missing.
    """
    hardware, model = settings.hardware, settings.model
    cuda = torch.cuda.is_available()
    if hardware.device == "cuda" and not cuda:
        raise SetupError("hardware.device: cuda, but this machine has no CUDA GPU")
    use_cpu = hardware.device == "cpu" or not cuda
    precision = hardware.precision
    if precision == "auto":
        precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "fp32"
    if use_cpu and precision != "fp32":
        raise SetupError(f"hardware.precision: {precision} needs a GPU; the CPU runs fp32")
    if model.quantization != "none":
        missing = [
            what
            for what, present in (
                ("the bitsandbytes package", importlib.util.find_spec("bitsandbytes") is not None),
                ("a CUDA GPU", not use_cpu),
            )
            if not present
        ]
        if missing:
            raise SetupError(
                f"model.quantization: {model.quantization} loading needs bitsandbytes and a "
                f"CUDA GPU; missing here: {' and '.join(missing)}. Use quantization: none"
            )
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if model.dtype != "auto":
        dtype = dtypes[model.dtype]
    elif use_cpu or precision == "fp32":
        dtype = torch.float32
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return Hardware(use_cpu, precision, dtype, PartialState().num_processes)


def gradient_accumulation(settings: TrainingSettings, hardware: Hardware) -> int:
    per_step = settings.training.per_device_batch_size * hardware.devices
    if settings.training.effective_batch_size % per_step:
        raise SetupError(
            f"training.effective_batch_size: {settings.training.effective_batch_size} is not a "
            f"multiple of per_device_batch_size x devices = {per_step}"
        )
    return settings.training.effective_batch_size // per_step
