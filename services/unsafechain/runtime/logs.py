"""The one place that configures log output: plain text, or JSON lines on request."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the case id when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        case_id = getattr(record, "case_id", None)
        if case_id:
            entry["case_id"] = case_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


THIRD_PARTY_LOGGERS = (
    "accelerate", "asyncio", "datasets", "filelock", "grpc", "httpcore", "httpx", "httpx2",
    "huggingface_hub", "kafka", "peft", "torch", "transformers", "trl", "urllib3",
)  # fmt: skip
"""The libraries whose log records are shown only from ERROR up unless ``--verbose``."""

_QUIET_ENVIRONMENT = {
    # huggingface_hub's and transformers' bars ("Loading weights"), datasets' bars
    # ("Saving the dataset"), transformers' advice, gRPC core's INFO lines ("Handshake
    # failed"), the tokenizers' fork warning. Read when each library is imported, so set
    # before any of them is (the commands import them lazily).
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "GRPC_VERBOSITY": "ERROR",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_third_parties() -> None:
    """Silence the libraries' own progress bars, advice and warnings: through the
    environment variables they read at import (a variable the user set is kept), their
    switches where one is imported already, and Python warnings, which go to the log
    at ERROR only."""
    for name, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    warnings.simplefilter("ignore")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def configure_logging(
    level: str = "INFO", *, json_lines: bool = False, verbose: bool = False
) -> None:
    """Send log records to stderr at ``level``; the libraries' own output (bars,
    warnings, INFO records) is off unless ``verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if verbose:
        for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "filelock", "kafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    else:
        quiet_third_parties()
