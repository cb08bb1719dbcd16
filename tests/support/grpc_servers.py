"""gRPC servers on free loopback ports for tests, served from an event loop in a
background thread as a service process would serve them."""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Coroutine
from typing import Any

from unsafechain.correction.settings import CorrectionServiceSettings
from unsafechain.generation.settings import GenerationServiceSettings
from unsafechain.judge.settings import JudgeServiceSettings
from unsafechain.runtime.server import ServiceServer
from unsafechain.runtime.settings import ServerSettings
from unsafechain.training.settings import TrainingServiceSettings

BUILD_STAGES = ("generation", "judge", "correction")
"""The services a build's stages can be sent to (``remote:``)."""

SETTINGS: dict[str, type[ServerSettings]] = {
    "generation": GenerationServiceSettings,
    "judge": JudgeServiceSettings,
    "correction": CorrectionServiceSettings,
    "training": TrainingServiceSettings,
}


class LoopThread:
    """An event loop in a daemon thread, where the servers and their clients live."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run ``coroutine`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def server_settings(service: str = "judge", **overrides: Any) -> ServerSettings:
    """Settings of ``service`` for a server on a free loopback port; unless the test
    gives models, they are placeholders and the test builds the servicer itself."""
    placeholder = {"backend": "transformers", "model": "built-by-the-test"}
    models = {"generator": placeholder, "guard": placeholder, "corrector": placeholder}
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "grace_period": 1.0,
    }
    if service != "training" and not {"model", "models", "judge_model"} & set(overrides):
        values["models"] = models
    return SETTINGS[service](**(values | overrides))


async def start_server(settings: ServerSettings, make_servicer) -> ServiceServer:
    """A started server for the servicer ``make_servicer(metrics)`` returns."""
    server = ServiceServer(settings)
    await server.start(make_servicer(server.metrics))
    return server


def create_servicer(settings: ServerSettings, metrics):
    """The servicer the settings' own service builds, models loaded."""
    module = importlib.import_module(f"unsafechain.{settings.service}.servicer")
    return module.create_servicer(settings, metrics)


async def start_server_from_settings(settings: ServerSettings) -> ServiceServer:
    """A started server whose servicer the settings' own factory builds."""
    return await start_server(settings, lambda metrics: create_servicer(settings, metrics))
