"""A test double of the Kubernetes API server, for what the platform uses.

No Kubernetes API server can be installed on the machines the tests run on (kind, k3s,
envtest and kwok are not available), so this local HTTP server follows the Kubernetes
REST API's paths, shapes, status codes and error ``Status`` objects closely enough that
the official ``kubernetes`` Python client and ``kubectl`` talk to it unchanged:

- discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/{group}``,
  ``/apis/{group}/{version}`` (``APIVersions``, ``APIGroupList``, ``APIResourceList``
  with verbs, ``namespaced``, ``kind``, ``singularName``, short names, subresources);
- the kinds of :data:`tests.support.kube_store.RESOURCES` (Namespaces, Pods, Secrets,
  ConfigMaps, Services, ServiceAccounts, PersistentVolumeClaims, ``batch/v1`` Jobs,
  ``apps/v1`` Deployments, RBAC Roles and RoleBindings, NetworkPolicies,
  PodDisruptionBudgets, CustomResourceDefinitions) and the custom kinds each stored
  CustomResourceDefinition defines (validated against its ``openAPIV3Schema``), with
  create, get, list (label and field selectors, ``limit`` / ``continue``), replace
  (optimistic concurrency), patch (JSON, merge and strategic merge), delete
  (propagation policies, preconditions, graceful pod deletion), deletecollection, the
  ``status`` subresource, ``pods/binding`` and ``dryRun``;
- watch (``?watch=1``) from a ``resourceVersion``, newline-delimited JSON events,
  ``timeoutSeconds``, ``allowWatchBookmarks``, and a 410 Expired ERROR event for a
  version older than the history kept (:class:`~tests.support.kube_store.ObjectStore`'s
  ``history``);
- pod logs (``pods/{name}/log`` with ``container``, ``follow``, ``tailLines``,
  ``limitBytes``, ``previous``) read from a :class:`ContainerLogs` source, which the
  node agent of :mod:`tests.support.kube_jobs` provides;
- Table responses (``Accept: …;as=Table``) with the generic Name / Created At columns,
  so ``kubectl get`` prints;
- field validation (``fieldValidation`` Strict / Warn, the default / Ignore) of the
  built-in kinds against the Kubernetes schemas (:mod:`tests.support.kube_schemas`),
  and the OpenAPI documents clients read to learn that the server validates: the v3
  discovery document and per group version the ``patch`` operations with their
  ``fieldValidation`` parameter, and an OpenAPI v2 document without definitions;
- request bodies in the Kubernetes protobuf encoding for the kinds helm's release
  storage sends that way (:mod:`tests.support.kube_protobuf`).

It is a test double, not a Kubernetes. There is no scheduler beyond the node agent of
the tests binding every pod to itself, no admission control, no authentication or
RBAC (any credentials are accepted), no real containers or images, no server-side
apply, no schemas in its OpenAPI documents (``kubectl explain`` finds nothing), no
protobuf answers (JSON, which the clients accept) or CBOR, no pruning of unknown fields
under Warn (they are kept), and no controllers but the Job controller and node agent
that tests start beside it (no Deployment controller: a Deployment never becomes
available, so ``helm --wait`` cannot finish). Lists are read from the current
state rather than a snapshot at their ``resourceVersion``.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.support import kube_protobuf
from tests.support.http_servers import LoopbackHTTPServer, LoopbackServer, RecordedRequest
from tests.support.kube_schemas import KUBERNETES_VERSION as SCHEMA_VERSION
from tests.support.kube_store import (
    ApiError,
    Cause,
    Object,
    ObjectStore,
    Resource,
    Selection,
)

_MAJOR, _MINOR, _PATCH = SCHEMA_VERSION.split(".")
KUBERNETES_VERSION = {"major": _MAJOR, "minor": _MINOR, "gitVersion": f"v{SCHEMA_VERSION}-double"}
"""The version the double reports: the release whose schemas it validates with."""
JOB_ORPHAN_WARNING = (
    '299 - "child pods are preserved by default when jobs are deleted; set '
    "propagationPolicy=Background to remove them or set propagationPolicy=Orphan to "
    'suppress this warning"'
)

# ---------------------------------------------------------------------------
# Where pod logs come from.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogFile:
    """A container's captured output.

    Attributes:
        path: The file stdout and stderr are written to.
        running: Whether the container may still write to it (``follow`` waits).
    """

    path: Path
    running: Callable[[], bool]


class ContainerLogs(Protocol):
    """What the node agent offers the API server: the logs of its containers."""

    def log_file(
        self, namespace: str, pod: str, container: str, *, previous: bool
    ) -> LogFile | None:
        """The log of the container's current (or, with ``previous``, last) run; None
        when it has not started (or has no previous run)."""
        ...


# ---------------------------------------------------------------------------
# HTTP plumbing.
# ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LoopbackHTTPServer

    def do_GET(self) -> None:
        self.server.app.serve(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the recorded requests are the log."""


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any

    def flag(self, name: str) -> bool:
        """A boolean query parameter, parsed as Go's strconv.ParseBool does."""
        return self.query.get(name, "").lower() in ("1", "t", "true")

    def integer(self, name: str) -> int | None:
        value = self.query.get(name)
        if value in (None, ""):
            return None
        try:
            return int(value)
        except ValueError:
            raise ApiError.bad_request(f"invalid value {value!r} for {name}") from None


