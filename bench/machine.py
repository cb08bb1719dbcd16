"""The machine a benchmark ran on, for its figures (no heavy imports)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_description() -> str:
    """The CPU model, the cores visible, the load average and the Python version."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{cpu_model()}; {os.cpu_count()} CPU cores visible; load average {load}; "
        f"Python {platform.python_version()}"
    )
