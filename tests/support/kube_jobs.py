"""The Job controller and the node agent that run beside the Kubernetes API double.

Together with :class:`~tests.support.kube_api.KubeApiServer` they make a Job *run*:

- :class:`JobController` does what kube-controller-manager's Job controller does for
  NonIndexed Jobs: creates pods from the template (owned by the Job, with the
  ``job-name`` / ``controller-uid`` labels), counts their outcomes, retries failed pods
  up to ``backoffLimit``, enforces ``activeDeadlineSeconds``, and writes the Job's
  status (``active``, ``ready``, ``terminating``, ``succeeded``, ``failed``,
  ``startTime``, ``completionTime``, the ``SuccessCriteriaMet`` / ``FailureTarget``
  conditions and then ``Complete`` / ``Failed`` once no pod is left running). A
  finished Job with ``ttlSecondsAfterFinished`` is deleted after the delay.
- :class:`NodeAgent` is the scheduler and kubelet of a one-node cluster: it binds
  every pod to itself, resolves each container's environment (``value``, ``$(VAR)``
  references, ``secretKeyRef`` / ``configMapKeyRef`` / ``fieldRef``, ``envFrom``) and
  volumes (PVCs mapped to local folders by the test, ``emptyDir``, ``secret``,
  ``configMap``, ``hostPath``), runs the containers through a
  :class:`ContainerRuntime`, captures their output for the pod log endpoint, and moves
  the pod Pending → Running → Succeeded / Failed with container states, exit codes,
  restarts (``OnFailure`` / ``Always``) and graceful deletion (SIGTERM, then SIGKILL
  after the grace period, capped so tests stay fast).

The default runtime, :class:`LocalProcesses`, runs a container's ``command`` + ``args``
as a local process in its own process group: there are no images, so the command must
exist on this machine, and a ``prepare`` hook may rewrite the launch (the interpreter,
paths under mounts). :class:`ScriptedContainers` runs nothing and exits as told, e.g.
``OOMKilled``. Not covered: Indexed Jobs, ``suspend``, pod failure and success
policies, init and sidecar containers, probes, resource limits, node selection.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Protocol, Self

from tests.support.kube_api import KubeApiServer, LogFile
from tests.support.kube_store import (
    JOB_UID_LABEL,
    ApiError,
    Object,
    ObjectStore,
    Selection,
    now_rfc3339,
    parse_label_selector,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# How containers run.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerLaunch:
    """Everything the node agent resolved to start one container.

    Attributes:
        namespace: The pod's namespace.
        pod: The pod's name.
        container: The container's name.
        argv: ``command`` + ``args`` with ``$(VAR)`` references expanded.
        env: The environment: the container's variables over ``PATH`` and ``HOSTNAME``.
        working_dir: Where the process starts: ``workingDir`` mapped to a local folder.
        mounts: Each ``mountPath`` and the local folder mounted there.
        root: The local folder that stands for the container's own filesystem.
        spec: The container as the pod spec holds it.
        pod_spec: The pod's spec (its security context, volumes).
        read_only: The mount paths mounted read-only: ``readOnly`` mounts, and
            ConfigMap and Secret volumes always, as kubelet mounts them.
    """

    namespace: str
    pod: str
    container: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    working_dir: Path
    mounts: Mapping[str, Path]
    root: Path
    spec: Object
    pod_spec: Object = field(default_factory=dict)
    read_only: frozenset[str] = frozenset()

    def local_path(self, container_path: str) -> Path:
        """The local path that ``container_path`` is inside the container: under the
        deepest mount that holds it, else under :attr:`root`."""
        path = PurePosixPath(container_path)
        for mount_path in sorted(self.mounts, key=len, reverse=True):
            if path.is_relative_to(mount_path):
                return self.mounts[mount_path] / path.relative_to(mount_path)
        return self.root / path.relative_to("/") if path.is_absolute() else self.working_dir / path

    def replace(self, **changes: object) -> ContainerLaunch:
        """A copy with ``changes`` (for ``prepare`` hooks)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class ContainerExit:
    """How a container ended.

    Attributes:
        exit_code: The exit code; 128 + N for a process killed by signal N.
        reason: ``Completed``, ``Error``, ``OOMKilled``, ``StartError`` …; empty for
            Completed on 0 and Error otherwise.
        message: Detail, e.g. why it could not start.
    """

    exit_code: int
    reason: str = ""
    message: str = ""

    @property
    def termination_reason(self) -> str:
        return self.reason or ("Completed" if self.exit_code == 0 else "Error")