@dataclass(frozen=True, slots=True)
class _Target:
    """What a resource path names."""

    resource: Resource
    namespace: str | None
    name: str = ""
    subresource: str = ""


class _Stream:
    """A chunked response body that is written as it is produced."""

    def __init__(self, handler: _Handler, content_type: str):
        self._handler = handler
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Cache-Control", "no-cache, private")
        handler.end_headers()

    def write(self, data: bytes) -> None:
        if data:
            self._handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self._handler.wfile.flush()

    def close(self) -> None:
        self._handler.wfile.write(b"0\r\n\r\n")
        self._handler.wfile.flush()

    def client_gone(self) -> bool:
        """Whether the client hung up (a watch stopped, a log follower closed)."""
        connection: socket.socket = self._handler.connection
        try:
            readable, _, _ = select.select([connection], [], [], 0)
            return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


# ---------------------------------------------------------------------------
# The server.
# ---------------------------------------------------------------------------


class KubeApiServer(LoopbackServer):
    """The API server double on a free loopback port, serving an :class:`ObjectStore`.

    Args:
        store: The objects; a fresh store with the default namespaces when omitted.
        logs: Where pod logs come from (the node agent); without one, log requests
            answer as for a container that has not started.
        bookmark_interval: Seconds between BOOKMARK events of watches that allow them.

    Example::

        with KubeApiServer() as server:
            configuration = kubernetes.client.Configuration(host=server.url)
            ...
    """

    def __init__(
        self,
        store: ObjectStore | None = None,
        *,
        logs: ContainerLogs | None = None,
        bookmark_interval: float = 1.0,
    ):
        self.store = store if store is not None else ObjectStore()
        self.logs = logs
        self.bookmark_interval = bookmark_interval
        super().__init__()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self.warnings: list[str] = []
        """The field validation warnings the server answered with (``Warning``)."""

    handler = _Handler

    def closing(self) -> None:
        """Open watches and log streams end."""
        self.store.close()

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """Write a kubeconfig whose current context points at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "any-token-is-accepted"}}],
            "contexts": [
                {
                    "name": "double",
                    "context": {"cluster": "double", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "double",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # Serving -----------------------------------------------------------------------

    def serve(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        headers = {name.lower(): value for name, value in handler.headers.items()}
        length = int(headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            if raw and headers.get("content-type", "").startswith(kube_protobuf.MEDIA_TYPE):
                body = kube_protobuf.decode(raw)
            else:
                body = json.loads(raw) if raw else None
        except kube_protobuf.ProtobufError as error:
            self._write_json(handler, 415, ApiError(415, "UnsupportedMediaType", str(error)).status)
            return
        except ValueError:
            body = _NOT_JSON
        with self._lock:
            self._requests.append(
                RecordedRequest(
                    handler.command,
                    handler.path,
                    headers,
                    None if body is _NOT_JSON else body,
                    time.monotonic(),
                )
            )
        request = _Request(handler.command, split.path.rstrip("/") or "/", query, headers, body)
        try:
            if body is _NOT_JSON:
                raise ApiError.bad_request("the body of the request could not be decoded as JSON")
            self._dispatch(request, handler)
        except ApiError as error:
            self._write_json(handler, error.code, error.status)
        except ConnectionError:
            handler.close_connection = True

    def _dispatch(self, request: _Request, handler: _Handler) -> None:
        path = request.path
        if request.method == "GET" and path in ("/healthz", "/readyz", "/livez"):
            self._write(handler, 200, b"ok", "text/plain; charset=utf-8")
            return
        if request.method == "GET" and path == "/version":
            self._write_json(handler, 200, _version())
            return
        if request.method == "GET" and path == "/openapi/v2":
            document = kube_protobuf.openapi_v2_document(
                "Kubernetes", KUBERNETES_VERSION["gitVersion"]
            )
            self._write(handler, 200, document, "application/octet-stream")
            return
        if request.method == "GET" and (path == "/openapi/v3" or path.startswith("/openapi/v3/")):
            self._write_json(handler, 200, self._openapi_v3(path.removeprefix("/openapi/v3")))
            return
        discovery = self._discovery(path) if request.method == "GET" else None
        if discovery is not None:
            self._write_json(handler, 200, discovery)
            return
        target = self._target(path)
        if target is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self._serve_resource(request, target, handler)

    # Discovery -----------------------------------------------------------------------

    def _group_versions(self) -> dict[str, list[Resource]]:
        versions: dict[str, list[Resource]] = {}
        for resource in self.store.resources:
            versions.setdefault(resource.api_version, []).append(resource)
        return versions

    def _discovery(self, path: str) -> Object | None:
        versions = self._group_versions()
        groups = sorted({r.group for r in self.store.resources if r.group})
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": sorted(v for v in versions if "/" not in v),
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}
                ],
            }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [self._api_group(group, versions) for group in groups],
            }
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 2 and parts[1] in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **self._api_group(parts[1], versions)}
        group_version = parts[1] if parts[0] == "api" and len(parts) == 2 else None
        if parts[0] == "apis" and len(parts) == 3:
            group_version = f"{parts[1]}/{parts[2]}"
        if group_version in versions:
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": [
                    entry for r in versions[group_version] for entry in _api_resources(r)
                ],
            }
        return None

    @staticmethod
    def _api_group(group: str, versions: dict[str, list[Resource]]) -> Object:
        served = [
            {"groupVersion": gv, "version": gv.split("/", 1)[1]}
            for gv in sorted(versions)
            if gv.startswith(f"{group}/")
        ]
        return {"name": group, "versions": served, "preferredVersion": served[0]}

    def _warn(self, warnings: list[str]) -> list[tuple[str, str]]:
        """``Warning`` headers for field validation findings, also kept in
        :attr:`warnings` for the tests."""
        with self._lock:
            self.warnings.extend(warnings)
        return [("Warning", f'299 - "{text}"') for text in warnings]

    # OpenAPI v3 ----------------------------------------------------------------------

    def _openapi_v3(self, path: str) -> Object:
        """The OpenAPI v3 discovery document (``/openapi/v3``: one entry per group
        version) or one group version's document: a path per kind with the ``patch``
        operation kubectl and helm read to learn that the server validates fields
        (``fieldValidation``) itself. No schemas are published (``kubectl explain``
        finds nothing); validation happens on the server."""
        versions = self._group_versions()
        if not path:
            return {
                "paths": {
                    _openapi_key(gv): {
                        "serverRelativeURL": f"/openapi/v3/{_openapi_key(gv)}?hash="
                        + hashlib.sha256(json.dumps(sorted(r.plural for r in rs)).encode())
                        .hexdigest()[:32]
                        .upper()
                    }
                    for gv, rs in sorted(versions.items())
                }
            }
        wanted = path.strip("/")
        for gv, resources in versions.items():
            if _openapi_key(gv) == wanted:
                return {
                    "openapi": "3.0.0",
                    "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION["gitVersion"]},
                    "paths": {
                        item_path: item
                        for resource in resources
                        for item_path, item in _openapi_paths(resource).items()
                    },
                    "components": {"schemas": {}},
                }
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    # Resources -----------------------------------------------------------------------

    def _target(self, path: str) -> _Target | None:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        plurals = {
            r.plural: r for r in self.store.resources if (r.group, r.version) == (group, version)
        }
        namespace = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and rest[2] in plurals
            and plurals[rest[2]].namespaced
        ):
            namespace, rest = rest[1], rest[2:]
        resource = plurals.get(rest[0])
        if resource is None or len(rest) > 3:
            return None
        name = rest[1] if len(rest) > 1 else ""
        subresource = rest[2] if len(rest) > 2 else ""
        if resource.namespaced and namespace is None and name:
            return None
        if subresource and subresource not in resource.subresources:
            return None
        return _Target(resource, namespace, name, subresource)

    def _serve_resource(self, request: _Request, target: _Target, handler: _Handler) -> None:
        store, method = self.store, request.method
        resource, namespace, name = target.resource, target.namespace, target.name
        dry_run = request.query.get("dryRun") == "All"
        validation = request.query.get("fieldValidation", "Warn")
        warnings: list[str] = []
        if target.subresource == "log":
            self._serve_log(request, target, handler)
            return
        if target.subresource == "binding":
            if method != "POST":
                raise _method_not_allowed(method)
            node = ((request.body or {}).get("target") or {}).get("name")
            if not node:
                raise ApiError.invalid(resource, name, [Cause.required("target.name")])
            store.bind(namespace or "", name, node)
            self._write_json(
                handler,
                201,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "code": 201,
                },
            )
            return
        if not name:
            if method == "GET" and request.flag("watch"):
                self._serve_watch(request, target, handler)
            elif method == "GET":
                listed = store.list(
                    resource,
                    namespace,
                    label_selector=request.query.get("labelSelector", ""),
                    field_selector=request.query.get("fieldSelector", ""),
                    limit=request.integer("limit") or 0,
                    continue_token=request.query.get("continue", ""),
                )
                self._write_object(request, handler, 200, listed)
            elif method == "POST":
                created = store.create(
                    resource,
                    namespace,
                    request.body,
                    dry_run=dry_run,
                    field_validation=validation,
                    warnings=warnings,
                )
                self._write_json(handler, 201, created, self._warn(warnings))
            elif method == "DELETE":
                options = _delete_options(request)
                deleted = store.delete_collection(
                    resource,
                    namespace,
                    label_selector=request.query.get("labelSelector", ""),
                    field_selector=request.query.get("fieldSelector", ""),
                    propagation=options.get("propagationPolicy"),
                )
                self._write_json(handler, 200, deleted)
            else:
                raise _method_not_allowed(method)
            return
        if method == "GET" and request.flag("watch"):
            self._serve_watch(request, target, handler)
        elif method == "GET":
            self._write_object(request, handler, 200, store.get(resource, namespace, name))
        elif method == "PUT":
            replaced = store.replace(
                resource,
                namespace,
                name,
                request.body,
                subresource=target.subresource,
                dry_run=dry_run,
                field_validation=validation,
                warnings=warnings,
            )
            self._write_json(handler, 200, replaced, self._warn(warnings))
        elif method == "PATCH":
            patched = store.patch(
                resource,
                namespace,
                name,
                request.body,
                request.headers.get("content-type", ""),
                subresource=target.subresource,
                dry_run=dry_run,
                field_validation=validation,
                warnings=warnings,
            )
            self._write_json(handler, 200, patched, self._warn(warnings))
        elif method == "DELETE" and not target.subresource:
            self._serve_delete(request, target, handler, dry_run)
        else:
            raise _method_not_allowed(method)

    def _serve_delete(
        self, request: _Request, target: _Target, handler: _Handler, dry_run: bool
    ) -> None:
        options = _delete_options(request)
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        grace = options.get("gracePeriodSeconds")
        rules = self.store.rules(target.resource)
        deleted, gone = self.store.delete(
            target.resource,
            target.namespace,
            target.name,
            propagation=policy,
            grace_period=None if grace is None else int(grace),
            preconditions=options.get("preconditions"),
            dry_run=dry_run,
        )
        headers = []
        if target.resource.kind == "Job" and policy is None:
            headers.append(("Warning", JOB_ORPHAN_WARNING))
        if not gone or rules.returns_deleted_object:
            self._write_json(handler, 200, deleted, headers)
            return
        details = {
            "name": target.name,
            "kind": target.resource.plural,
            "uid": deleted["metadata"]["uid"],
        }
        if target.resource.group:
            details["group"] = target.resource.group
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }
        self._write_json(handler, 200, status, headers)

    # Watch -----------------------------------------------------------------------------

    def _serve_watch(self, request: _Request, target: _Target, handler: _Handler) -> None:
        field_selector = request.query.get("fieldSelector", "")
        if target.name:
            # A watch on one object is a watch on its collection selected by name.
            name_term = f"metadata.name={target.name}"
            field_selector = f"{field_selector},{name_term}" if field_selector else name_term
        selection = Selection.parse(
            target.resource,
            target.namespace,
            request.query.get("labelSelector", ""),
            field_selector,
        )
        timeout = request.integer("timeoutSeconds")
        deadline = time.monotonic() + timeout if timeout else float("inf")
        bookmarks = request.flag("allowWatchBookmarks")
        initial = request.flag("sendInitialEvents")
        stream = _Stream(handler, "application/json")
        try:
            for event in self._watch_events(
                target.resource, selection, request, initial, bookmarks, deadline, stream
            ):
                stream.write(json.dumps(event).encode() + b"\n")
            stream.close()
        except (ConnectionError, OSError):
            handler.close_connection = True

    def _watch_events(
        self,
        resource: Resource,
        selection: Selection,
        request: _Request,
        send_initial: bool,
        bookmarks: bool,
        deadline: float,
        stream: _Stream,
    ) -> Iterator[Object]:
        try:
            watch = self.store.watch(
                resource,
                selection,
                request.query.get("resourceVersion", ""),
                send_initial_events=send_initial,
            )
        except ApiError as error:
            # Past authentication and parsing, the real server reports a watch that
            # cannot start as an ERROR event on a 200 stream, not as a status code.
            yield {"type": "ERROR", "object": error.status}
            return
        if send_initial:
            initial = watch.next_events(0)
            yield from ({"type": kind, "object": obj} for kind, obj in initial)
            yield _bookmark(resource, watch.cursor, initial_events_end=True)
        next_bookmark = time.monotonic() + self.bookmark_interval
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= deadline or stream.client_gone():
                return
            wait = min(0.25, deadline - now, max(0.0, next_bookmark - now) if bookmarks else 0.25)
            try:
                events = watch.next_events(wait)
            except ApiError as error:
                yield {"type": "ERROR", "object": error.status}
                return
            yield from ({"type": kind, "object": obj} for kind, obj in events)
            if bookmarks and time.monotonic() >= next_bookmark:
                yield _bookmark(resource, watch.cursor)
                next_bookmark = time.monotonic() + self.bookmark_interval

    # Logs ---------------------------------------------------------------------------------

    def _serve_log(self, request: _Request, target: _Target, handler: _Handler) -> None:
        if request.method != "GET":
            raise _method_not_allowed(request.method)
        pod = self.store.get(target.resource, target.namespace, target.name)
        names = [c["name"] for c in pod["spec"].get("containers", [])]
        container = request.query.get("container") or ""
        if not container:
            if len(names) != 1:
                raise ApiError.bad_request(
                    f"a container name must be specified for pod {target.name}, "
                    f"choose one of: [{' '.join(names)}]"
                )
            container = names[0]
        elif container not in names:
            raise ApiError.bad_request(f"container {container} is not valid for pod {target.name}")
        previous = request.flag("previous")
        log = None
        if self.logs is not None:
            log = self.logs.log_file(
                target.namespace or "", target.name, container, previous=previous
            )
        if log is None:
            if previous:
                raise ApiError.bad_request(
                    f'previous terminated container "{container}" in pod "{target.name}" not found'
                )
            raise ApiError.bad_request(
                f'container "{container}" in pod "{target.name}" is waiting to start: '
                "ContainerCreating"
            )
        tail = request.integer("tailLines")
        limit = request.integer("limitBytes")
        content = log.path.read_bytes() if log.path.exists() else b""
        if tail is not None:
            lines = content.splitlines(keepends=True)
            content = b"".join(lines[-tail:]) if tail > 0 else b""
        if not request.flag("follow"):
            self._write(handler, 200, content[:limit] if limit else content, "text/plain")
            return
        self._follow_log(
            handler, log, content, len(log.path.read_bytes()) if log.path.exists() else 0, limit
        )

    def _follow_log(
        self, handler: _Handler, log: LogFile, first: bytes, offset: int, limit: int | None
    ) -> None:
        stream = _Stream(handler, "text/plain")
        sent = 0
        try:
            chunk = first
            while True:
                if limit is not None:
                    chunk = chunk[: max(0, limit - sent)]
                stream.write(chunk)
                sent += len(chunk)
                if (limit is not None and sent >= limit) or self._stopping.is_set():
                    break
                running = log.running()
                with log.path.open("rb") as file:
                    file.seek(offset)
                    chunk = file.read()
                offset += len(chunk)
                if not chunk:
                    if not running or stream.client_gone():
                        break
                    time.sleep(0.05)
            stream.close()
        except (ConnectionError, OSError):
            handler.close_connection = True

    # Writing -------------------------------------------------------------------------

    def _write_object(self, request: _Request, handler: _Handler, status: int, obj: Object) -> None:
        if "as=Table" in request.headers.get("accept", ""):
            obj = _table(obj, request.query.get("includeObject", "Metadata"))
        self._write_json(handler, status, obj)

    def _write_json(
        self,
        handler: _Handler,
        status: int,
        payload: object,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self._write(handler, status, json.dumps(payload).encode(), "application/json", headers)

    @staticmethod
    def _write(
        handler: _Handler,
        status: int,
        body: bytes,
        content_type: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Cache-Control", "no-cache, private")
        for name, value in headers or []:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)


_NOT_JSON = object()


def _version() -> Object:
    return {
        **KUBERNETES_VERSION,
        "gitCommit": "0" * 40,
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_SUBRESOURCE_VERBS = {
    "status": ("{kind}", ["get", "patch", "update"]),
    "log": ("{kind}", ["get"]),
    "binding": ("Binding", ["create"]),
}


def _api_resources(resource: Resource) -> list[Object]:
    """The APIResourceList entries of a kind: itself, then its subresources."""
    entry: Object = {
        "name": resource.plural,
        "singularName": resource.singular,
        "namespaced": resource.namespaced,
        "kind": resource.kind,
        "verbs": _VERBS,
    }
    if resource.short_names:
        entry["shortNames"] = list(resource.short_names)
    if resource.categories:
        entry["categories"] = list(resource.categories)
    entries = [entry]
    for subresource in resource.subresources:
        kind, verbs = _SUBRESOURCE_VERBS[subresource]
        entries.append(
            {
                "name": f"{resource.plural}/{subresource}",
                "singularName": "",
                "namespaced": resource.namespaced,
                "kind": kind.format(kind=resource.kind),
                "verbs": verbs,
            }
        )
    return entries


def _openapi_key(group_version: str) -> str:
    """``api/v1`` for the core group, ``apis/batch/v1`` for the others."""
    return f"apis/{group_version}" if "/" in group_version else f"api/{group_version}"


_WRITE_PARAMETERS = [
    {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
    for name in ("dryRun", "fieldManager", "fieldValidation")
]


def _openapi_paths(resource: Resource) -> dict[str, Object]:
    """The item path of a kind with its ``patch`` operation, as the API server
    publishes it (``x-kubernetes-group-version-kind`` names the kind)."""
    prefix = "/" + _openapi_key(resource.api_version)
    scope = "/namespaces/{namespace}" if resource.namespaced else ""
    gvk = {"group": resource.group, "version": resource.version, "kind": resource.kind}
    operation = {
        "operationId": f"patch{resource.kind}",
        "parameters": _WRITE_PARAMETERS,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": "patch",
        "x-kubernetes-group-version-kind": gvk,
    }
    return {f"{prefix}{scope}/{resource.plural}/{{name}}": {"patch": operation}}


def _bookmark(
    resource: Resource, resource_version: int, *, initial_events_end: bool = False
) -> Object:
    metadata: Object = {"resourceVersion": str(resource_version)}
    if initial_events_end:
        metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {
        "type": "BOOKMARK",
        "object": {"kind": resource.kind, "apiVersion": resource.api_version, "metadata": metadata},
    }


def _delete_options(request: _Request) -> dict[str, Any]:
    """DeleteOptions from the body and the query, the query winning as on the server."""
    options = dict(request.body) if isinstance(request.body, dict) else {}
    if "propagationPolicy" in request.query:
        options["propagationPolicy"] = request.query["propagationPolicy"]
    if "gracePeriodSeconds" in request.query:
        options["gracePeriodSeconds"] = request.integer("gracePeriodSeconds")
    if "orphanDependents" in request.query:
        options["orphanDependents"] = request.flag("orphanDependents")
    return options


def _method_not_allowed(method: str) -> ApiError:
    return ApiError(
        405,
        "MethodNotAllowed",
        f"the server does not allow this method on the requested resource ({method})",
    )


def _table(obj: Object, include_object: str) -> Object:
    """An object or list as a ``meta.k8s.io/v1`` Table with the generic columns the real
    server gives kinds without printer columns."""
    items = obj.get("items", [obj])
    kind = obj["kind"].removesuffix("List")

    def row(item: Object) -> Object:
        metadata = item["metadata"]
        cells = [metadata["name"], metadata.get("creationTimestamp")]
        if include_object == "None":
            return {"cells": cells}
        if include_object == "Object":
            embedded = {"kind": kind, "apiVersion": obj["apiVersion"], **item}
        else:
            embedded = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
            }
        return {"cells": cells, "object": embedded}

    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": obj["metadata"].get("resourceVersion", "")},
        "columnDefinitions": [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": "Name must be unique within a namespace.",
                "priority": 0,
            },
            {
                "name": "Created At",
                "type": "date",
                "format": "",
                "description": "The time the object was created.",
                "priority": 0,
            },
        ],
        "rows": [row(item) for item in items],
    }
