"""The Kubernetes executor: each run a ``batch/v1`` Job on a GPU node.

The service creates the Job with the official ``kubernetes`` client and watches it and
its pods (list, then watch from the list's ``resourceVersion``; a watch answered 410
Gone lists again). The run's state follows them:

- PENDING: the Job has no pod yet, or its pod waits (scheduling, pulling the image);
  the message says why (``Unschedulable: 0/4 nodes have nvidia.com/gpu``).
- RUNNING: a pod of it runs. A failed pod the Job replaces (``backoffLimit``) counts
  as a restart; the new pod resumes from the last checkpoint.
- SUCCEEDED / FAILED: the Job's ``Complete`` / ``Failed`` condition, the failure with
  its reason and the last pod's (``BackoffLimitExceeded: …; pod …: OOMKilled, exit
  code 137``).
- CANCELLED: cancel deletes the Job in the foreground: its pod gets SIGTERM, saves a
  checkpoint at its next step and exits, then the Job is gone.

The run's process writes its reports on stdout; the executor follows each pod's log
and applies them (metrics, the outputs). Reports repeat harmlessly, so a log read
again from its start (a reconnect, a restart of the service) changes nothing.

The Jobs carry the run id in a label; the service's run records (see
:mod:`unsafechain.training.runs`) keep everything else, since a finished Job is
deleted after ``ttlSecondsAfterFinished`` and a cancelled one at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import kubernetes
import urllib3
from kubernetes.client import ApiClient, BatchV1Api, CoreV1Api
from kubernetes.client.rest import ApiException

from unsafechain.training.local import launch_arguments
from unsafechain.training.manager import Executor, TrainingManager
from unsafechain.training.reporting import parse_report
from unsafechain.training.runs import RunRecord
from unsafechain.training.settings import KubernetesExecutorSettings

logger = logging.getLogger(__name__)

RUN_LABEL = "unsafechain.io/run-id"
MANAGED_BY = "unsafechain-training-service"
CONTAINER = "train"

Object = dict[str, Any]


def job_name(run_id: str) -> str:
    """The Job of a run: ``unsafechain-train-20261202-031500-1a2b3c4d``."""
    return f"unsafechain-train-{run_id.removeprefix('run-')}"[:63].rstrip("-")


def run_labels(settings: KubernetesExecutorSettings, run_id: str) -> dict[str, str]:
    """The labels of a run's Job and pod: the standard ``app.kubernetes.io`` ones and
    the run id."""
    return {
        "app.kubernetes.io/name": "unsafechain",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/part-of": "unsafechain",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/instance": settings.instance,
        RUN_LABEL: run_id,
    }


def selector(settings: KubernetesExecutorSettings) -> str:
    """The label selector of this service's Jobs and pods."""
    return (
        f"app.kubernetes.io/managed-by={MANAGED_BY},app.kubernetes.io/instance={settings.instance}"
    )


def job_manifest(run: RunRecord, settings: KubernetesExecutorSettings) -> Object:
    """The Job that runs ``run``."""
    labels = run_labels(settings, run.id)
    resources: Object = {"requests": {}, "limits": {}}
    if settings.gpus:
        resources["limits"]["nvidia.com/gpu"] = str(settings.gpus)
        resources["requests"]["nvidia.com/gpu"] = str(settings.gpus)
    if settings.cpu:
        resources["requests"]["cpu"] = settings.cpu
    if settings.memory:
        resources["requests"]["memory"] = settings.memory
        resources["limits"]["memory"] = settings.memory
    env: list[Object] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"},
        {"name": "UNSAFECHAIN_RUN_ID", "value": run.id},
    ]
    if settings.hub_token_secret is not None:
        secret = settings.hub_token_secret
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}},
            }
        )
    env += [{"name": name, "value": value} for name, value in sorted(settings.env.items())]
    volumes: list[Object] = []
    mounts: list[Object] = []
    for name, volume in (("dataset", settings.dataset_volume), ("output", settings.output_volume)):
        if volume is None:
            continue
        claim = {"claimName": volume.claim, "readOnly": volume.read_only}
        volumes.append({"name": name, "persistentVolumeClaim": claim})
        mounts.append({"name": name, "mountPath": volume.mount_path, "readOnly": volume.read_only})
    if settings.shm_size:
        volumes.append(
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}
        )
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    container: Object = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.command),
        "args": launch_arguments(json.dumps(run.settings, sort_keys=True)),
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
    }
    pod_spec: Object = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "containers": [container],
        "volumes": volumes,
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [
            toleration.model_dump(exclude_none=True) for toleration in settings.tolerations
        ]
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    spec: Object = {
        "backoffLimit": settings.backoff_limit,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if settings.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    if settings.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(run.id),
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": {
                "unsafechain.io/request-id": run.request_id,
                "unsafechain.io/output": run.output_dir,
            },
        },
        "spec": spec,
    }


