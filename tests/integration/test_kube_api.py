"""The Kubernetes API double, through the official ``kubernetes`` client and ``kubectl``.

These tests hold the double to the real API server's behaviour that the platform's
training and deployment code relies on; Jobs run their commands as local processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pytest
from kubernetes.client import ApiClient, ApiException, AppsV1Api, BatchV1Api, CoreV1Api

from tests.support.kube_api import KubeApiServer
from tests.support.kube_jobs import (
    ContainerExit,
    ContainerLaunch,
    KubeCluster,
    LocalProcesses,
    ScriptedContainers,
    use_this_python,
)
from tests.support.kube_store import ObjectStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T = TypeVar("T")
NS = "default"
MERGE_PATCH = "application/merge-patch+json"


def status_of(error: ApiException) -> dict[str, Any]:
    """The ``Status`` object an error answer carries."""
    return json.loads(error.body)


def wait_until(condition: Callable[[], T], what: str, timeout: float = 15.0) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def finished_job(batch: BatchV1Api, name: str, timeout: int = 20) -> Any:
    """Watch the Job until it has a Complete or Failed condition; the Job then."""
    watch = kubernetes.watch.Watch()
    for event in watch.stream(
        batch.list_namespaced_job,
        NS,
        field_selector=f"metadata.name={name}",
        timeout_seconds=timeout,
    ):
        job = event["object"]
        conditions = job.status.conditions if job.status else None
        if any(c.type in ("Complete", "Failed") and c.status == "True" for c in conditions or []):
            watch.stop()
            return job
    raise AssertionError(f"job {name} did not finish within {timeout} s")


def job_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    """A Job running ``command`` once (backoffLimit 0 unless given)."""
    container = {"name": "main", "image": "python:3.11-slim", "command": command}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "trainer"}},
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
        },
    }


def pods_of(core: CoreV1Api, job: str) -> list[Any]:
    return core.list_namespaced_pod(NS, label_selector=f"job-name={job}").items


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def started_pid(kube: KubeCluster, pod: str) -> int:
    pids = [s.pid for s in kube.node.started if s.pod == pod and s.pid is not None]
    assert pids, f"no process was started for {pod}"
    return pids[-1]


# ---------------------------------------------------------------------------
# Discovery and plain objects.
# ---------------------------------------------------------------------------


def test_discovery_describes_the_groups_kinds_and_verbs(kube_client: ApiClient):
    assert kubernetes.client.VersionApi(kube_client).get_code().major == "1"
    assert kubernetes.client.CoreApi(kube_client).get_api_versions().versions == ["v1"]
    groups = {g.name: g for g in kubernetes.client.ApisApi(kube_client).get_api_versions().groups}
    assert {"batch", "apps"} <= set(groups)
    assert groups["batch"].preferred_version.group_version == "batch/v1"

    jobs = {r.name: r for r in BatchV1Api(kube_client).get_api_resources().resources}
    assert jobs["jobs"].kind == "Job" and jobs["jobs"].namespaced
    assert jobs["jobs"].singular_name == "job"
    assert {"create", "get", "list", "watch", "patch", "update", "delete"} <= set(
        jobs["jobs"].verbs
    )
    assert set(jobs["jobs/status"].verbs) == {"get", "patch", "update"}
    core = {r.name: r for r in CoreV1Api(kube_client).get_api_resources().resources}
    assert {"pods", "pods/log", "pods/status", "secrets", "configmaps", "namespaces"} <= set(core)
    assert not core["namespaces"].namespaced and core["configmaps"].short_names == ["cm"]
    deployments = {r.name for r in AppsV1Api(kube_client).get_api_resources().resources}
    assert "deployments" in deployments


def test_secrets_and_config_maps_round_trip_and_list_by_selector(kube_client: ApiClient):
    core = CoreV1Api(kube_client)
    secret = core.create_namespaced_secret(
        NS,
        kubernetes.client.V1Secret(
            metadata=kubernetes.client.V1ObjectMeta(name="hf-token", labels={"app": "trainer"}),
            string_data={"token": "hf_abc"},
        ),
    )
    assert secret.data == {"token": "aGZfYWJj"} and secret.type == "Opaque"
    assert secret.metadata.uid and secret.metadata.creation_timestamp
    assert core.read_namespaced_secret("hf-token", NS).data["token"] == "aGZfYWJj"

    for name, labels in [
        ("a", {"app": "trainer", "tier": "gpu"}),
        ("b", {"app": "trainer", "tier": "cpu"}),
        ("c", {"app": "judge"}),
    ]:
        body = {"metadata": {"name": name, "labels": labels}, "data": {"k": name}}
        core.create_namespaced_config_map(NS, body)

    def names(**selectors: str) -> list[str]:
        listed = core.list_namespaced_config_map(NS, **selectors)
        return sorted(item.metadata.name for item in listed.items)

    assert names(label_selector="app=trainer") == ["a", "b"]
    assert names(label_selector="app==trainer,tier!=gpu") == ["b"]
    assert names(label_selector="tier in (gpu, tpu)") == ["a"]
    assert names(label_selector="tier notin (gpu)") == ["b", "c"]
    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="!tier") == ["c"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c", label_selector="app") == ["a", "b"]

    listed = core.list_namespaced_config_map(NS)
    assert int(listed.metadata.resource_version) >= int(secret.metadata.resource_version)
    first = core.list_namespaced_config_map(NS, limit=2)
    rest = core.list_namespaced_config_map(NS, limit=2, _continue=first.metadata._continue)
    assert [i.metadata.name for i in first.items + rest.items] == ["a", "b", "c"]

    core.delete_namespaced_config_map("a", NS)
    assert names() == ["b", "c"]
    core.delete_collection_namespaced_config_map(NS, label_selector="app=trainer")
    assert names() == ["c"]


def test_errors_are_status_objects_with_the_real_reasons(kube_client: ApiClient):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_secret("absent", NS)
    status = status_of(missing.value)
    assert missing.value.status == 404
    assert status["kind"] == "Status" and status["apiVersion"] == "v1"
    assert (status["status"], status["reason"], status["code"]) == ("Failure", "NotFound", 404)
    assert status["message"] == 'secrets "absent" not found'

    core.create_namespaced_config_map(NS, {"metadata": {"name": "once"}})
    with pytest.raises(ApiException) as twice:
        core.create_namespaced_config_map(NS, {"metadata": {"name": "once"}})
    assert twice.value.status == 409 and status_of(twice.value)["reason"] == "AlreadyExists"

    with pytest.raises(ApiException) as nameless:
        core.create_namespaced_config_map(NS, {"metadata": {}})
    assert nameless.value.status == 422
    assert status_of(nameless.value)["details"]["causes"][0]["field"] == "metadata.name"

    bad_job = job_manifest("Bad_Name", ["true"])
    bad_job["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    with pytest.raises(ApiException) as invalid:
        batch.create_namespaced_job(NS, bad_job)
    status = status_of(invalid.value)
    assert invalid.value.status == 422 and status["reason"] == "Invalid"
    assert status["details"]["kind"] == "Job" and status["details"]["group"] == "batch"
    causes = {cause["field"]: cause["reason"] for cause in status["details"]["causes"]}
    assert causes == {
        "metadata.name": "FieldValueInvalid",
        "spec.template.spec.restartPolicy": "FieldValueNotSupported",
    }

    with pytest.raises(ApiException) as unparsable:
        core.list_namespaced_pod(NS, label_selector="app in (a")
    assert unparsable.value.status == 400 and status_of(unparsable.value)["reason"] == "BadRequest"


def test_a_stale_resource_version_is_a_conflict(kube_client: ApiClient):
    core = CoreV1Api(kube_client)
    created = core.create_namespaced_config_map(
        NS, {"metadata": {"name": "cfg"}, "data": {"v": "1"}}
    )
    created.data = {"v": "2"}
    updated = core.replace_namespaced_config_map("cfg", NS, created)
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)

    created.data = {"v": "stale"}
    with pytest.raises(ApiException) as stale:
        core.replace_namespaced_config_map("cfg", NS, created)
    assert stale.value.status == 409 and status_of(stale.value)["reason"] == "Conflict"
    stale_patch = {"metadata": {"resourceVersion": created.metadata.resource_version}}
    with pytest.raises(ApiException) as stale_patched:
        core.patch_namespaced_config_map("cfg", NS, stale_patch, _content_type=MERGE_PATCH)
    assert stale_patched.value.status == 409

    # Without a resourceVersion the update is unconditional, as on the real server.
    unconditional = {"metadata": {"name": "cfg"}, "data": {"v": "3"}}
    assert core.replace_namespaced_config_map("cfg", NS, unconditional).data == {"v": "3"}


def test_merge_strategic_and_json_patches(kube_client: ApiClient):
    core, apps = CoreV1Api(kube_client), AppsV1Api(kube_client)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "p"}, "data": {"a": "1", "b": "2"}})
    merged = core.patch_namespaced_config_map(
        "p", NS, {"data": {"a": None, "c": "3"}}, _content_type=MERGE_PATCH
    )
    assert merged.data == {"b": "2", "c": "3"}
    operations = [
        {"op": "replace", "path": "/data/b", "value": "20"},
        {"op": "add", "path": "/metadata/labels", "value": {}},
        {"op": "add", "path": "/metadata/labels/example.com~1role", "value": "judge"},
        {"op": "remove", "path": "/data/c"},
    ]
    patched = core.patch_namespaced_config_map("p", NS, operations)
    assert patched.data == {"b": "20"} and patched.metadata.labels == {"example.com/role": "judge"}
    with pytest.raises(ApiException) as failed_test:
        core.patch_namespaced_config_map("p", NS, [{"op": "test", "path": "/data/b", "value": "2"}])
    assert failed_test.value.status == 422

    containers = [
        {"name": "server", "image": "judge:1", "env": [{"name": "A", "value": "1"}]},
        {"name": "sidecar", "image": "metrics:1"},
    ]
    apps.create_namespaced_deployment(
        NS,
        {
            "metadata": {"name": "judge"},
            "spec": {
                "selector": {"matchLabels": {"app": "judge"}},
                "template": {
                    "metadata": {"labels": {"app": "judge"}},
                    "spec": {"containers": containers},
                },
            },
        },
    )
    # A dict body is a strategic merge patch: containers merge by name, env by name.
    server = {"name": "server", "image": "judge:2", "env": [{"name": "B", "value": "2"}]}
    change = {"spec": {"template": {"spec": {"containers": [server]}}}}
    deployment = apps.patch_namespaced_deployment("judge", NS, change)
    server, sidecar = deployment.spec.template.spec.containers
    assert (server.image, sidecar.image) == ("judge:2", "metrics:1")
    assert [(e.name, e.value) for e in server.env] == [("A", "1"), ("B", "2")]
    assert deployment.metadata.generation == 2


def test_status_is_a_subresource_apart_from_the_spec(kube_client: ApiClient):
    apps = AppsV1Api(kube_client)
    body = {
        "metadata": {"name": "svc"},
        "spec": {
            "selector": {"matchLabels": {"app": "svc"}},
            "template": {
                "metadata": {"labels": {"app": "svc"}},
                "spec": {"containers": [{"name": "c", "image": "svc:1"}]},
            },
        },
        "status": {"replicas": 99},
    }
    created = apps.create_namespaced_deployment(NS, body)
    assert created.status is None or created.status.replicas is None
    reported = apps.patch_namespaced_deployment_status(
        "svc", NS, {"status": {"readyReplicas": 1, "replicas": 1}}
    )
    assert reported.status.ready_replicas == 1 and reported.metadata.generation == 1
    current = apps.read_namespaced_deployment_status("svc", NS)
    assert current.status.replicas == 1
    current.status.available_replicas = 1
    current.spec.replicas = 7  # a status update leaves the spec alone
    replaced_status = apps.replace_namespaced_deployment_status("svc", NS, current)
    assert (replaced_status.status.available_replicas, replaced_status.spec.replicas) == (1, 1)

    # The main resource ignores status; a spec change bumps the generation.
    current = apps.read_namespaced_deployment("svc", NS)
    current.status.replicas = 5
    current.spec.replicas = 3
    replaced = apps.replace_namespaced_deployment("svc", NS, current)
    assert (replaced.status.replicas, replaced.spec.replicas) == (1, 3)
    assert replaced.metadata.generation == 2


def test_namespaces_are_objects_and_can_be_required():
    with (
        KubeApiServer(ObjectStore(create_namespaces=False)) as server,
        ApiClient(kubernetes.client.Configuration(host=server.url)) as client,
    ):
        core = CoreV1Api(client)
        names = {ns.metadata.name for ns in core.list_namespace().items}
        assert {"default", "kube-system"} <= names
        with pytest.raises(ApiException) as missing:
            core.create_namespaced_config_map("training", {"metadata": {"name": "c"}})
        assert missing.value.status == 404
        assert status_of(missing.value)["message"] == 'namespaces "training" not found'

        created = core.create_namespace({"metadata": {"name": "training"}})
        assert created.status.phase == "Active"
        assert created.metadata.labels["kubernetes.io/metadata.name"] == "training"
        core.create_namespaced_config_map("training", {"metadata": {"name": "c"}})
        core.delete_namespace("training")
        with pytest.raises(ApiException):
            core.read_namespaced_config_map("c", "training")


def test_a_pod_on_a_node_is_deleted_gracefully_and_dry_runs_store_nothing():
    with (
        KubeApiServer() as server,
        ApiClient(kubernetes.client.Configuration(host=server.url)) as client,
    ):
        core = CoreV1Api(client)
        pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
        dry = core.create_namespaced_pod(NS, pod, dry_run="All")
        assert dry.spec.restart_policy == "Always" and dry.metadata.uid
        assert core.list_namespaced_pod(NS).items == []

        core.create_namespaced_pod(NS, pod)
        binding = {"metadata": {"name": "p"}, "target": {"kind": "Node", "name": "node-1"}}
        # The server answers a Status, which the client cannot read as the V1Binding it
        # expects (kubernetes-client/python#825): callers skip deserialising it.
        answer = core.create_namespaced_pod_binding("p", NS, binding, _preload_content=False)
        assert answer.status == 201 and json.loads(answer.data)["status"] == "Success"
        assert core.read_namespaced_pod("p", NS).spec.node_name == "node-1"

        # A running pod on a node waits for its kubelet; a grace period of 0 ends it.
        core.delete_namespaced_pod("p", NS)
        terminating = core.read_namespaced_pod("p", NS)
        assert terminating.metadata.deletion_timestamp
        assert terminating.metadata.deletion_grace_period_seconds == 30
        core.delete_namespaced_pod("p", NS, grace_period_seconds=0)
        assert core.list_namespaced_pod(NS).items == []


# ---------------------------------------------------------------------------
# Watch.
# ---------------------------------------------------------------------------


def test_a_watch_from_a_resource_version_gets_the_later_events(kube_client: ApiClient):
    core = CoreV1Api(kube_client)
    core.create_namespaced_config_map(NS, {"metadata": {"name": "before"}})
    since = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, {"metadata": {"name": "w", "labels": {"watched": "yes"}}})
    core.patch_namespaced_config_map("w", NS, {"data": {"k": "v"}})
    core.create_namespaced_config_map(NS, {"metadata": {"name": "other"}})
    core.delete_namespaced_config_map("w", NS)

    watch = kubernetes.watch.Watch()
    events = []
    for event in watch.stream(
        core.list_namespaced_config_map,
        NS,
        resource_version=since,
        label_selector="watched",
        timeout_seconds=5,
    ):
        events.append((event["type"], event["object"].metadata.name, event["object"].data))
        if len(events) == 3:
            watch.stop()
    assert events == [
        ("ADDED", "w", None),
        ("MODIFIED", "w", {"k": "v"}),
        ("DELETED", "w", {"k": "v"}),
    ]

    # A watch stays open for changes that come later, and sends bookmarks when asked.
    seen = []
    watch = kubernetes.watch.Watch()
    core.create_namespaced_config_map(NS, {"metadata": {"name": "later"}})
    for event in watch.stream(
        core.list_namespaced_config_map,
        NS,
        resource_version=since,
        allow_watch_bookmarks=True,
        timeout_seconds=4,
    ):
        seen.append(event["type"])
        if event["type"] == "BOOKMARK":
            watch.stop()
    assert seen[-1] == "BOOKMARK" and "ADDED" in seen


def test_a_watch_from_a_compacted_resource_version_is_gone():
    with (
        KubeApiServer(ObjectStore(history=3)) as server,
        ApiClient(kubernetes.client.Configuration(host=server.url)) as client,
    ):
        core = CoreV1Api(client)
        first = core.create_namespaced_config_map(NS, {"metadata": {"name": "c0"}})
        for index in range(1, 5):
            core.create_namespaced_config_map(NS, {"metadata": {"name": f"c{index}"}})
        with pytest.raises(ApiException) as gone:
            for _ in kubernetes.watch.Watch().stream(
                core.list_namespaced_config_map,
                NS,
                resource_version=first.metadata.resource_version,
                timeout_seconds=2,
            ):
                pass
        assert gone.value.status == 410
        assert "Expired: too old resource version" in gone.value.reason

        # Without a timeout the client retries once from the same version, then gives up.
        with pytest.raises(ApiException) as retried:
            for _ in kubernetes.watch.Watch().stream(
                core.list_namespaced_config_map,
                NS,
                resource_version=first.metadata.resource_version,
            ):
                pass
        assert retried.value.status == 410
        watches = [r for r in server.requests if "watch=" in r.path]
        assert len(watches) == 3


# ---------------------------------------------------------------------------
# Jobs that run.
# ---------------------------------------------------------------------------


def test_a_job_that_prints_succeeds_and_its_pod_log_says_so(kube_client: ApiClient):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    phases: list[str] = []
    since = core.list_namespaced_pod(NS).metadata.resource_version
    created = batch.create_namespaced_job(
        NS, job_manifest("hello", ["python", "-c", "print('hi')"])
    )
    assert created.spec.template.metadata.labels["job-name"] == "hello"

    job = finished_job(batch, "hello")
    assert (job.status.succeeded, job.status.failed, job.status.active) == (1, None, None)
    assert job.status.start_time and job.status.completion_time
    complete = [c for c in job.status.conditions if c.type == "Complete"]
    assert complete and complete[0].status == "True"

    (pod,) = pods_of(core, "hello")
    assert pod.metadata.labels["batch.kubernetes.io/controller-uid"] == created.metadata.uid
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "Job",
        "hello",
        created.metadata.uid,
        True,
    )
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert core.read_namespaced_pod_log(pod.metadata.name, NS) == "hi\n"

    watch = kubernetes.watch.Watch()
    for event in watch.stream(
        core.list_namespaced_pod, NS, resource_version=since, timeout_seconds=3
    ):
        phase = event["object"].status.phase if event["object"].status else None
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        if phase == "Succeeded":
            watch.stop()
    assert phases == ["Pending", "Running", "Succeeded"]


def test_a_failing_job_is_retried_up_to_its_backoff_limit(kube_client: ApiClient):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    command = ["python", "-c", "import sys; print('boom'); sys.exit(3)"]
    batch.create_namespaced_job(NS, job_manifest("flaky", command, backoffLimit=2))

    job = finished_job(batch, "flaky")
    failed = next(c for c in job.status.conditions if c.type == "Failed")
    assert (failed.reason, failed.message) == (
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    )
    assert (
        job.status.failed == 3 and not job.status.succeeded and job.status.completion_time is None
    )
    pods = pods_of(core, "flaky")
    assert len(pods) == 3
    for pod in pods:
        assert pod.status.phase == "Failed"
        terminated = pod.status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.reason) == (3, "Error")
        assert core.read_namespaced_pod_log(pod.metadata.name, NS, tail_lines=1) == "boom\n"


def test_the_active_deadline_kills_the_process_and_fails_the_job(
    kube: KubeCluster, kube_client: ApiClient
):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    command = ["python", "-c", "import time; time.sleep(60)"]
    batch.create_namespaced_job(NS, job_manifest("slow", command, activeDeadlineSeconds=1))
    pod = wait_until(
        lambda: [p for p in pods_of(core, "slow") if p.status.phase == "Running"], "running"
    )[0]
    pid = started_pid(kube, pod.metadata.name)

    started = time.monotonic()
    job = finished_job(batch, "slow")
    failed = next(c for c in job.status.conditions if c.type == "Failed")
    assert failed.reason == "DeadlineExceeded"
    assert [c.type for c in job.status.conditions] == ["FailureTarget", "Failed"]
    assert time.monotonic() - started < 10
    assert not process_alive(pid)
    assert pods_of(core, "slow") == []


def test_deleting_a_running_job_kills_its_process_and_deletes_its_pod(
    kube: KubeCluster, kube_client: ApiClient
):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    batch.create_namespaced_job(NS, job_manifest("doomed", ["sleep", "60"]))
    pod = wait_until(
        lambda: [p for p in pods_of(core, "doomed") if p.status.phase == "Running"], "running"
    )[0]
    pid = started_pid(kube, pod.metadata.name)

    batch.delete_namespaced_job("doomed", NS, propagation_policy="Background")
    wait_until(lambda: pods_of(core, "doomed") == [], "the pod to go")
    assert not process_alive(pid)
    with pytest.raises(ApiException):
        batch.read_namespaced_job("doomed", NS)


def test_deletion_propagation_follows_the_policies(kube: KubeCluster, kube_client: ApiClient):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    # The first ignores SIGTERM, so its pod terminates only when the grace period ends.
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    for name, command in (("fore", ["python", "-c", stubborn]), ("orphaned", ["sleep", "60"])):
        batch.create_namespaced_job(NS, job_manifest(name, command))
        wait_until(
            lambda n=name: [p for p in pods_of(core, n) if p.status.phase == "Running"], "running"
        )
    pid = started_pid(kube, pods_of(core, "fore")[0].metadata.name)

    # Foreground: the Job waits, marked for deletion, until its pod is gone.
    answer = batch.delete_namespaced_job("fore", NS, propagation_policy="Foreground")
    assert answer["metadata"]["finalizers"] == ["foregroundDeletion"]
    marked = batch.read_namespaced_job("fore", NS)
    assert marked.metadata.deletion_timestamp and marked.metadata.finalizers == [
        "foregroundDeletion"
    ]
    (terminating,) = pods_of(core, "fore")
    assert terminating.metadata.deletion_timestamp
    wait_until(lambda: pods_of(core, "fore") == [], "the pod to go")
    assert not process_alive(pid)
    wait_until(
        lambda: not batch.list_namespaced_job(NS, field_selector="metadata.name=fore").items,
        "the job",
    )

    # No policy: batch/v1 Jobs orphan their pods, with the real server's warning.
    _, _, headers = batch.delete_namespaced_job_with_http_info("orphaned", NS)
    assert "child pods are preserved by default" in headers["Warning"]
    (orphan,) = pods_of(core, "orphaned")
    assert orphan.metadata.owner_references is None and orphan.status.phase == "Running"


def test_following_a_pod_log_streams_until_the_container_exits(kube_client: ApiClient):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    script = "import time\nfor i in range(4):\n    print('step', i, flush=True); time.sleep(0.2)"
    batch.create_namespaced_job(NS, job_manifest("steps", ["python", "-c", script]))
    pod = wait_until(
        lambda: [p for p in pods_of(core, "steps") if p.status.phase == "Running"], "running"
    )[0]

    # The stream ends by itself when the container exits.
    lines = list(
        kubernetes.watch.Watch().stream(core.read_namespaced_pod_log, pod.metadata.name, NS)
    )
    assert lines == ["step 0", "step 1", "step 2", "step 3"]
    assert core.read_namespaced_pod_log(pod.metadata.name, NS, tail_lines=2) == "step 2\nstep 3\n"


def test_on_failure_restarts_the_container_in_the_same_pod(kube_client: ApiClient):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    # The container's folder outlives its restarts, as a container's filesystem does.
    script = (
        "import os, sys\n"
        "n = int(open('tries').read()) if os.path.exists('tries') else 0\n"
        "open('tries', 'w').write(str(n + 1)); print('try', n); sys.exit(0 if n else 1)"
    )
    manifest = job_manifest("retry-in-place", ["python", "-c", script], backoffLimit=2)
    manifest["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    batch.create_namespaced_job(NS, manifest)

    job = finished_job(batch, "retry-in-place")
    assert job.status.succeeded == 1 and not job.status.failed
    (pod,) = pods_of(core, "retry-in-place")
    (container,) = pod.status.container_statuses
    assert container.restart_count == 1 and container.last_state.terminated.exit_code == 1
    assert core.read_namespaced_pod_log(pod.metadata.name, NS, previous=True) == "try 0\n"
    assert core.read_namespaced_pod_log(pod.metadata.name, NS) == "try 1\n"

    # Restarts count against the backoff limit: one restart is too many for a limit of 1.
    always_failing = job_manifest(
        "crashes", ["python", "-c", "raise SystemExit(2)"], backoffLimit=1
    )
    always_failing["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    batch.create_namespaced_job(NS, always_failing)
    failed = finished_job(batch, "crashes")
    assert next(c for c in failed.status.conditions if c.type == "Failed").reason == (
        "BackoffLimitExceeded"
    )


def test_a_secret_reaches_the_process_through_the_environment(kube_client: ApiClient):
    core, batch = CoreV1Api(kube_client), BatchV1Api(kube_client)
    core.create_namespaced_config_map(
        NS, {"metadata": {"name": "settings"}, "data": {"model": "tiny"}}
    )
    script = "import os; print(os.environ['HF_TOKEN'], os.environ['MODEL'], os.environ['WHO'])"
    env = [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "model"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "WHO", "value": "$(POD)"},
    ]
    batch.create_namespaced_job(
        NS, job_manifest("uses-secret", ["python", "-c", script], container={"env": env})
    )

    # Until the Secret exists the container cannot be created, as on a real node.
    def waiting_reason() -> str | None:
        pods = pods_of(core, "uses-secret")
        statuses = pods[0].status.container_statuses if pods and pods[0].status else None
        waiting = statuses[0].state.waiting if statuses else None
        return waiting.reason if waiting else None

    assert wait_until(lambda: waiting_reason() == "CreateContainerConfigError", "config error")
    core.create_namespaced_secret(
        NS, {"metadata": {"name": "hf"}, "stringData": {"token": "hf_s3cret"}}
    )

    job = finished_job(batch, "uses-secret")
    assert job.status.succeeded == 1
    (pod,) = pods_of(core, "uses-secret")
    assert (
        core.read_namespaced_pod_log(pod.metadata.name, NS)
        == f"hf_s3cret tiny {pod.metadata.name}\n"
    )


def test_a_job_writes_to_its_claim_through_the_folder_the_test_maps(tmp_path: Path):
    models = tmp_path / "models"

    def local_paths(launch: ContainerLaunch) -> ContainerLaunch:
        launch = use_this_python(launch)
        argv = [str(launch.local_path(a)) if a.startswith("/models") else a for a in launch.argv]
        return launch.replace(argv=tuple(argv))

    cluster = KubeCluster(
        tmp_path / "kube", runtime=LocalProcesses(local_paths), claims={"models": models}
    )
    with cluster, ApiClient(kubernetes.client.Configuration(host=cluster.url)) as client:
        batch = BatchV1Api(client)
        script = "import os, sys; open(sys.argv[1], 'w').write(os.getcwd())"
        manifest = job_manifest(
            "trainer",
            ["python", "-c", script, "/models/run-1/done"],
            container={
                "workingDir": "/models/run-1",
                "volumeMounts": [{"name": "out", "mountPath": "/models"}],
            },
            ttlSecondsAfterFinished=0,
        )
        manifest["spec"]["template"]["spec"]["volumes"] = [
            {"name": "out", "persistentVolumeClaim": {"claimName": "models"}}
        ]
        batch.create_namespaced_job(NS, manifest)
        assert finished_job(batch, "trainer").status.succeeded == 1
        assert (models / "run-1" / "done").read_text() == str(models / "run-1")
        # ttlSecondsAfterFinished: 0 deletes the finished Job (and its pod) soon after.
        wait_until(lambda: not batch.list_namespaced_job(NS).items, "the TTL to delete the job")


def test_an_oom_kill_is_reported_as_the_runtime_says(tmp_path: Path):
    oom = ScriptedContainers(ContainerExit(137, "OOMKilled"), seconds=0.2, output=b"loading\n")
    with (
        KubeCluster(tmp_path / "kube", runtime=oom) as cluster,
        ApiClient(kubernetes.client.Configuration(host=cluster.url)) as client,
    ):
        core, batch = CoreV1Api(client), BatchV1Api(client)
        batch.create_namespaced_job(NS, job_manifest("big", ["train"]))
        job = finished_job(batch, "big")
        assert job.status.failed == 1
        (pod,) = pods_of(core, "big")
        terminated = pod.status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled")
        assert core.read_namespaced_pod_log(pod.metadata.name, NS) == "loading\n"


# ---------------------------------------------------------------------------
# kubectl as a second client.
# ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_applies_waits_for_reads_and_deletes_a_job(
    kube: KubeCluster, kube_client: ApiClient, tmp_path: Path
):
    config = kube.server.write_kubeconfig(tmp_path / "kubeconfig")

    def kubectl(*args: str) -> str:
        command = [
            "kubectl",
            "--kubeconfig",
            str(config),
            "--cache-dir",
            str(tmp_path / "cache"),
            *args,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done.stdout

    manifest = tmp_path / "job.json"
    manifest.write_text(
        json.dumps(job_manifest("from-kubectl", ["python", "-c", "print('via kubectl')"]))
    )
    # kubectl validates strictly by default: the double's OpenAPI v3 documents tell it
    # the server does, so it sends fieldValidation=Strict.
    assert kubectl("apply", "-f", str(manifest)).strip() == "job.batch/from-kubectl created"
    kubectl("wait", "--for=condition=complete", "job/from-kubectl", "--timeout=20s")

    listed = json.loads(kubectl("get", "jobs", "-l", "app=trainer", "-o", "json"))
    (job,) = listed["items"]
    assert job["metadata"]["name"] == "from-kubectl" and job["status"]["succeeded"] == 1
    assert "from-kubectl" in kubectl("get", "jobs")
    assert kubectl("logs", "job/from-kubectl") == "via kubectl\n"

    # The official client sees what kubectl made, and the reverse.
    assert BatchV1Api(kube_client).read_namespaced_job("from-kubectl", NS).status.succeeded == 1
    assert 'job.batch "from-kubectl" deleted' in kubectl("delete", "job", "from-kubectl")
    assert BatchV1Api(kube_client).list_namespaced_job(NS).items == []
    assert CoreV1Api(kube_client).list_namespaced_pod(NS).items == []


def test_fields_are_validated_against_the_kubernetes_schemas(
    kube: KubeCluster, tmp_path: Path
) -> None:
    """``fieldValidation``: Strict refuses an unknown field with 400, Warn (the default)
    answers with a ``Warning`` header, Ignore says nothing; kubectl uses Strict."""
    manifest = job_manifest("typo", ["python", "-c", "pass"])
    manifest["spec"]["template"]["spec"]["containers"][0]["comand"] = ["true"]
    url = f"{kube.url}/apis/batch/v1/namespaces/{NS}/jobs"

    def post(query: str) -> tuple[int, str, list[str]]:
        request = urllib.request.Request(
            f"{url}?{query}&dryRun=All",
            data=json.dumps(manifest).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, "", answer.headers.get_all("Warning") or []
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())["message"], []

    code, message, _ = post("fieldValidation=Strict")
    assert code == 400
    assert "strict decoding error" in message and "'comand'" in message
    code, _, warnings = post("fieldValidation=Warn")
    assert code == 201 and len(warnings) == 1 and "comand" in warnings[0]
    assert post("fieldValidation=Ignore") == (201, "", [])

    path = tmp_path / "typo.json"
    path.write_text(json.dumps(manifest))
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kube.server.write_kubeconfig(tmp_path / "config")),
         "--cache-dir", str(tmp_path / "cache"), "create", "-f", str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode != 0 and "strict decoding error" in done.stderr, done.stderr
