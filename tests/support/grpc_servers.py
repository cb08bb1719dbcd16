"""gRPC servers on free loopback ports for tests, served from an event loop in a
background thread as a service process would serve them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from unsafechain.runtime.server import ServiceServer, create_servicer
from unsafechain.runtime.settings import ServiceSettings


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


def server_settings(service: str = "judge", **overrides: Any) -> ServiceSettings:
    """Settings for a server on a free loopback port; the model is built by the test."""
    values: dict[str, Any] = {
        "service": service,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_host": "127.0.0.1",
        "metrics_port": 0,
        "grace_period": 1.0,
        "model": {"backend": "transformers", "model": "built-by-the-test"},
        "judge_model": {"backend": "transformers", "model": "built-by-the-test"},
    }
    return ServiceSettings(**(values | overrides))


async def start_server(settings: ServiceSettings, make_servicer) -> ServiceServer:
    """A started server for the servicer ``make_servicer(metrics)`` returns."""
    server = ServiceServer(settings)
    await server.start(make_servicer(server.metrics))
    return server


async def start_server_from_settings(settings: ServiceSettings) -> ServiceServer:
    """A started server whose servicer the settings' own factory builds."""
    return await start_server(settings, lambda metrics: create_servicer(settings, metrics))