def api_client(settings: KubernetesExecutorSettings) -> ApiClient:
    """A client of the cluster: the kubeconfig named, else the pod's service account,
    else ``~/.kube/config``."""
    configuration = kubernetes.client.Configuration()
    if settings.kubeconfig is not None:
        kubernetes.config.load_kube_config(
            config_file=str(settings.kubeconfig),
            context=settings.context,
            client_configuration=configuration,
        )
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(
                context=settings.context, client_configuration=configuration
            )
    return ApiClient(configuration)


def _true_conditions(obj: Object) -> dict[str, Object]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in conditions if c.get("status") == "True"}


def _created(obj: Object) -> str:
    return str(obj["metadata"].get("creationTimestamp") or "")


def _container_state(pod: Object) -> Object:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER:
            return status
    return statuses[0] if statuses else {}


def pod_detail(pod: Object) -> str:
    """How a pod stands or ended, in words: ``pod x: OOMKilled, exit code 137``."""
    name = pod["metadata"]["name"]
    status = _container_state(pod)
    state = status.get("state") or {}
    if "terminated" in state:
        ended = state["terminated"]
        detail = f"{ended.get('reason') or 'terminated'}, exit code {ended.get('exitCode')}"
        if ended.get("message"):
            detail += f": {ended['message']}"
        return f"pod {name}: {detail}"
    if "waiting" in state:
        waiting = state["waiting"]
        message = f": {waiting['message']}" if waiting.get("message") else ""
        return f"pod {name}: {waiting.get('reason') or 'waiting'}{message}"
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"pod {name}: {condition.get('reason')}: {condition.get('message', '')}"
    return f"pod {name}: {(pod.get('status') or {}).get('phase', 'Pending')}"


