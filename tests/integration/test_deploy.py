"""``make deploy``, an upgrade and ``make undeploy`` against the Kubernetes API double.

No Kubernetes API server can run here, so the chart is installed into
:mod:`tests.support.kube_api` (with the Job controller and node agent of
:mod:`tests.support.kube_jobs`) by the real ``helm`` of the dev extra, through the real
``make deploy`` / ``make undeploy`` targets with a kubeconfig, and checked with the real
``kubectl``. What the double does for helm: discovery, the OpenAPI v3 documents helm reads
to learn that the server validates fields, field validation of every object against the
Kubernetes schemas (a finding is a ``Warning`` the test fails on), protobuf-encoded
release Secrets, three-way strategic merge patches on upgrade, custom kinds served from
their CustomResourceDefinitions, and the topics hook Job run for real: its container is
the rendered command line after the image's entrypoint, run under bubblewrap with its
volumes at their mount paths (:mod:`tests.support.kube_sandbox`) against the test's
Kafka-compatible broker.

Not covered: ``--wait`` (``DEPLOY_WAIT`` is set to a plain timeout: the double has no
Deployment controller or kubelet, so no Deployment ever becomes available), images,
scheduling on GPU nodes, RBAC and NetworkPolicy enforcement, admission webhooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaConsumer

from tests.support.chart import CHART, ROOT, render, requires_helm
from tests.support.kube_jobs import KubeCluster
from tests.support.kube_sandbox import Sandboxed
from tests.support.kube_schemas import CUSTOM_SPECS, crd

VENV_BIN = Path(sys.executable).parent
KUBECTL = "kubectl"
NAMESPACE = "platform"
RELEASE = "uc"
REGISTRY = "registry.example.com/unsafechain"
TAG = "0.1.0-test"
PREFIX = "deploy-test"

pytestmark = requires_helm


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KubeCluster]:
    with KubeCluster(tmp_path / "kube", runtime=Sandboxed()) as running:
        yield running


def values_file(tmp_path: Path, bootstrap: str, name: str, **overrides: Any) -> Path:
    """The minimal CI value set against the test's broker, with ``overrides`` merged."""
    values = yaml.safe_load((CHART / "ci" / "minimal-values.yaml").read_text())
    for key, value in overrides.items():
        values.setdefault(key, {}).update(value)
    values["kafka"].update(bootstrapServers=[bootstrap], topicPrefix=PREFIX)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def make(target: str, kubeconfig: Path, values: Path, timeout: float = 240) -> str:
    """``make <target>`` with the test's kubeconfig; its output, or a failure that
    shows it."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            target,
            f"NAMESPACE={NAMESPACE}",
            f"RELEASE={RELEASE}",
            f"VALUES={values}",
            f"IMAGE_REGISTRY={REGISTRY}",
            f"IMAGE_TAG={TAG}",
            "DEPLOY_WAIT=--timeout=3m",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"make {target} failed:\n{output}"
    return output


def kubectl(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBECTL, "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def rendered(values: Path) -> list[dict[str, Any]]:
    """What the release should hold: the chart rendered with the same values (hooks
    apart: helm deletes a hook Job once it succeeded)."""
    images = ["--set-string", f"image.registry={REGISTRY}", "--set-string", f"image.tag={TAG}"]
    docs = render("-f", str(values), *images, release=RELEASE, namespace=NAMESPACE)
    return [d for d in docs if "helm.sh/hook" not in d["metadata"].get("annotations", {})]


def contains(live: Any, rendered: Any) -> bool:
    """Whether ``live`` holds everything ``rendered`` says: the server may add its
    defaults, never change or drop what was sent."""
    if isinstance(rendered, dict):
        return isinstance(live, dict) and all(
            key in live and contains(live[key], value) for key, value in rendered.items()
        )
    if isinstance(rendered, list):
        return (
            isinstance(live, list)
            and len(live) == len(rendered)
            and all(contains(a, b) for a, b in zip(live, rendered, strict=True))
        )
    return bool(live == rendered)


def reference(doc: dict[str, Any]) -> str:
    """``kind.group/name`` as kubectl takes it."""
    group = doc["apiVersion"].rpartition("/")[0]
    kind = doc["kind"].lower() + (f".{group}" if group else "")
    return f"{kind}/{doc['metadata']['name']}"


def live(kubeconfig: Path, docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each object read back with ``kubectl get -o json``; a missing one fails."""
    found = {}
    for doc in docs:
        done = kubectl(kubeconfig, "-n", NAMESPACE, "get", reference(doc), "-o", "json")
        assert done.returncode == 0, f"{reference(doc)}: {done.stderr}"
        found[reference(doc)] = json.loads(done.stdout)
    return found


def broker_topics(bootstrap: str) -> set[str]:
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], request_timeout_ms=10_000)
    try:
        return set(consumer.topics())
    finally:
        consumer.close()


def release_secrets(cluster: KubeCluster) -> list[str]:
    secrets = cluster.store.resource("", "v1", "secrets")
    listed = cluster.store.list(secrets, NAMESPACE, label_selector=f"owner=helm,name={RELEASE}")
    return sorted(item["metadata"]["name"] for item in listed["items"])