class RunningContainer(Protocol):
    """A started container."""

    @property
    def pid(self) -> int | None:
        """The local process id, when there is a process."""
        ...

    def poll(self) -> ContainerExit | None:
        """How it ended, or None while it runs."""
        ...

    def signal(self, signum: int) -> None:
        """Send ``signum`` to all of it (SIGTERM to stop, SIGKILL to kill)."""
        ...


class ContainerRuntime(Protocol):
    """Starts containers for the node agent."""

    def start(self, launch: ContainerLaunch, log: IO[bytes]) -> RunningContainer:
        """Start the container; its stdout and stderr go to ``log``."""
        ...


class LocalProcess:
    """A container that is a local process and its process group."""

    def __init__(self, process: subprocess.Popen[bytes]):
        self._process = process

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def poll(self) -> ContainerExit | None:
        code = self._process.poll()
        if code is None:
            return None
        # A container's processes end with its main one.
        self.signal(signal.SIGKILL)
        return ContainerExit(128 - code if code < 0 else code)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)


class Finished:
    """A container that ended before it ran (it could not start)."""

    def __init__(self, exit: ContainerExit):
        self._exit = exit

    pid = None

    def poll(self) -> ContainerExit:
        return self._exit

    def signal(self, signum: int) -> None:
        """Nothing is left to signal."""


