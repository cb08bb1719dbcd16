"""Checks of a build configuration against the machine it runs on, before any model
loads: every problem found, together, each naming its configuration key and what to do.

:func:`local_problems` needs no network and runs at the start of every build from the
command line; :func:`reachability_problems` calls out (every endpoint a model is served
from, with the model it serves; every remote stage's health; the broker in Kafka mode)
and runs in ``unsafechain check``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from unsafechain.backends.base import BackendError
from unsafechain.backends.settings import BackendSettings, missing_local_model
from unsafechain.dataset.config import BuildConfig
from unsafechain.domain.settings import SetupError, where_paths_start
from unsafechain.intake.sources import SourceError, detect_format
from unsafechain.runtime.client import ServiceConnection
from unsafechain.runtime.settings import ClientSettings, SettingsError
from unsafechain.streaming.kafka import require_broker

CALL_TIMEOUT = 5.0
"""Seconds each endpoint, service or broker gets to answer."""


def models_in_process(config: BuildConfig) -> dict[str, BackendSettings]:
    """The models this process calls itself: those of the stages not sent to a service
    (a correct stage run here re-judges through the judge service when one is set)."""
    keys: list[str] = []
    if config.remote.generation is None:
        keys.append(config.generation.model)
    if config.remote.judge is None:
        keys += [name for _, name in config.judging.model_references()]
    if config.remote.correction is None:
        keys.append(config.correction.model)
    return {key: config.models[key] for key in dict.fromkeys(keys)}


def local_problems(config: BuildConfig) -> list[str]:
    """What is wrong on this machine without calling anything: source and benchmark
    files, local model folders, API key variables, TLS and token files of the remote
    stages."""
    problems = []
    listed = [(f"sources.{i}", source) for i, source in enumerate(config.sources)]
    listed += [
        (f"decontamination.benchmarks.{i}", benchmark)
        for i, benchmark in enumerate(config.decontamination.benchmarks)
    ]
    for key, source in listed:
        try:
            local = detect_format(source) != "hub"
        except SourceError as error:
            problems.append(f"{key}: {error}")
            continue
        if local and not Path(source.path).exists():
            problems.append(
                f"{key}.path: {source.path} is not there ({source.name!r}; {where_paths_start()})"
            )
    for key, settings in models_in_process(config).items():
        missing = missing_local_model(settings)
        if missing:
            problems.append(f"models.{key}.model: {missing}")
        elif (
            settings.backend == "transformers"
            and Path(settings.model).is_dir()
            and not (Path(settings.model) / "config.json").is_file()
        ):
            problems.append(
                f"models.{key}.model: {settings.model} is a folder without a model's config.json"
            )
        try:
            settings.api_key()
        except ValueError as error:
            problems.append(f"models.{key}.{error}")
    for stage, client in _remote_stages(config):
        for name in ("ca_file", "cert_file", "key_file", "token_file"):
            path = getattr(client, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"remote.{stage}.{name}: {path} is not there")
    return problems


def reachability_problems(config: BuildConfig, *, kafka: bool) -> list[str]:
    """What does not answer: each model endpoint (and whether it serves the model
    named), each remote stage's health, the broker when the build runs on Kafka."""
    problems = []
    for key, settings in models_in_process(config).items():
        if settings.backend != "transformers":
            problem = _endpoint_problem(settings)
            if problem:
                problems.append(f"models.{key}: {problem}")
    for stage, client in _remote_stages(config):
        problem = asyncio.run(_health_problem(client))
        if problem:
            problems.append(f"remote.{stage}: {problem}")
    if kafka:
        try:
            require_broker(config.kafka, CALL_TIMEOUT)
        except SetupError as error:
            problems.append(str(error))
    return problems


def _remote_stages(config: BuildConfig) -> list[tuple[str, ClientSettings]]:
    stages = (
        ("generation", config.remote.generation),
        ("judge", config.remote.judge),
        ("correction", config.remote.correction),
    )
    return [(stage, client) for stage, client in stages if client is not None]


def _endpoint_problem(settings: BackendSettings) -> str | None:
    """Ask the server which models it serves (OpenAI ``GET /models``, TGI ``GET
    /info``) and compare."""
    base = settings.ref().endpoint.rstrip("/")
    url = f"{base}/models" if settings.backend == "openai" else f"{base}/info"
    headers = {}
    try:
        key = settings.api_key()
    except ValueError:
        return None  # reported by local_problems
    if key is not None:
        headers["Authorization"] = f"Bearer {key.get_secret_value()}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as answer:
            body = json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        hint = " (the API key is refused)" if error.code in (401, 403) else ""
        return f"{url} answered {error.code}{hint}"
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        return f"cannot reach {urlsplit(url).netloc} ({reason})"
    except ValueError:
        return f"{url} answered something that is not JSON"
    if settings.backend == "openai":
        served = [entry.get("id") for entry in body.get("data") or [] if isinstance(entry, dict)]
    else:
        served = [body.get("model_id")]
    if served and settings.model not in served:
        return f"{base} serves {', '.join(map(str, served))}, not {settings.model}"
    return None


async def _health_problem(client: ClientSettings) -> str | None:
    connection = ServiceConnection(client.model_copy(update={"timeout": CALL_TIMEOUT}), service="")
    try:
        await connection.check()
    except (BackendError, SettingsError) as error:
        return str(error)
    finally:
        await connection.aclose()
    return None
