"""The training service on loopback, its runs as local processes or as Kubernetes Jobs
on the API double: submit once, follow, cancel, restart, refuse bad specs."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import kubernetes
import pytest
import yaml
from kubernetes.client import BatchV1Api, CoreV1Api

from tests.support.grpc_servers import LoopThread, server_settings, start_server_from_settings
from tests.support.kafka_broker import committed_offsets, kafka_section
from tests.support.kube_jobs import ContainerExit, KubeCluster, ScriptedContainers
from unsafechain.backends.base import BackendError
from unsafechain.cli import main
from unsafechain.dataset.config import EventSettings
from unsafechain.dataset.events import dataset_event, publish_event
from unsafechain.runtime.settings import ClientSettings
from unsafechain.streaming.kafka import create_topics, topic_name
from unsafechain.training.checkpoints import last_checkpoint
from unsafechain.training.client import RemoteTrainingClient, state_name
from unsafechain.training.kube import job_name
from unsafechain.triggers.training import follow_datasets, load_follow_config
from unsafechain.v1 import training_pb2

pytestmark = pytest.mark.integration

LOCAL = training_pb2.TRAINING_EXECUTOR_LOCAL
KUBERNETES = training_pb2.TRAINING_EXECUTOR_KUBERNETES
NS = "training"


@pytest.fixture
def build(training_build: Path) -> Path:
    return training_build


def run_config(standin_models, *, steps: int, checkpoint_every: int = 2) -> str:
    """A tiny SFT LoRA run of ``steps`` optimizer steps on the stand-in generator; the
    dataset and the output come from the spec."""
    return yaml.safe_dump(
        {
            "model": {"base": str(standin_models.generator)},
            "training": {
                "epochs": 50,
                "max_steps": steps,
                "learning_rate": 1e-3,
                "effective_batch_size": 2,
                "per_device_batch_size": 2,
                "max_length": 256,
            },
            "checkpoints": {"every_steps": checkpoint_every, "keep": 2},
            "logging": {"every_steps": 1},
            "hardware": {"device": "cpu", "cpu_threads": 1},
        }
    )


class Service:
    """A training service on a loopback port, and a client of it, on one loop."""

    def __init__(self, loop: LoopThread, settings):
        self.loop = loop
        self.settings = settings
        self.server = loop.run(start_server_from_settings(settings))
        self.address = f"127.0.0.1:{self.server.port}"
        self.client = loop.run(self._client())

    async def _client(self) -> RemoteTrainingClient:
        return RemoteTrainingClient(ClientSettings(address=self.address, timeout=30))

    def call(self, method: str, *args: Any, timeout: float = 60) -> Any:
        return self.loop.run(getattr(self.client, method)(*args), timeout=timeout)

    def watch(
        self, run_id: str, until=None, timeout: float = 240
    ) -> list[training_pb2.TrainingRun]:
        """The updates of the run until it ends (or ``until(run)`` holds)."""

        async def follow() -> list[training_pb2.TrainingRun]:
            seen = []
            async for run in self.client.watch(run_id):
                seen.append(run)
                if until is not None and until(run):
                    break
            return seen

        return self.loop.run(follow(), timeout=timeout)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.read().decode()

    def stop(self) -> None:
        self.loop.run(self.client.aclose())
        self.loop.run(self.server.drain(1.0), timeout=120)


@contextmanager
def training_service(tmp_path: Path, **overrides: Any) -> Iterator[Service]:
    loop = LoopThread()
    values = {"state_dir": tmp_path / "state", "output_root": tmp_path / "runs"} | overrides
    service = Service(loop, server_settings("training", **values))
    try:
        yield service
    finally:
        try:
            service.stop()
        finally:
            loop.close()


def states(updates: list[training_pb2.TrainingRun]) -> list[str]:
    names: list[str] = []
    for run in updates:
        if not names or names[-1] != state_name(run.state):
            names.append(state_name(run.state))
    return names


def spec(standin_models, build: Path, steps: int, **fields: Any) -> training_pb2.TrainingSpec:
    every = fields.pop("every", 2)
    return training_pb2.TrainingSpec(
        config=run_config(standin_models, steps=steps, checkpoint_every=every),
        **{"dataset_uri": str(build), "subset": "full", **fields},
    )


# ---------------------------------------------------------------------------
# Local processes.
# ---------------------------------------------------------------------------


def test_a_run_is_submitted_once_followed_to_its_end_and_listed(standin_models, build, tmp_path):
    with training_service(tmp_path) as service:
        run, created = service.call("submit", spec(standin_models, build, 4), "build-1:sft")
        again, created_again = service.call("submit", spec(standin_models, build, 4), "build-1:sft")
        assert created and not created_again and again.id == run.id
        assert run.spec.output_uri == str(tmp_path / "runs" / run.id)

        updates = service.watch(run.id)
        assert states(updates)[-2:] == ["running", "succeeded"]
        final = updates[-1]
        assert (final.step, final.max_steps) == (4, 4)
        assert final.metrics["loss"] > 0 and "learning_rate" in final.metrics
        # The steps reached the watcher as they happened (changes that come together
        # are sent as one).
        steps = [u.step for u in updates if u.step]
        assert steps == sorted(steps) and steps[-1] == 4
        assert final.executor_ref.startswith("process/") and final.request_id == "build-1:sft"
        assert final.started_at.seconds and final.finished_at.seconds
        output = Path(final.spec.output_uri)
        record = json.loads((output / "run.json").read_text())
        assert record["run_id"] and record["global_step"] == 4
        assert (output / "adapter" / "adapter_config.json").exists()

        [listed] = service.call("list")
        assert listed.id == run.id and listed.state == training_pb2.TRAINING_RUN_STATE_SUCCEEDED
        assert service.call("list", [training_pb2.TRAINING_RUN_STATE_RUNNING]) == []
        metrics = service.metrics()
        assert 'unsafechain_training_runs{executor="local",state="succeeded"} 1.0' in metrics
        assert 'unsafechain_training_submits_total{outcome="duplicate"} 1.0' in metrics


def test_cancel_stops_a_local_run_at_a_checkpoint(standin_models, build, tmp_path):
    with training_service(tmp_path) as service:
        run, _ = service.call("submit", spec(standin_models, build, 500))
        service.watch(run.id, until=lambda r: r.step >= 3)
        service.call("cancel", run.id)
        final = service.watch(run.id)[-1]
        assert final.state == training_pb2.TRAINING_RUN_STATE_CANCELLED
        assert "checkpoints are in" in final.message
        assert 3 <= final.step < 500
        assert last_checkpoint(Path(final.spec.output_uri)) is not None


def test_runs_wait_for_a_slot_and_survive_a_restart_of_the_service(standin_models, build, tmp_path):
    with training_service(tmp_path) as service:
        first, _ = service.call("submit", spec(standin_models, build, 40, every=3))
        second, _ = service.call("submit", spec(standin_models, build, 3))
        waiting = service.call("get", second.id)
        assert waiting.state == training_pb2.TRAINING_RUN_STATE_PENDING
        assert "waiting for a free slot (1 of 1 training, 0 ahead)" in waiting.message
        service.watch(first.id, until=lambda r: r.step >= 4)
        # The drain stops the first run at a checkpoint, unfinished.

    stopped = json.loads((tmp_path / "state" / "runs" / f"{first.id}.json").read_text())
    assert stopped["state"] == "running" and "service's shutdown" in stopped["message"]
    with training_service(tmp_path) as service:
        resumed = service.watch(first.id)[-1]
        assert resumed.state == training_pb2.TRAINING_RUN_STATE_SUCCEEDED, resumed.message
        assert (resumed.restarts, resumed.step) == (1, 40)
        record = json.loads((Path(resumed.spec.output_uri) / "run.json").read_text())
        assert record["resumed_from"] is not None
        assert service.watch(second.id)[-1].state == training_pb2.TRAINING_RUN_STATE_SUCCEEDED


def test_bad_requests_are_refused_naming_the_field(standin_models, build, tmp_path):
    with training_service(tmp_path) as service:

        def refusal(bad: training_pb2.TrainingSpec) -> str:
            with pytest.raises(BackendError) as caught:
                service.call("submit", bad)
            assert "INVALID_ARGUMENT" in str(caught.value)
            return str(caught.value)

        assert "spec: dataset.subset: 'test' is the build's held-out test split" in refusal(
            spec(standin_models, build, 2, subset="test")
        )
        missing = refusal(spec(standin_models, tmp_path / "nowhere", 2))
        assert f"spec.dataset_uri: {tmp_path / 'nowhere'} does not exist" in missing
        assert "training.learning_rate" in refusal(
            spec(standin_models, build, 2, learning_rate=-1.0)
        )
        assert "spec.config: the top level must be a mapping" in refusal(
            training_pb2.TrainingSpec(config="- a list")
        )
        assert "spec.executor: this service has no kubernetes executor" in refusal(
            spec(standin_models, build, 2, executor=KUBERNETES)
        )
        assert service.call("list") == []

        channel = grpc.insecure_channel(service.address)
        stub = training_pb2_grpc_stub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetTrainingRun(training_pb2.GetTrainingRunRequest(run_id="run-x"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            list(
                stub.WatchTrainingRun(training_pb2.WatchTrainingRunRequest(run_id="x"), timeout=10)
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListTrainingRuns(training_pb2.ListTrainingRunsRequest(page_token="zz"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in caught.value.details()
        channel.close()


def training_pb2_grpc_stub(channel: grpc.Channel):
    from unsafechain.v1 import training_pb2_grpc

    return training_pb2_grpc.TrainingServiceStub(channel)


def test_train_server_submits_follows_and_lists(standin_models, build, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    raw = yaml.safe_load(run_config(standin_models, steps=3))
    raw["dataset"] = {"path": str(build), "subset": "random"}
    config.write_text(yaml.safe_dump(raw))
    with training_service(tmp_path) as service:
        status = main(["train", "--server", service.address, "--config", str(config)])
        out = capsys.readouterr().out
        assert status == 0, out
        assert "submitted (pending" in out and "running" in out and "succeeded" in out
        assert "step 3/3 loss" in out
        assert main(["runs", "list", "--server", service.address]) == 0
        listed = capsys.readouterr().out
        assert "succeeded  step 3/3 loss" in listed and "process/" in listed


# ---------------------------------------------------------------------------
# Kubernetes Jobs, on the API double (tests/support/kube_api.py).
# ---------------------------------------------------------------------------


def kube_settings(cluster: KubeCluster, tmp_path: Path, build: Path, **overrides: Any) -> dict:
    """The kubernetes executor on ``cluster``: the build's folder and the runs' folder
    are claims mounted where they are on this machine, so the paths in a run's
    configuration hold inside its "container" (a local process)."""
    kubeconfig = cluster.server.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    return {
        "kubeconfig": kubeconfig,
        "namespace": NS,
        "image": "registry.example/unsafechain-train:1.0",
        "command": ["python", "-m", "unsafechain.cli"],
        "gpus": 1,
        "memory": "16Gi",
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "dataset_volume": {"claim": "datasets", "mount_path": str(build.parent), "read_only": True},
        "output_volume": {"claim": "runs", "mount_path": str(tmp_path / "runs")},
        "hub_token_secret": {"name": "hub", "key": "token"},
        "backoff_limit": 1,
        "active_deadline_seconds": 900,
        "ttl_seconds_after_finished": 3600,
        "watch_seconds": 5,
        **overrides,
    }


@contextmanager
def cluster_for(tmp_path: Path, build: Path, **options: Any) -> Iterator[KubeCluster]:
    (tmp_path / "runs").mkdir(exist_ok=True)
    claims = {"datasets": build.parent, "runs": tmp_path / "runs"}
    with KubeCluster(tmp_path / "kube", claims=claims, **options) as cluster:
        yield cluster


def official_client(cluster: KubeCluster) -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient(kubernetes.client.Configuration(host=cluster.url))


def hub_secret(client: kubernetes.client.ApiClient) -> None:
    CoreV1Api(client).create_namespaced_secret(
        NS, {"metadata": {"name": "hub"}, "stringData": {"token": "hf_not_a_real_token"}}
    )


def test_a_run_becomes_a_job_that_trains_while_the_service_follows_it(
    standin_models, build, tmp_path
):
    with (
        cluster_for(tmp_path, build) as cluster,
        official_client(cluster) as client,
        training_service(
            tmp_path,
            kubernetes=kube_settings(cluster, tmp_path, build),
            default_executor="kubernetes",
        ) as service,
    ):
        run, _ = service.call("submit", spec(standin_models, build, 4), "b-1")
        job = BatchV1Api(client).read_namespaced_job(job_name(run.id), NS)
        assert job.metadata.labels["app.kubernetes.io/managed-by"] == "unsafechain-training-service"
        assert job.metadata.labels["unsafechain.io/run-id"] == run.id
        assert job.metadata.annotations["unsafechain.io/request-id"] == "b-1"
        assert (job.spec.backoff_limit, job.spec.active_deadline_seconds) == (1, 900)
        assert job.spec.ttl_seconds_after_finished == 3600
        pod = job.spec.template.spec
        assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
        assert (pod.tolerations[0].key, pod.tolerations[0].operator) == ("nvidia.com/gpu", "Exists")
        [container] = pod.containers
        assert container.resources.limits == {"nvidia.com/gpu": "1", "memory": "16Gi"}
        assert container.args[:2] == ["train", "--config-json"]
        assert json.loads(container.args[2])["output"]["dir"] == run.spec.output_uri
        token = next(e for e in container.env if e.name == "HF_TOKEN")
        assert (token.value_from.secret_key_ref.name, token.value_from.secret_key_ref.key) == (
            "hub",
            "token",
        )
        claims = {
            v.name: v.persistent_volume_claim for v in pod.volumes if v.persistent_volume_claim
        }
        assert (claims["dataset"].claim_name, claims["dataset"].read_only) == ("datasets", True)
        assert claims["output"].claim_name == "runs"
        assert any(v.empty_dir and v.empty_dir.medium == "Memory" for v in pod.volumes)

        # No Secret yet: the pod cannot start, and the run says why.
        waiting = service.watch(run.id, until=lambda r: "hub" in r.message, timeout=30)[-1]
        assert waiting.state == training_pb2.TRAINING_RUN_STATE_PENDING
        assert "CreateContainerConfigError" in waiting.message
        hub_secret(client)

        updates = service.watch(run.id)
        assert states(updates)[-2:] == ["running", "succeeded"], updates[-1].message
        final = updates[-1]
        assert (final.step, final.max_steps) == (4, 4) and final.metrics["loss"] > 0
        assert final.executor_ref == f"job/{NS}/{job_name(run.id)}"
        assert (Path(final.spec.output_uri) / "adapter" / "adapter_config.json").exists()


def test_an_oom_killed_pod_fails_the_run_with_its_reason(standin_models, build, tmp_path):
    oom = ScriptedContainers(ContainerExit(137, "OOMKilled"), seconds=0.2, output=b"loading\n")
    with (
        cluster_for(tmp_path, build, runtime=oom) as cluster,
        official_client(cluster) as client,
        training_service(tmp_path, kubernetes=kube_settings(cluster, tmp_path, build)) as service,
    ):
        hub_secret(client)
        run, _ = service.call("submit", spec(standin_models, build, 4, executor=KUBERNETES))
        final = service.watch(run.id, timeout=60)[-1]
        assert final.state == training_pb2.TRAINING_RUN_STATE_FAILED
        assert final.message.startswith("BackoffLimitExceeded: Job has reached the specified")
        assert "OOMKilled, exit code 137" in final.message
        assert final.restarts == 1


def test_a_job_deleted_outside_the_service_fails_its_run(standin_models, build, tmp_path):
    slow = ScriptedContainers(ContainerExit(0), seconds=60)
    with (
        cluster_for(tmp_path, build, runtime=slow) as cluster,
        official_client(cluster) as client,
        training_service(tmp_path, kubernetes=kube_settings(cluster, tmp_path, build)) as service,
    ):
        hub_secret(client)
        run, _ = service.call("submit", spec(standin_models, build, 4, executor=KUBERNETES))
        service.watch(run.id, until=lambda r: r.state == training_pb2.TRAINING_RUN_STATE_RUNNING)
        BatchV1Api(client).delete_namespaced_job(
            job_name(run.id), NS, propagation_policy="Background"
        )
        final = service.watch(run.id, timeout=30)[-1]
        assert final.state == training_pb2.TRAINING_RUN_STATE_FAILED
        assert "was deleted outside the service" in final.message


def test_cancel_deletes_the_job_and_its_pod_stops_at_a_checkpoint(standin_models, build, tmp_path):
    with (
        cluster_for(tmp_path, build) as cluster,
        official_client(cluster) as client,
        training_service(tmp_path, kubernetes=kube_settings(cluster, tmp_path, build)) as service,
    ):
        hub_secret(client)
        run, _ = service.call("submit", spec(standin_models, build, 500, executor=KUBERNETES))
        service.watch(run.id, until=lambda r: r.step >= 3)
        service.call("cancel", run.id)
        final = service.watch(run.id, timeout=60)[-1]
        assert final.state == training_pb2.TRAINING_RUN_STATE_CANCELLED, final.message
        assert BatchV1Api(client).list_namespaced_job(NS).items == []
        assert CoreV1Api(client).list_namespaced_pod(NS).items == []
        assert last_checkpoint(Path(final.spec.output_uri)) is not None


def test_a_restarted_service_finds_its_jobs_and_follows_them_to_the_end(
    standin_models, build, tmp_path
):
    with cluster_for(tmp_path, build) as cluster, official_client(cluster) as client:
        hub_secret(client)
        settings = kube_settings(cluster, tmp_path, build)
        with training_service(tmp_path, kubernetes=settings) as service:
            run, _ = service.call("submit", spec(standin_models, build, 30, executor=KUBERNETES))
            service.watch(run.id, until=lambda r: r.step >= 2)
        # The Job trains on without the service.
        time.sleep(1)
        assert BatchV1Api(client).read_namespaced_job(job_name(run.id), NS).status.active == 1
        with training_service(tmp_path, kubernetes=settings) as service:
            final = service.watch(run.id)[-1]
            assert final.state == training_pb2.TRAINING_RUN_STATE_SUCCEEDED, final.message
            assert (final.step, final.restarts) == (30, 0)
            assert final.metrics["loss"] > 0


# ---------------------------------------------------------------------------
# Connected by Kafka: a build's announcement, the follower, the real service.
# ---------------------------------------------------------------------------


def test_an_announced_build_is_trained_once_however_often_it_is_announced(
    standin_models, build, tmp_path, bootstrap
):
    template = tmp_path / "run.yaml"
    template.write_text(run_config(standin_models, steps=3))
    with training_service(tmp_path) as service:
        follow = {
            "kafka": kafka_section(bootstrap, "trained-once"),
            "server": {"address": service.address, "timeout": 30},
            "run": str(template),
            "subset": "random",
            "executor": "local",
            "retry": {"initial_backoff_seconds": 0.2, "give_up_after_seconds": 4.5},
        }
        path = tmp_path / "follow.yaml"
        path.write_text(yaml.safe_dump(follow))
        settings, run_template = load_follow_config(path)
        create_topics(settings.kafka, ["datasets"])
        manifest = json.loads((build / "manifest.json").read_text())
        # Announced twice: a build that finished again, or an event delivered twice.
        for _ in range(2):
            publish_event(settings.kafka, EventSettings(), dataset_event(build, manifest))
        stop = threading.Event()
        follower = threading.Thread(
            target=follow_datasets, args=(settings, run_template), kwargs={"until": stop.is_set}
        )
        follower.start()
        try:
            deadline = time.monotonic() + 120
            topic = topic_name(settings.kafka, "datasets")
            while committed_offsets(bootstrap, topic, "trained-once.v1.train") < 2:
                assert time.monotonic() < deadline, "the follower did not take both events"
                time.sleep(0.2)
        finally:
            stop.set()
            follower.join(timeout=60)
        [run] = service.call("list")
        assert run.request_id.startswith(f"{manifest['build_id']}:")
        assert (run.spec.dataset_uri, run.spec.subset) == (str(build), "random")
        final = service.watch(run.id)[-1]
        assert final.state == training_pb2.TRAINING_RUN_STATE_SUCCEEDED, final.message
        record = json.loads((Path(final.spec.output_uri) / "run.json").read_text())
        assert record["dataset"]["build_id"] == manifest["build_id"]
        assert record["dataset"]["subset"] == "random"
        assert len(service.call("list")) == 1