class LocalProcesses:
    """Runs each container's ``command`` + ``args`` as a local process.

    The process gets the resolved environment and working folder, its own process
    group (so stopping it stops its children), and its output goes to the pod log.
    A command that cannot start ends the container with reason StartError and exit
    code 128, as a container runtime reports it.

    Args:
        prepare: Rewrites each launch before it starts, e.g. :func:`use_this_python`.
    """

    def __init__(self, prepare: Callable[[ContainerLaunch], ContainerLaunch] | None = None):
        self.prepare = prepare

    def start(self, launch: ContainerLaunch, log: IO[bytes]) -> RunningContainer:
        if self.prepare is not None:
            launch = self.prepare(launch)
        if not launch.argv:
            return Finished(
                ContainerExit(128, "StartError", "no command: image entrypoints are unknown here")
            )
        try:
            process = subprocess.Popen(
                list(launch.argv),
                env=dict(launch.env),
                cwd=launch.working_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            message = f"exec: {launch.argv[0]!r}: {error.strerror}"
            return Finished(ContainerExit(128, "StartError", message))
        return LocalProcess(process)


def use_this_python(launch: ContainerLaunch) -> ContainerLaunch:
    """A ``prepare`` hook: ``python`` / ``python3`` as the command is this interpreter
    (the test environment stands for the image's)."""
    if launch.argv and launch.argv[0] in ("python", "python3"):
        return launch.replace(argv=(sys.executable, *launch.argv[1:]))
    return launch


class _Scripted:
    def __init__(self, exit: ContainerExit, seconds: float):
        self._exit = exit
        self._ends = time.monotonic() + seconds
        self._stopped: ContainerExit | None = None

    pid = None

    def poll(self) -> ContainerExit | None:
        if self._stopped is not None:
            return self._stopped
        return self._exit if time.monotonic() >= self._ends else None

    def signal(self, signum: int) -> None:
        self._stopped = ContainerExit(128 + signum)


class ScriptedContainers:
    """Runs nothing: each container writes ``output`` and exits as ``exit`` says
    after ``seconds`` (an OOMKilled, a crash, a slow success)."""

    def __init__(self, exit: ContainerExit, *, seconds: float = 0.0, output: bytes = b""):
        self.exit = exit
        self.seconds = seconds
        self.output = output

    def start(self, launch: ContainerLaunch, log: IO[bytes]) -> RunningContainer:
        log.write(self.output)
        log.flush()
        return _Scripted(self.exit, self.seconds)


# ---------------------------------------------------------------------------
# The node agent: scheduler and kubelet of a one-node cluster.
# ---------------------------------------------------------------------------


class _ConfigError(Exception):
    """A container cannot be created yet: a missing Secret, ConfigMap or key."""


@dataclass(slots=True)
class _ContainerRun:
    name: str
    image: str
    launch: ContainerLaunch | None = None
    running: RunningContainer | None = None
    started_at: str = ""
    logs: list[Path] = field(default_factory=list)
    restarts: int = 0
    exit: ContainerExit | None = None
    finished_at: str = ""
    last_state: Object = field(default_factory=dict)
    restart_after: float = 0.0


@dataclass(slots=True)
class _PodRun:
    uid: str
    namespace: str
    name: str
    folder: Path
    containers: dict[str, _ContainerRun]
    ip: str
    started: bool = False
    waiting: tuple[str, str] = ("ContainerCreating", "")
    kill_at: float | None = None
    reported: Object | None = None

    def active(self) -> bool:
        return any(c.running is not None and c.exit is None for c in self.containers.values())


@dataclass(frozen=True, slots=True)
class Started:
    """A container the node agent started, for tests to inspect."""

    namespace: str
    pod: str
    container: str
    launch: ContainerLaunch
    pid: int | None
    running: RunningContainer | None = None


class NodeAgent:
    """Binds pods to one node, runs their containers, reports their status.

    Args:
        store: The API server's objects.
        runtime: How containers run.
        work_dir: Where pod folders, volumes and logs go.
        name: The node's name.
        claims: PVC claimName → local folder; an unmapped claim gets a folder of its
            own under ``work_dir`` that outlives pods, as a volume does.
        max_grace_seconds: The most a deleted pod's containers get between SIGTERM and
            SIGKILL, whatever its grace period (30 s by default) says.
        restart_backoff: Seconds before a container restarts (the kubelet's
            CrashLoopBackOff starts at 10 s).
    """

    def __init__(
        self,
        store: ObjectStore,
        runtime: ContainerRuntime,
        work_dir: Path,
        *,
        name: str = "double-node",
        claims: Mapping[str, Path] | None = None,
        max_grace_seconds: float = 2.0,
        restart_backoff: float = 0.0,
    ):
        self.store = store
        self.runtime = runtime
        self.work_dir = work_dir
        self.name = name
        self.claims = dict(claims or {})
        self.max_grace_seconds = max_grace_seconds
        self.restart_backoff = restart_backoff
        self.started: list[Started] = []
        self._pods = store.resource("", "v1", "pods")
        self._runs: dict[str, _PodRun] = {}
        self._lock = threading.Lock()
        self._loop = _ControlLoop(f"NodeAgent:{name}", store, self._reconcile)
        self._next_ip = 1

    def start(self) -> Self:
        self._loop.start()
        return self

    def stop(self) -> None:
        """Stop reconciling and kill every container still running."""
        self._loop.stop()
        with self._lock:
            for run in self._runs.values():
                self._signal(run, signal.SIGKILL)
        self._loop.raise_errors()

    # ContainerLogs ----------------------------------------------------------------

    def log_file(
        self, namespace: str, pod: str, container: str, *, previous: bool
    ) -> LogFile | None:
        with self._lock:
            run = next(
                (r for r in self._runs.values() if (r.namespace, r.name) == (namespace, pod)), None
            )
            found = run.containers.get(container) if run is not None else None
            if found is None or len(found.logs) < (2 if previous else 1):
                return None
            path = found.logs[-2 if previous else -1]

        def running() -> bool:
            with self._lock:
                return not previous and found.exit is None and found.running is not None

        return LogFile(path, running)

    # Reconciling --------------------------------------------------------------------

    def _reconcile(self) -> None:
        pods = self.store.objects(self._pods)
        present = {pod["metadata"]["uid"] for pod in pods}
        with self._lock:
            for uid in [uid for uid in self._runs if uid not in present]:
                # Deleted without the node's confirmation (grace period 0): kill at once.
                self._signal(self._runs.pop(uid), signal.SIGKILL)
        for pod in pods:
            try:
                self._reconcile_pod(pod)
            except ApiError as error:
                if error.code not in (404, 409):
                    raise

    def _reconcile_pod(self, pod: Object) -> None:
        metadata, spec = pod["metadata"], pod["spec"]
        namespace, name = metadata["namespace"], metadata["name"]
        if not spec.get("nodeName"):
            if not metadata.get("deletionTimestamp"):
                self.store.bind(namespace, name, self.name)
            return
        if spec["nodeName"] != self.name:
            return
        with self._lock:
            run = self._runs.get(metadata["uid"])
            if run is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    return
                run = self._runs[metadata["uid"]] = self._new_run(pod)
            if metadata.get("deletionTimestamp"):
                self._terminate(pod, run)
                return
            if not run.started:
                self._start(pod, run)
            else:
                self._poll(pod, run)
            self._report(pod, run)

    def _new_run(self, pod: Object) -> _PodRun:
        metadata = pod["metadata"]
        folder = (
            self.work_dir
            / "pods"
            / f"{metadata['namespace']}_{metadata['name']}_{metadata['uid'][:8]}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        containers = {
            c["name"]: _ContainerRun(c["name"], c.get("image", ""))
            for c in pod["spec"]["containers"]
        }
        self._next_ip += 1
        return _PodRun(
            metadata["uid"],
            metadata["namespace"],
            metadata["name"],
            folder,
            containers,
            f"10.244.0.{self._next_ip}",
        )

    def _start(self, pod: Object, run: _PodRun) -> None:
        try:
            launches = {c["name"]: self._launch(pod, run, c) for c in pod["spec"]["containers"]}
        except _ConfigError as error:
            run.waiting = ("CreateContainerConfigError", str(error))
            return
        run.waiting = ("ContainerCreating", "")
        if run.reported is None:
            # Pending with ContainerCreating first, as the kubelet reports it.
            self._report(pod, run)
        for name, launch in launches.items():
            self._run_container(run.containers[name], launch)
        run.started = True

    def _run_container(self, container: _ContainerRun, launch: ContainerLaunch) -> None:
        log_path = launch.root.parent / f"{launch.container}.{container.restarts}.log"
        with log_path.open("wb") as log:
            running = self.runtime.start(launch, log)
        container.launch = launch
        container.running = running
        container.logs.append(log_path)
        container.started_at = now_rfc3339()
        container.exit = None
        self.started.append(
            Started(launch.namespace, launch.pod, launch.container, launch, running.pid, running)
        )

    def _poll(self, pod: Object, run: _PodRun) -> None:
        policy = pod["spec"].get("restartPolicy", "Always")
        for container in run.containers.values():
            if container.running is None:
                continue
            if container.exit is None:
                exit = container.running.poll()
                if exit is None:
                    continue
                container.exit = exit
                container.finished_at = now_rfc3339()
                restart = policy == "Always" or (policy == "OnFailure" and exit.exit_code != 0)
                container.restart_after = (
                    time.monotonic() + self.restart_backoff if restart else 0.0
                )
            if container.restart_after and time.monotonic() >= container.restart_after:
                container.last_state = {"terminated": self._terminated(container)}
                container.restarts += 1
                container.restart_after = 0.0
                assert container.launch is not None
                self._run_container(container, container.launch)

    def _terminate(self, pod: Object, run: _PodRun) -> None:
        if run.active():
            if run.kill_at is None:
                grace = pod["metadata"].get("deletionGracePeriodSeconds") or 0
                run.kill_at = time.monotonic() + min(float(grace), self.max_grace_seconds)
                self._signal(run, signal.SIGTERM)
            elif time.monotonic() >= run.kill_at:
                self._signal(run, signal.SIGKILL)
            for container in run.containers.values():
                if container.running is not None and container.exit is None:
                    exit = container.running.poll()
                    if exit is not None:
                        container.exit, container.finished_at = exit, now_rfc3339()
            if run.active():
                return
        for container in run.containers.values():
            container.restart_after = 0.0
        if run.started:
            self._report(pod, run)
        self.store.delete(self._pods, run.namespace, run.name, grace_period=0)
        del self._runs[run.uid]

    @staticmethod
    def _signal(run: _PodRun, signum: int) -> None:
        for container in run.containers.values():
            if container.running is not None and container.exit is None:
                container.running.signal(signum)

    # Launch resolution ---------------------------------------------------------------

    def _launch(self, pod: Object, run: _PodRun, spec: Object) -> ContainerLaunch:
        namespace = pod["metadata"]["namespace"]
        root = run.folder / spec["name"] / "root"
        root.mkdir(parents=True, exist_ok=True)
        volumes = self._volumes(pod, run)
        always_read_only = {
            v["name"] for v in pod["spec"].get("volumes") or [] if "secret" in v or "configMap" in v
        }
        mounts, read_only = {}, set()
        for mount in spec.get("volumeMounts") or []:
            if mount["name"] in volumes:
                local = volumes[mount["name"]] / mount.get("subPath", "")
                if not local.is_file():  # a subPath may name one file of the volume
                    local.mkdir(parents=True, exist_ok=True)
                mounts[mount["mountPath"]] = local
                if mount.get("readOnly") or mount["name"] in always_read_only:
                    read_only.add(mount["mountPath"])
        # kubelet's order: the service variables, then envFrom, then env, each value
        # expanded against what is defined so far.
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOSTNAME": pod["metadata"]["name"],
            **self._service_env(pod),
        }
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._secret_data(namespace, source["secretRef"])
            else:
                data = self._config_data(namespace, source.get("configMapRef") or {})
            env.update({prefix + key: value for key, value in data.items()})
        for variable in spec.get("env") or []:
            value = self._env_value(pod, variable, env)
            if value is not None:
                env[variable["name"]] = value
        argv = tuple(
            _expand(part, env) for part in [*(spec.get("command") or []), *(spec.get("args") or [])]
        )
        launch = ContainerLaunch(
            namespace,
            pod["metadata"]["name"],
            spec["name"],
            argv,
            env,
            root,
            mounts,
            root,
            spec,
            pod["spec"],
            frozenset(read_only),
        )
        working_dir = launch.local_path(spec["workingDir"]) if spec.get("workingDir") else root
        working_dir.mkdir(parents=True, exist_ok=True)
        return launch.replace(working_dir=working_dir)

    def _service_env(self, pod: Object) -> dict[str, str]:
        """The variables kubelet makes of Services: those of the ``kubernetes`` Service
        of ``default`` always (a fixed address where the test made none), and, unless the
        pod sets ``enableServiceLinks: false``, those of every Service of its namespace
        that has a cluster IP."""
        services = self.store.resource("", "v1", "services")
        env = service_env(KUBERNETES_SERVICE, "10.96.0.1")
        with contextlib.suppress(ApiError):
            api = self.store.get(services, "default", "kubernetes")
            env = service_env(api, api["spec"]["clusterIP"])
        if pod["spec"].get("enableServiceLinks", True):
            namespace = pod["metadata"]["namespace"]
            for service in self.store.list(services, namespace)["items"]:
                ip = service["spec"].get("clusterIP")
                if ip and ip != "None":
                    env = {**service_env(service, ip), **env}
        return env

    def _env_value(self, pod: Object, variable: Object, env: Mapping[str, str]) -> str | None:
        if "value" in variable:
            return _expand(str(variable["value"]), env)
        source = variable.get("valueFrom") or {}
        namespace = pod["metadata"]["namespace"]
        if "secretKeyRef" in source:
            return self._key(namespace, source["secretKeyRef"], secret=True)
        if "configMapKeyRef" in source:
            return self._key(namespace, source["configMapKeyRef"], secret=False)
        if "fieldRef" in source:
            return _field_ref(pod, source["fieldRef"]["fieldPath"])
        return None

    def _key(self, namespace: str, reference: Object, *, secret: bool) -> str | None:
        data = (
            self._secret_data(namespace, reference)
            if secret
            else self._config_data(namespace, reference)
        )
        key = reference["key"]
        if key not in data:
            if reference.get("optional"):
                return None
            kind = "Secret" if secret else "ConfigMap"
            raise _ConfigError(f"couldn't find key {key} in {kind} {namespace}/{reference['name']}")
        return data[key]

    def _secret_data(self, namespace: str, reference: Object) -> dict[str, str]:
        secret = self._object("secrets", namespace, reference)
        if secret is None:
            return {}
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def _config_data(self, namespace: str, reference: Object) -> dict[str, str]:
        config_map = self._object("configmaps", namespace, reference)
        return dict(config_map.get("data") or {}) if config_map is not None else {}

    def _object(self, plural: str, namespace: str, reference: Object) -> Object | None:
        name = reference.get("name") or reference.get("secretName") or ""
        try:
            return self.store.get(self.store.resource("", "v1", plural), namespace, name)
        except ApiError:
            if reference.get("optional"):
                return None
            raise _ConfigError(f'{plural.removesuffix("s")} "{name}" not found') from None

    def _volumes(self, pod: Object, run: _PodRun) -> dict[str, Path]:
        """Each volume as a local folder, as kubelet hands them over: a claim owned by
        the pod's ``fsGroup`` with the setgid bit, an emptyDir open to all, a ConfigMap's
        or Secret's keys as files (all, or the ``items`` named, with ``mode`` /
        ``defaultMode``, 0644 by default, group ``fsGroup``)."""
        namespace = pod["metadata"]["namespace"]
        fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
        volumes: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                path = self.claims.get(claim, self.work_dir / "claims" / namespace / claim)
                path.mkdir(parents=True, exist_ok=True)
                if fs_group is not None:
                    os.chown(path, -1, fs_group)
                    path.chmod(0o2775)
            elif "emptyDir" in volume:
                path = run.folder / "volumes" / name
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)
            elif "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
            elif "secret" in volume or "configMap" in volume:
                path = run.folder / "volumes" / name
                source = volume.get("secret") or volume["configMap"]
                data = (
                    self._secret_data(namespace, source)
                    if "secret" in volume
                    else self._config_data(namespace, source)
                )
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o755)
                items = source.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] in data:
                        target = path / item["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_text(data[item["key"]])
                        target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
                        if fs_group is not None:
                            os.chown(target, -1, fs_group)
            else:
                continue
            path.mkdir(parents=True, exist_ok=True)
            volumes[name] = path
        return volumes

    # Status -------------------------------------------------------------------------

    @staticmethod
    def _terminated(container: _ContainerRun) -> Object:
        assert container.exit is not None
        terminated: Object = {
            "exitCode": container.exit.exit_code,
            "reason": container.exit.termination_reason,
            "startedAt": container.started_at,
            "finishedAt": container.finished_at,
            "containerID": _container_id(container),
        }
        if container.exit.message:
            terminated["message"] = container.exit.message
        return terminated

    def _report(self, pod: Object, run: _PodRun) -> None:
        statuses = []
        for container in run.containers.values():
            state: Object
            if container.running is None:
                reason, message = run.waiting
                state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
            elif container.exit is None:
                state = {"running": {"startedAt": container.started_at}}
            elif container.restart_after:
                state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off restarting failed container {container.name}",
                    }
                }
            else:
                state = {"terminated": self._terminated(container)}
            ready = "running" in state
            statuses.append(
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "containerID": _container_id(container),
                    "ready": ready,
                    "started": ready,
                    "restartCount": container.restarts,
                    "state": state,
                    "lastState": container.last_state,
                }
            )
        phase = _phase(statuses)
        all_ready = bool(statuses) and all(s["ready"] for s in statuses)
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "qosClass": pod.get("status", {}).get("qosClass", "BestEffort"),
            "containerStatuses": statuses,
        }
        if run.reported == status:
            return
        run.reported = status

        def change(obj: Object) -> None:
            previous = obj.get("status") or {}
            conditions = {c["type"]: c for c in previous.get("conditions") or []}
            finished_reason = {"Succeeded": "PodCompleted", "Failed": "PodFailed"}.get(phase)
            for kind, true in (
                ("PodReadyToStartContainers", True),
                ("Initialized", True),
                ("ContainersReady", all_ready),
                ("Ready", all_ready),
            ):
                _set_condition(
                    conditions,
                    kind,
                    true,
                    "" if true else (finished_reason or "ContainersNotReady"),
                )
            obj["status"] = {
                **status,
                "startTime": previous.get("startTime") or now_rfc3339(),
                "conditions": list(conditions.values()),
            }

        self.store.update(self._pods, run.namespace, run.name, change, subresource="status")