class KubernetesExecutor(Executor):
    """Runs as Kubernetes Jobs.

    Args:
        settings: The executor's settings.
        client: The cluster's client (default: :func:`api_client`).
    """

    name = "kubernetes"

    def __init__(self, settings: KubernetesExecutorSettings, client: ApiClient | None = None):
        self._settings = settings
        self._client = client
        self._manager: TrainingManager | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._jobs: dict[str, Object] = {}
        # Runs whose Job a list or a watch has shown (or shown deleted): a Job this
        # service created and no watch has shown yet is the one the create returned.
        self._jobs_seen: set[str] = set()
        self._pods: dict[str, dict[str, Object]] = {}
        self._synced: set[str] = set()
        self._following: set[str] = set()
        self._reported_failures: dict[str, str] = {}
        self._threads: list[threading.Thread] = []
        self._timeout = settings.request_timeout_seconds

    @property
    def manager(self) -> TrainingManager:
        assert self._manager is not None, "the executor is not started"
        return self._manager

    async def start(self, manager: TrainingManager, runs: list[RunRecord]) -> None:
        self._manager = manager
        self._loop = asyncio.get_running_loop()
        if self._client is None:
            self._client = await asyncio.to_thread(api_client, self._settings)
        batch, core = BatchV1Api(self._client), CoreV1Api(self._client)
        # One listing before serving, so runs are known as the cluster has them.
        jobs = await asyncio.to_thread(self._list, batch.list_namespaced_job)
        pods = await asyncio.to_thread(self._list, core.list_namespaced_pod)
        self._relisted("jobs", jobs["items"])
        self._relisted("pods", pods["items"])
        for run in runs:
            if run.id not in self._jobs and not run.executor_ref and not run.cancel_requested:
                # Recorded, but the service stopped before the Job was created.
                await self.launch(run)
            else:
                self._reconcile(run.id)
        for kind, list_call, version in (
            ("jobs", batch.list_namespaced_job, jobs["metadata"]["resourceVersion"]),
            ("pods", core.list_namespaced_pod, pods["metadata"]["resourceVersion"]),
        ):
            self._thread(f"watch-{kind}", self._watch, kind, list_call, version)

    async def launch(self, run: RunRecord) -> None:
        batch = BatchV1Api(self._client)
        manifest = job_manifest(run, self._settings)
        name = manifest["metadata"]["name"]
        try:
            created = await asyncio.to_thread(
                batch.create_namespaced_job,
                self._settings.namespace,
                manifest,  # type: ignore[arg-type]  # the client sends a dict as it is
                _request_timeout=self._timeout,
            )
        except ApiException as error:
            if error.status != 409:
                self.manager.update(
                    run.id,
                    state="failed",
                    message=f"the Job could not be created: {_api_problem(error)}",
                )
                return
            logger.info("run %s: its Job %s exists already", run.id, name)
            created = None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            self.manager.update(
                run.id, state="failed", message=f"the Kubernetes API is unreachable: {error}"
            )
            return
        if created is not None and run.id not in self._jobs_seen:
            # The watch may not have delivered it yet: without this, a reconcile before
            # it does would take the Job for one deleted outside the service.
            assert self._client is not None
            self._jobs[run.id] = self._client.sanitize_for_serialization(created)
        # The watches may have seen the Job and its pod already.
        self.manager.update(run.id, executor_ref=f"job/{self._settings.namespace}/{name}")
        logger.info("run %s: Job %s/%s created", run.id, self._settings.namespace, name)
        self._reconcile(run.id)

    async def cancel(self, run: RunRecord) -> None:
        batch = BatchV1Api(self._client)
        body = kubernetes.client.V1DeleteOptions(propagation_policy="Foreground")
        try:
            await asyncio.to_thread(
                batch.delete_namespaced_job,
                job_name(run.id),
                self._settings.namespace,
                body=body,
                _request_timeout=self._timeout,
            )
        except ApiException as error:
            if error.status != 404:
                raise
            self.manager.update(run.id, state="cancelled", message="cancelled; its Job was gone")
            return
        self.manager.update(run.id, message="cancelling: its pod saves a checkpoint and stops")

    async def check(self) -> None:
        batch = BatchV1Api(self._client)
        await asyncio.to_thread(
            batch.list_namespaced_job,
            self._settings.namespace,
            limit=1,
            _request_timeout=self._timeout,
        )

    async def aclose(self) -> None:
        """Stop watching; the Jobs go on, and the service finds them when it starts
        again."""
        self._stop.set()
        if self._client is not None:
            self._client.close()

    # Threads: list, watch, follow logs. Their findings go to the event loop. ---------

    def _thread(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        if self._stop.is_set() or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            # The loop is closed: the service has stopped.
            self._stop.set()

    def _list(self, list_call: Callable[..., Any]) -> Object:
        response = list_call(
            self._settings.namespace,
            label_selector=selector(self._settings),
            _request_timeout=self._timeout,
            _preload_content=False,
        )
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    def _watch(self, kind: str, list_call: Callable[..., Any], version: str | None) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if version is None:
                    listing = self._list(list_call)
                    self._post(self._relisted, kind, listing["items"])
                    version = listing["metadata"]["resourceVersion"]
                watch = kubernetes.watch.Watch()
                for event in watch.stream(
                    list_call,
                    self._settings.namespace,
                    label_selector=selector(self._settings),
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=self._settings.watch_seconds,
                    _request_timeout=self._settings.watch_seconds + self._timeout,
                    deserialize=False,
                ):
                    if self._stop.is_set():
                        watch.stop()
                        break
                    obj = event["object"]
                    version = obj["metadata"].get("resourceVersion", version)
                    if event["type"] != "BOOKMARK":
                        self._post(self._observed, kind, event["type"], obj)
                backoff = 1.0
            except ApiException as error:
                if error.status == 410:
                    logger.info("%s watch expired (410 Gone): listing again", kind)
                    version = None
                    continue
                logger.warning("%s watch failed: %s", kind, _api_problem(error))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
                if self._stop.is_set():
                    return
                logger.warning("%s watch broke (%s): watching again", kind, error)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _follow_log(self, run_id: str, pod: str) -> None:
        core = CoreV1Api(self._client)
        seen = 0
        while not self._stop.is_set():
            count = 0
            try:
                for line in kubernetes.watch.Watch().stream(
                    core.read_namespaced_pod_log,
                    pod,
                    self._settings.namespace,
                    container=CONTAINER,
                    _request_timeout=(self._timeout, self._settings.watch_seconds),
                ):
                    count += 1
                    if count <= seen:
                        continue
                    seen = count
                    report = parse_report(line)
                    if report is not None:
                        self._post(self._reported, run_id, report)
                    if self._stop.is_set():
                        return
                state = core.read_namespaced_pod(
                    pod, self._settings.namespace, _request_timeout=self._timeout
                )
                if state.status and state.status.phase in ("Succeeded", "Failed"):
                    return
            except ApiException as error:
                if error.status == 404:
                    return
                if error.status == 400:
                    # The container has not started yet (ContainerCreating).
                    self._stop.wait(1.0)
                    continue
                logger.warning("log of pod %s: %s", pod, _api_problem(error))
                self._stop.wait(2.0)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                # A quiet log outlasted the read timeout, or the connection broke:
                # read again, skipping the lines already seen.
                logger.debug("log of pod %s: %s; reading again", pod, error)

    # On the event loop. -------------------------------------------------------------

    def _relisted(self, kind: str, items: list[Object]) -> None:
        by_run: dict[str, Any] = {}
        if kind == "jobs":
            by_run = {item["metadata"]["labels"][RUN_LABEL]: item for item in items}
            affected = set(self._jobs) | set(by_run)
            self._jobs = by_run
            self._jobs_seen |= set(by_run)
        else:
            pods: dict[str, dict[str, Object]] = {}
            for item in items:
                run_id = item["metadata"]["labels"][RUN_LABEL]
                pods.setdefault(run_id, {})[item["metadata"]["name"]] = item
            affected = set(self._pods) | set(pods)
            self._pods = pods
        self._synced.add(kind)
        for run_id in affected:
            self._reconcile(run_id)

    def _observed(self, kind: str, event_type: str, obj: Object) -> None:
        run_id = (obj["metadata"].get("labels") or {}).get(RUN_LABEL)
        if run_id is None:
            return
        if kind == "jobs":
            self._jobs_seen.add(run_id)
            if event_type == "DELETED":
                if _finished(obj) and run_id in self._jobs:
                    # Deleted once finished (its TTL): its last state decides the run.
                    self._jobs[run_id] = obj
                    self._reconcile(run_id)
                self._jobs.pop(run_id, None)
            else:
                self._jobs[run_id] = obj
        else:
            pods = self._pods.setdefault(run_id, {})
            if event_type == "DELETED":
                pods.pop(obj["metadata"]["name"], None)
            else:
                pods[obj["metadata"]["name"]] = obj
        self._reconcile(run_id)

    def _reported(self, run_id: str, report: dict[str, Any]) -> None:
        if self.manager.run_for(run_id) is None:
            return
        if report.get("report") == "failed" and isinstance(report.get("message"), str):
            self._reported_failures[run_id] = report["message"]
        self.manager.report(run_id, report)

    def _reconcile(self, run_id: str) -> None:
        run = self.manager.run_for(run_id)
        if run is None or run.executor != self.name:
            return
        pods = sorted(self._pods.get(run_id, {}).values(), key=_created)
        for pod in pods:
            name = pod["metadata"]["name"]
            started = (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")
            if started and name not in self._following:
                self._following.add(name)
                self._thread(f"log-{name}", self._follow_log, run_id, name)
        if run.terminal:
            return
        job = self._jobs.get(run_id)
        if job is None:
            if run.cancel_requested:
                self.manager.update(
                    run_id,
                    state="cancelled",
                    message=f"cancelled at step {run.step}; its checkpoints are in "
                    f"{run.output_dir}",
                )
            elif run.executor_ref and {"jobs", "pods"} <= self._synced:
                self.manager.update(
                    run_id,
                    state="failed",
                    message=f"its Job {run.executor_ref} was deleted outside the service",
                )
            return
        failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        # Each pod after the first replaced a failed one; a container may restart too.
        restarts = max(len(pods) - 1, 0) + sum(
            int(_container_state(p).get("restartCount") or 0) for p in pods
        )
        conditions = _true_conditions(job)
        if "Complete" in conditions:
            self.manager.update(run_id, state="succeeded", message="", restarts=restarts)
            return
        if "Failed" in conditions:
            condition = conditions["Failed"]
            parts = [f"{condition.get('reason')}: {condition.get('message', '')}".strip()]
            if failed_pods:
                parts.append(pod_detail(failed_pods[-1]))
            if run_id in self._reported_failures:
                parts.append(self._reported_failures[run_id])
            self.manager.update(run_id, state="failed", message="; ".join(parts), restarts=restarts)
            return
        if job["metadata"].get("deletionTimestamp") or run.cancel_requested:
            return
        latest = pods[-1] if pods else None
        phase = (latest.get("status") or {}).get("phase") if latest else None
        if latest is None:
            self.manager.update(
                run_id,
                state="pending",
                message="Job created, waiting for its pod",
                restarts=restarts,
            )
        elif phase == "Pending":
            self.manager.update(
                run_id, state="pending", message=pod_detail(latest), restarts=restarts
            )
        elif phase == "Running":
            self.manager.update(run_id, state="running", message="", restarts=restarts)
        elif phase == "Failed":
            self.manager.update(
                run_id,
                message=f"{pod_detail(latest)}; the Job starts another pod, which resumes from "
                "the last checkpoint",
                restarts=restarts,
            )


def _api_problem(error: ApiException) -> str:
    """The message of an API error's ``Status`` object, else its reason."""
    try:
        status = json.loads(error.body or "")
        return f"{status.get('reason')}: {status.get('message')}"
    except (ValueError, AttributeError):
        return f"{error.status} {error.reason}"


def _finished(job: Object) -> bool:
    """Whether the Job has its Complete or Failed condition."""
    return bool({"Complete", "Failed"} & set(_true_conditions(job)))