def test_deploy_upgrade_and_undeploy_with_make(
    cluster: KubeCluster, bootstrap: str, tmp_path: Path
) -> None:
    kubeconfig = cluster.server.write_kubeconfig(tmp_path / "kubeconfig")

    # Install: every object of the chart exists, as rendered, and the hook Job made the
    # build's topics on the broker.
    first = values_file(tmp_path, bootstrap, "first")
    output = make("deploy", kubeconfig, first)
    assert "STATUS: deployed" in output and "REVISION: 1" in output, output
    expected = rendered(first)
    objects = live(kubeconfig, expected)
    kinds = {doc["kind"] for doc in expected}
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "Role"} <= kinds
    for doc in expected:
        got = objects[reference(doc)]
        assert got["metadata"]["labels"] == doc["metadata"]["labels"], reference(doc)
        assert got["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
        if doc["kind"] == "Deployment":
            assert contains(got["spec"], doc["spec"]), reference(doc)
            image = got["spec"]["template"]["spec"]["containers"][0]["image"]
            assert image.startswith(f"{REGISTRY}/unsafechain") and image.endswith(f":{TAG}")
        if doc["kind"] == "ConfigMap":
            assert got["data"] == doc["data"], reference(doc)
    stages = ["prompts", "generated", "judged", "to-correct", "records"]
    assert {f"{PREFIX}.v1.{stage}" for stage in stages} <= broker_topics(bootstrap)
    hook_jobs = [
        request.body["metadata"]["name"]
        for request in cluster.server.requests
        if request.method == "POST"
        and request.path.startswith(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
    ]
    assert hook_jobs == [f"{RELEASE}-unsafechain-topics"]
    assert not cluster.server.warnings, cluster.server.warnings
    assert release_secrets(cluster) == [f"sh.helm.release.v1.{RELEASE}.v1"]

    # Upgrade with changed values: the judge workers scale out, a setting changes in the
    # ConfigMap, a component goes away.
    second = values_file(
        tmp_path,
        bootstrap,
        "second",
        workers={"judge": {"replicas": 2}},
        config={"generation": {"model": "generator", "samples": 4}},
    )
    output = make("deploy", kubeconfig, second)
    assert "REVISION: 2" in output, output
    after = live(kubeconfig, rendered(second))
    judge = after[f"deployment.apps/{RELEASE}-unsafechain-worker-judge"]
    assert judge["spec"]["replicas"] == 2
    config = after[f"configmap/{RELEASE}-unsafechain-config"]["data"]["config.yaml"]
    assert yaml.safe_load(config)["generation"]["samples"] == 4
    assert judge["metadata"]["generation"] == 2
    assert not cluster.server.warnings, cluster.server.warnings
    assert release_secrets(cluster) == [
        f"sh.helm.release.v1.{RELEASE}.v1",
        f"sh.helm.release.v1.{RELEASE}.v2",
    ]
    history = kubectl(
        kubeconfig,
        "-n",
        NAMESPACE,
        "get",
        "secrets",
        "-l",
        "owner=helm,status=deployed",
        "-o",
        "name",
    )
    assert history.stdout.split() == [f"secret/sh.helm.release.v1.{RELEASE}.v2"]

    # Undeploy: every object of the release is gone, the release history with it.
    make("undeploy", kubeconfig, second)
    for doc in rendered(second):
        done = kubectl(kubeconfig, "-n", NAMESPACE, "get", reference(doc))
        assert done.returncode != 0 and "NotFound" in done.stderr, reference(doc)
    assert release_secrets(cluster) == []


def test_custom_kinds_need_their_crds_and_are_checked_against_them(
    cluster: KubeCluster, bootstrap: str, tmp_path: Path
) -> None:
    """KEDA scaling without KEDA installed fails naming the kind; with its CRDs
    applied (``kubectl apply``) the ScaledObjects are created and validated."""
    kubeconfig = cluster.server.write_kubeconfig(tmp_path / "kubeconfig")
    keda = yaml.safe_load((CHART / "ci" / "keda-values.yaml").read_text())
    values = values_file(tmp_path, bootstrap, "keda", workers=keda["workers"], kafka=keda["kafka"])
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    command = ["make", "--no-print-directory", "deploy", f"NAMESPACE={NAMESPACE}",
               f"RELEASE={RELEASE}", f"VALUES={values}", "DEPLOY_WAIT=--timeout=3m"]  # fmt: skip
    refused = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert refused.returncode != 0
    assert 'no matches for kind "ScaledObject" in version "keda.sh/v1alpha1"' in refused.stderr

    crds = tmp_path / "crds.yaml"
    crds.write_text(yaml.safe_dump_all([crd(*key) for key in CUSTOM_SPECS]))
    applied = kubectl(kubeconfig, "apply", "-f", str(crds))
    assert applied.returncode == 0, applied.stderr
    time.sleep(0.1)
    make("deploy", kubeconfig, values)
    scaled = kubectl(kubeconfig, "-n", NAMESPACE, "get", "scaledobjects.keda.sh", "-o", "json")
    assert scaled.returncode == 0, scaled.stderr
    names = sorted(item["metadata"]["name"] for item in json.loads(scaled.stdout)["items"])
    assert names == [
        f"{RELEASE}-unsafechain-worker-{s}" for s in ("correct", "generate", "judge", "route")
    ]

    # The double checks custom objects against their CRD as the API server does.
    bad = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
           "metadata": {"name": "bad", "namespace": NAMESPACE},
           "spec": {"scaleTargetRef": {"name": "x"}}}  # fmt: skip
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    rejected = kubectl(kubeconfig, "create", "-f", str(tmp_path / "bad.yaml"))
    assert rejected.returncode != 0
    assert "spec.triggers: Required value" in rejected.stderr