def _container_id(container: _ContainerRun) -> str:
    pid = container.running.pid if container.running is not None else None
    return f"local://{pid}" if pid else ""


def _phase(statuses: list[Object]) -> str:
    states = [s["state"] for s in statuses]
    if any("running" in s for s in states) or any(
        s.get("waiting", {}).get("reason") == "CrashLoopBackOff" for s in states
    ):
        return "Running"
    if states and all("terminated" in s for s in states):
        failed = any(s["terminated"]["exitCode"] != 0 for s in states)
        return "Failed" if failed else "Succeeded"
    return "Pending"


def _set_condition(conditions: dict[str, Object], kind: str, true: bool, reason: str = "") -> None:
    status = "True" if true else "False"
    if conditions.get(kind, {}).get("status") == status:
        return
    condition: Object = {
        "type": kind,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": now_rfc3339(),
    }
    if reason:
        condition["reason"] = reason
    conditions[kind] = condition


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are substituted, ``$$``
    escapes a ``$``, undefined references stay as written."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(substitute, text)


KUBERNETES_SERVICE: Object = {
    "metadata": {"name": "kubernetes", "namespace": "default"},
    "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP"}]},
}
"""The API server's Service, whose variables kubelet injects into every pod."""


def _env_name(name: str) -> str:
    """kubelet's makeEnvVariableName: upper case, '-' becomes '_'."""
    return name.replace("-", "_").upper()


def service_env(service: Object, cluster_ip: str) -> dict[str, str]:
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


def _field_ref(pod: Object, path: str) -> str:
    metadata = pod["metadata"]
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return (metadata.get(match.group(1)) or {}).get(match.group(2), "")
    values = {
        "metadata.name": metadata["name"],
        "metadata.namespace": metadata["namespace"],
        "metadata.uid": metadata["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.hostIP": "127.0.0.1",
        "status.podIP": pod.get("status", {}).get("podIP", ""),
    }
    if path not in values:
        raise _ConfigError(f"unsupported fieldRef: {path}")
    return values[path]


# ---------------------------------------------------------------------------
# The Job controller.
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _JobTrack:
    """What the controller remembers of a Job (the real one keeps it in pod finalizers)."""

    started: float | None = None
    succeeded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    last_failure: float = 0.0
    finished: float | None = None


class JobController:
    """Runs ``batch/v1`` Jobs (NonIndexed) by creating and counting their pods.

    Args:
        store: The API server's objects.
        pod_backoff: Seconds before the first replacement of a failed pod, doubling
            with each further failure (the real controller starts at 10 s).
    """

    def __init__(self, store: ObjectStore, *, pod_backoff: float = 0.0):
        self.store = store
        self.pod_backoff = pod_backoff
        self._jobs = store.resource("batch", "v1", "jobs")
        self._pods = store.resource("", "v1", "pods")
        self._tracks: dict[str, _JobTrack] = {}
        self._loop = _ControlLoop("JobController", store, self._reconcile)

    def start(self) -> Self:
        self._loop.start()
        return self

    def stop(self) -> None:
        self._loop.stop()
        self._loop.raise_errors()

    def _reconcile(self) -> None:
        jobs = self.store.objects(self._jobs)
        live = {job["metadata"]["uid"] for job in jobs}
        for uid in [uid for uid in self._tracks if uid not in live]:
            del self._tracks[uid]
        for job in jobs:
            try:
                self._reconcile_job(job)
            except ApiError as error:
                if error.code not in (404, 409):
                    raise

    def _reconcile_job(self, job: Object) -> None:
        metadata, spec = job["metadata"], job["spec"]
        status = job.get("status") or {}
        track = self._tracks.setdefault(metadata["uid"], _JobTrack())
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        if _true(conditions, "Complete") or _true(conditions, "Failed"):
            self._expire(job, track)
            return
        if metadata.get("deletionTimestamp") or spec.get("suspend"):
            return
        now = time.monotonic()
        if track.started is None:
            track.started = now
        selector = parse_label_selector(f"{JOB_UID_LABEL}={metadata['uid']}")
        pods = [
            pod
            for pod in self.store.objects(self._pods, Selection(metadata["namespace"], selector))
            if any(
                ref.get("uid") == metadata["uid"]
                for ref in pod["metadata"].get("ownerReferences") or []
            )
        ]
        for pod in pods:
            phase = pod.get("status", {}).get("phase")
            uid = pod["metadata"]["uid"]
            if phase == "Succeeded":
                track.succeeded.add(uid)
            elif phase == "Failed" and uid not in track.failed:
                track.failed.add(uid)
                track.last_failure = now
        terminating = [
            p for p in pods if p["metadata"].get("deletionTimestamp") and not _finished(p)
        ]
        active = [
            p for p in pods if not _finished(p) and not p["metadata"].get("deletionTimestamp")
        ]
        restarts = sum(
            s.get("restartCount", 0)
            for p in active
            for s in p.get("status", {}).get("containerStatuses") or []
        )
        ending = _true(conditions, "FailureTarget") or _true(conditions, "SuccessCriteriaMet")
        if not ending:
            verdict = self._verdict(spec, track, restarts, now)
            if verdict is not None:
                kind, reason, message = verdict
                _set_job_condition(conditions, kind, reason, message)
                ending = True
        if ending:
            for pod in active:
                self.store.delete(self._pods, metadata["namespace"], pod["metadata"]["name"])
            terminating += active
            active = []
            if not terminating:
                self._finish(conditions, track, now)
        else:
            wanted = min(spec["parallelism"], spec["completions"] - len(track.succeeded)) - len(
                active
            )
            backoff = self.pod_backoff * 2 ** (len(track.failed) - 1) if track.failed else 0.0
            if wanted > 0 and now >= track.last_failure + min(backoff, 360.0):
                for _ in range(wanted):
                    active.append(self._create_pod(job))
        self._write_status(job, status, active, terminating, track, conditions)

    @staticmethod
    def _verdict(
        spec: Object, track: _JobTrack, restarts: int, now: float
    ) -> tuple[str, str, str] | None:
        if len(track.succeeded) >= spec["completions"]:
            return (
                "SuccessCriteriaMet",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            )
        limit = spec["backoffLimit"]
        # With OnFailure the kubelet restarts containers in place, and the controller
        # counts those restarts instead (pastBackoffLimitOnFailure).
        on_failure = spec["template"]["spec"].get("restartPolicy") == "OnFailure"
        restarted_out = on_failure and (restarts > 0 if limit == 0 else restarts >= limit)
        if len(track.failed) > limit or restarted_out:
            return (
                "FailureTarget",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            )
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None and track.started is not None and now - track.started >= deadline:
            return (
                "FailureTarget",
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
            )
        return None

    @staticmethod
    def _finish(conditions: dict[str, Object], track: _JobTrack, now: float) -> None:
        if _true(conditions, "SuccessCriteriaMet"):
            source = conditions["SuccessCriteriaMet"]
            _set_job_condition(conditions, "Complete", source["reason"], source["message"])
        else:
            source = conditions["FailureTarget"]
            _set_job_condition(conditions, "Failed", source["reason"], source["message"])
        track.finished = now

    def _create_pod(self, job: Object) -> Object:
        metadata, template = job["metadata"], job["spec"]["template"]
        template_meta = template.get("metadata") or {}
        pod = {
            "metadata": {
                "generateName": f"{metadata['name']}-",
                "labels": dict(template_meta.get("labels") or {}),
                "annotations": dict(template_meta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": metadata["name"],
                        "uid": metadata["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template["spec"],
        }
        return self.store.create(self._pods, metadata["namespace"], pod)

    def _write_status(
        self,
        job: Object,
        status: Object,
        active: list[Object],
        terminating: list[Object],
        track: _JobTrack,
        conditions: dict[str, Object],
    ) -> None:
        ready = sum(
            1
            for p in active
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions") or []
            )
        )
        new: Object = {
            "startTime": status.get("startTime") or now_rfc3339(),
            "active": len(active),
            "ready": ready,
            "terminating": len(terminating),
            "succeeded": len(track.succeeded),
            "failed": len(track.failed),
            "uncountedTerminatedPods": {},
        }
        for key in ("active", "succeeded", "failed"):
            if not new[key]:
                del new[key]
        if conditions:
            new["conditions"] = list(conditions.values())
        if _true(conditions, "Complete"):
            new["completionTime"] = status.get("completionTime") or now_rfc3339()
        if new == status:
            return
        metadata = job["metadata"]

        def change(obj: Object) -> None:
            obj["status"] = new

        self.store.update(
            self._jobs, metadata["namespace"], metadata["name"], change, subresource="status"
        )

    def _expire(self, job: Object, track: _JobTrack) -> None:
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None or job["metadata"].get("deletionTimestamp"):
            return
        if track.finished is None:
            track.finished = time.monotonic()
        if time.monotonic() >= track.finished + ttl:
            metadata = job["metadata"]
            self.store.delete(
                self._jobs, metadata["namespace"], metadata["name"], propagation="Foreground"
            )


def _true(conditions: Mapping[str, Object], kind: str) -> bool:
    return conditions.get(kind, {}).get("status") == "True"


def _finished(pod: Object) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def _set_job_condition(conditions: dict[str, Object], kind: str, reason: str, message: str) -> None:
    now = now_rfc3339()
    conditions[kind] = {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


# ---------------------------------------------------------------------------
# Control loops and the assembled cluster.
# ---------------------------------------------------------------------------


class _ControlLoop:
    """Calls ``reconcile`` after every change to the store, and at least every ``tick``."""

    def __init__(
        self, name: str, store: ObjectStore, reconcile: Callable[[], None], tick: float = 0.05
    ):
        self._store = store
        self._reconcile = reconcile
        self._tick = tick
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.errors: list[BaseException] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def raise_errors(self) -> None:
        """Fail loudly: a controller that crashed would otherwise just hang the test."""
        if self.errors:
            raise RuntimeError(f"{self._thread.name} failed") from self.errors[0]

    def _run(self) -> None:
        seen = -1
        while not self._stopping.is_set():
            seen = self._store.wait_for_change(seen, self._tick)
            try:
                self._reconcile()
            except Exception as error:
                logger.exception("%s failed to reconcile", self._thread.name)
                self.errors.append(error)
                return
            if self._store.closed:
                return


class KubeCluster:
    """The API server double with a Job controller and a node agent: a one-node
    cluster whose Jobs run as local processes (or however ``runtime`` runs them).

    Args:
        work_dir: Where pods, volumes and logs go.
        runtime: How containers run; local processes with :func:`use_this_python`.
        claims: PVC claimName → local folder (see :class:`NodeAgent`).
        history: Watch events kept (see :class:`ObjectStore`).
        create_namespaces: Create namespaces on first use (see :class:`ObjectStore`).
        pod_backoff: See :class:`JobController`.
        max_grace_seconds: See :class:`NodeAgent`.

    Example::

        with KubeCluster(tmp_path) as cluster:
            configuration = kubernetes.client.Configuration(host=cluster.url)
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        runtime: ContainerRuntime | None = None,
        claims: Mapping[str, Path] | None = None,
        history: int = 10_000,
        create_namespaces: bool = True,
        pod_backoff: float = 0.0,
        max_grace_seconds: float = 2.0,
    ):
        self.store = ObjectStore(history=history, create_namespaces=create_namespaces)
        self.node = NodeAgent(
            self.store,
            runtime or LocalProcesses(prepare=use_this_python),
            work_dir,
            claims=claims,
            max_grace_seconds=max_grace_seconds,
        )
        self.jobs = JobController(self.store, pod_backoff=pod_backoff)
        self.server = KubeApiServer(self.store, logs=self.node)
        self.work_dir = work_dir

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> Self:
        self.server.start()
        self.node.start()
        self.jobs.start()
        return self

    def stop(self) -> None:
        """Stop the controllers (killing what still runs), then the server."""
        try:
            self.jobs.stop()
        finally:
            try:
                self.node.stop()
            finally:
                self.server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
