"""The object store behind the Kubernetes API test double (:mod:`tests.support.kube_api`).

What a real cluster keeps in etcd and enforces in its registries, reduced to what the
platform uses: one table of resource kinds, a global monotonically increasing
``resourceVersion`` that every write bumps, a bounded history of watch events (older
versions are *compacted* and a watch from them is answered 410 Expired), label and
field selectors, the three patch types, defaulting and validation of the kinds the
platform creates, optimistic concurrency, finalizers, graceful pod deletion and
owner-reference garbage collection (Background, Foreground and Orphan propagation).

Errors are raised as :class:`ApiError` carrying the ``Status`` object the real API
server answers with (``reason`` NotFound, AlreadyExists, Conflict, Invalid, Expired,
BadRequest …), so the HTTP layer only serialises them.

Controllers in the tests (the Job controller, the node agent) call this store directly,
as the real controllers call the API: through the same verbs, so their writes bump the
``resourceVersion`` and reach watchers like any client's.
"""

from __future__ import annotations

import base64
import builtins
import copy
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jsonschema

from tests.support.kube_schemas import built_in_errors

Object = dict[str, Any]

# ---------------------------------------------------------------------------
# The resource table: adding a stored kind is one line.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    """A kind the server stores, as discovery describes it.

    Attributes:
        kind: ``Job``.
        plural: ``jobs``, the path segment.
        api_version: ``batch/v1``; ``v1`` for the core group.
        namespaced: Whether objects live in a namespace.
        short_names: ``kubectl`` abbreviations (``cm`` for configmaps).
        categories: Discovery categories (``all``).
        subresources: Subresources served, of ``status``, ``log``, ``binding``.
        field_labels: Field selector keys besides ``metadata.name`` and
            ``metadata.namespace``.
        custom: A custom resource: served only while the ``CustomResourceDefinition``
            named ``{plural}.{group}`` exists, and validated against its schema.
    """

    kind: str
    plural: str
    api_version: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    field_labels: tuple[str, ...] = ()
    custom: bool = False

    @property
    def group(self) -> str:
        """``batch``; empty for the core group."""
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        """``v1``."""
        return self.api_version.rpartition("/")[2]

    @property
    def singular(self) -> str:
        """``job``."""
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """``jobs.batch``, or ``pods`` for the core group: how messages name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        """Whether ``status`` is a subresource: the main verbs then leave it alone."""
        return "status" in self.subresources


_STATUS = ("status",)
_ALL = ("all",)
_POD_FIELDS = ("spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
               "spec.serviceAccountName", "status.phase", "status.podIP")  # fmt: skip

RESOURCES: tuple[Resource, ...] = (
    Resource("Namespace", "namespaces", "v1", False, ("ns",), (), _STATUS, ("status.phase",)),
    Resource("Pod", "pods", "v1", True, ("po",), _ALL, (*_STATUS, "log", "binding"), _POD_FIELDS),
    Resource("Secret", "secrets", "v1", field_labels=("type",)),
    Resource("ConfigMap", "configmaps", "v1", short_names=("cm",)),
    Resource("Service", "services", "v1", True, ("svc",), _ALL, _STATUS),
    Resource("ServiceAccount", "serviceaccounts", "v1", short_names=("sa",)),
    Resource("PersistentVolumeClaim", "persistentvolumeclaims", "v1", True, ("pvc",), (), _STATUS),
    Resource("Job", "jobs", "batch/v1", True, (), _ALL, _STATUS, ("status.successful",)),
    Resource("Deployment", "deployments", "apps/v1", True, ("deploy",), _ALL, _STATUS),
    Resource("Role", "roles", "rbac.authorization.k8s.io/v1"),
    Resource("RoleBinding", "rolebindings", "rbac.authorization.k8s.io/v1"),
    Resource("NetworkPolicy", "networkpolicies", "networking.k8s.io/v1", True, ("netpol",)),
    Resource(
        "PodDisruptionBudget", "poddisruptionbudgets", "policy/v1", True, ("pdb",), (), _STATUS
    ),
    Resource(
        "CustomResourceDefinition",
        "customresourcedefinitions",
        "apiextensions.k8s.io/v1",
        False,
        ("crd", "crds"),
        (),
        _STATUS,
    ),
)
"""The kinds served. A kind is one line: kind, plural, apiVersion, namespaced, short
names, categories, subresources, field selector keys."""

# ---------------------------------------------------------------------------
# Errors: the Status objects of the real server.
# ---------------------------------------------------------------------------


class ApiError(Exception):
    """A failed request, as the ``Status`` object the API server answers with."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details) if details else None

    @property
    def status(self) -> Object:
        """The ``Status`` object, kind Status, apiVersion v1, status Failure."""
        status: Object = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status

    @classmethod
    def not_found(cls, resource: Resource, name: str) -> ApiError:
        """404 NotFound for ``name``."""
        return cls(
            404,
            "NotFound",
            f'{resource.qualified} "{name}" not found',
            _details(resource, name, kind=resource.plural),
        )

    @classmethod
    def already_exists(cls, resource: Resource, name: str) -> ApiError:
        """409 AlreadyExists for ``name``."""
        return cls(
            409,
            "AlreadyExists",
            f'{resource.qualified} "{name}" already exists',
            _details(resource, name, kind=resource.plural),
        )

    @classmethod
    def conflict(cls, resource: Resource, name: str, why: str) -> ApiError:
        """409 Conflict: a stale resourceVersion or a failed precondition."""
        return cls(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {resource.qualified} "{name}": {why}',
            _details(resource, name, kind=resource.plural),
        )

    @classmethod
    def invalid(cls, resource: Resource, name: str, causes: list[Cause]) -> ApiError:
        """422 Invalid with one cause per field error, as the validators report them."""
        summary = ", ".join(cause.text for cause in causes)
        group_kind = f"{resource.kind}.{resource.group}" if resource.group else resource.kind
        details = _details(resource, name, kind=resource.kind)
        details["causes"] = [cause.as_dict() for cause in causes]
        return cls(422, "Invalid", f'{group_kind} "{name}" is invalid: {summary}', details)

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        """400 BadRequest."""
        return cls(400, "BadRequest", message)

    @classmethod
    def expired(cls, message: str) -> ApiError:
        """410 Expired, the reason the watch cache and etcd compaction answer with."""
        return cls(410, "Expired", message)


def _details(resource: Resource, name: str, *, kind: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": kind}
    if resource.group:
        details["group"] = resource.group
    return details


@dataclass(frozen=True, slots=True)
class Cause:
    """One field error of a 422 Invalid answer.

    Attributes:
        field: The field's path, ``spec.template.spec.containers``.
        reason: ``FieldValueRequired``, ``FieldValueInvalid``, ``FieldValueNotSupported``,
            ``FieldValueForbidden``.
        message: What is wrong with it.
    """

    field: str
    reason: str
    message: str

    @property
    def text(self) -> str:
        return f"{self.field}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}

    @classmethod
    def required(cls, path: str, detail: str = "") -> Cause:
        return cls(path, "FieldValueRequired", "Required value" + (f": {detail}" if detail else ""))

    @classmethod
    def invalid(cls, path: str, value: object, detail: str) -> Cause:
        return cls(path, "FieldValueInvalid", f"Invalid value: {json.dumps(value)}: {detail}")

    @classmethod
    def unsupported(cls, path: str, value: object, supported: Iterable[str]) -> Cause:
        choices = ", ".join(json.dumps(choice) for choice in supported)
        return cls(
            path,
            "FieldValueNotSupported",
            f"Unsupported value: {json.dumps(value)}: supported values: {choices}",
        )

    @classmethod
    def forbidden(cls, path: str, detail: str) -> Cause:
        return cls(path, "FieldValueForbidden", f"Forbidden: {detail}")


# ---------------------------------------------------------------------------
# Selectors.
# ---------------------------------------------------------------------------

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a label selector: ``key op values``."""

    key: str
    operator: str  # "in", "notin", "exists", "!exists", "gt", "lt"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "in":
                return present and value in self.values
            case "notin":
                return not present or value not in self.values
            case "exists":
                return present
            case "!exists":
                return not present
            case "gt" | "lt":
                try:
                    actual, bound = int(value or ""), int(next(iter(self.values)))
                except ValueError:
                    return False
                return actual > bound if self.operator == "gt" else actual < bound
        raise AssertionError(self.operator)


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parse a ``labelSelector`` query: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``,
    ``a notin (x)``, ``a``, ``!a``, ``a>1``, joined by commas.

    Raises:
        ApiError: 400 BadRequest for a selector that does not parse.
    """
    requirements = []
    for term in _split_terms(text):
        requirements.append(_parse_requirement(term))
    return tuple(requirements)


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(char)
    terms.append("".join(current))
    return [term.strip() for term in terms if term.strip()]


_SET_TERM = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQUALITY_TERM = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s*(?P<op>==|=|!=|>|<)\s*(?P<value>[^\s,]*)$")


def _parse_requirement(term: str) -> Requirement:
    def bad(detail: str) -> ApiError:
        return ApiError.bad_request(f"unable to parse requirement: {detail}: {term!r}")

    def key_of(key: str) -> str:
        if not _LABEL_KEY.match(key):
            raise bad("invalid label key")
        return key

    def value_of(value: str) -> str:
        if not _LABEL_VALUE.match(value):
            raise bad("invalid label value")
        return value

    if term.startswith("!"):
        return Requirement(key_of(term[1:].strip()), "!exists")
    if match := _SET_TERM.match(term):
        values = frozenset(value_of(v.strip()) for v in match["values"].split(","))
        return Requirement(key_of(match["key"]), match["op"], values)
    if match := _EQUALITY_TERM.match(term):
        operator = {"=": "in", "==": "in", "!=": "notin", ">": "gt", "<": "lt"}[match["op"]]
        value = value_of(match["value"])
        if operator in ("gt", "lt") and not value.lstrip("-").isdigit():
            raise bad("for 'Gt', 'Lt' operators, the value must be an integer")
        return Requirement(key_of(match["key"]), operator, frozenset({value}))
    if " " not in term and not set("=!<>()") & set(term):
        return Requirement(key_of(term), "exists")
    raise bad("found unexpected token")


def labels_match(selector: Iterable[Requirement], obj: Object) -> bool:
    """Whether ``obj``'s labels satisfy every requirement."""
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(requirement.matches(labels) for requirement in selector)


def selector_from_label_selector(selector: Mapping[str, Any]) -> str:
    """A ``metav1.LabelSelector`` object (``matchLabels``, ``matchExpressions``) as query text."""
    terms = [f"{key}={value}" for key, value in (selector.get("matchLabels") or {}).items()]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = ",".join(expression.get("values") or [])
        terms.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[operator]
        )
    return ",".join(terms)


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    """One term of a field selector: ``path = value`` or ``path != value``."""

    path: str
    value: str
    equal: bool

    def matches(self, obj: Object) -> bool:
        return (field_value(obj, self.path) == self.value) == self.equal


def parse_field_selector(text: str, resource: Resource) -> tuple[FieldRequirement, ...]:
    """Parse a ``fieldSelector`` query for ``resource``.

    Raises:
        ApiError: 400 BadRequest for a term that does not parse or a field the kind
            does not support, with the real server's message.
    """
    supported = {"metadata.name", "metadata.namespace", *resource.field_labels}
    requirements = []
    for term in _split_terms(text):
        match = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", term)
        if match is None:
            raise ApiError.bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        path, operator, value = match.groups()
        if path not in supported:
            raise ApiError.bad_request(f'field label not supported: "{path}"')
        requirements.append(FieldRequirement(path, value, operator != "!="))
    return tuple(requirements)


def field_value(obj: Object, path: str) -> str:
    """The value at the dotted ``path`` as a field selector compares it ("" if absent)."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class Selection:
    """What a list or a watch selects: a namespace (None for all) and the selectors."""

    namespace: str | None = None
    labels: tuple[Requirement, ...] = ()
    fields: tuple[FieldRequirement, ...] = ()

    @classmethod
    def parse(
        cls, resource: Resource, namespace: str | None, label_selector: str, field_selector: str
    ) -> Selection:
        return cls(
            namespace,
            parse_label_selector(label_selector),
            parse_field_selector(field_selector, resource),
        )

    def matches(self, obj: Object) -> bool:
        metadata = obj.get("metadata", {})
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        return labels_match(self.labels, obj) and all(f.matches(obj) for f in self.fields)


# ---------------------------------------------------------------------------
# Patches.
# ---------------------------------------------------------------------------

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# The patch merge keys of the lists the platform's objects hold (from the API's
# ``x-kubernetes-patch-merge-key`` markers); other lists are replaced whole.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
}
# Lists of scalars that a strategic merge patch unions instead of replacing.
_MERGED_SCALAR_LISTS = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` removes a key,
    anything else (lists included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, key: str = "") -> Any:
    """A strategic merge patch for the built-in kinds: a merge patch whose lists with a
    patch merge key (containers by name, env by name, conditions by type …) merge item
    by item, with ``$patch: delete`` / ``$patch: replace`` honoured and kubectl's
    ``$setElementOrder`` / ``$retainKeys`` directives accepted (order is not kept)."""
    if isinstance(patch, list):
        return _strategic_list(target, patch, key)
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if name.startswith("$"):
            continue
        if value is None:
            result.pop(name, None)
            continue
        merged = strategic_merge_patch(result.get(name), value, name)
        if merged is None:
            result.pop(name, None)
        else:
            result[name] = merged
    return result


def _strategic_list(target: Any, patch: list[Any], key: str) -> list[Any]:
    current = list(target) if isinstance(target, list) else []
    if key in _MERGED_SCALAR_LISTS:
        return current + [item for item in patch if item not in current]
    merge_key = _MERGE_KEYS.get(key)
    if key == "ports":
        sample = next((item for item in patch + current if isinstance(item, dict)), {})
        merge_key = "containerPort" if "containerPort" in sample else "port"
    if merge_key is None or not all(isinstance(item, dict) for item in patch):
        return [copy.deepcopy(item) for item in patch if item != {"$patch": "replace"}]
    if any(item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(item) for item in patch if item.get("$patch") != "replace"]
    for item in patch:
        index = next(
            (i for i, old in enumerate(current) if old.get(merge_key) == item.get(merge_key)),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                current.pop(index)
        elif index is None:
            current.append(strategic_merge_patch(None, item))
        else:
            current[index] = strategic_merge_patch(current[index], item)
    return current


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch: ``add``, ``remove``, ``replace``, ``move``, ``copy``, ``test``.

    Raises:
        ApiError: 400 for a malformed patch, 422 for one that does not apply
            (a missing path, a failed ``test``).
    """
    if not isinstance(operations, list):
        raise ApiError.bad_request("a JSON patch must be a list of operations")
    document = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise ApiError.bad_request(f"invalid JSON patch operation: {operation!r}")
        op, path = operation["op"], operation["path"]
        try:
            match op:
                case "add":
                    document = _pointer_add(document, path, copy.deepcopy(operation["value"]))
                case "remove":
                    document = _pointer_remove(document, path)
                case "replace":
                    _pointer_get(document, path)
                    document = _pointer_remove(document, path)
                    document = _pointer_add(document, path, copy.deepcopy(operation["value"]))
                case "move":
                    value = _pointer_get(document, operation["from"])
                    document = _pointer_remove(document, operation["from"])
                    document = _pointer_add(document, path, value)
                case "copy":
                    value = copy.deepcopy(_pointer_get(document, operation["from"]))
                    document = _pointer_add(document, path, value)
                case "test":
                    if _pointer_get(document, path) != operation["value"]:
                        raise _PatchFailed(f"testing value {path} failed")
                case _:
                    raise ApiError.bad_request(f"Unexpected kind: {op}")
        except KeyError as missing:
            raise ApiError.bad_request(f"invalid JSON patch operation, missing {missing}") from None
        except _PatchFailed as failed:
            raise ApiError(
                422, "Invalid", f"the server rejected our request due to an error: {failed}"
            ) from None
    return document


class _PatchFailed(Exception):
    pass


def _pointer_parts(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _PatchFailed(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _container(document: Any, parts: list[str], path: str) -> Any:
    node = document
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _PatchFailed(f"doc is missing path: {path!r}")
    return node


def _pointer_get(document: Any, path: str) -> Any:
    return _container(document, _pointer_parts(path), path)


def _pointer_add(document: Any, path: str, value: Any) -> Any:
    parts = _pointer_parts(path)
    if not parts:
        return value
    parent = _container(document, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list) and (
        last == "-" or (last.isdigit() and int(last) <= len(parent))
    ):
        parent.insert(len(parent) if last == "-" else int(last), value)
    else:
        raise _PatchFailed(f"doc is missing path: {path!r}")
    return document


def _pointer_remove(document: Any, path: str) -> Any:
    parts = _pointer_parts(path)
    if not parts:
        raise _PatchFailed("cannot remove the whole document")
    parent = _container(document, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise _PatchFailed(f"doc is missing path: {path!r}")
    return document


def apply_patch(target: Object, patch: Any, content_type: str) -> Object:
    """``target`` with ``patch`` applied as the ``Content-Type`` says.

    Raises:
        ApiError: 415 for a patch type the double does not serve (server-side apply),
            400/422 for a patch that does not parse or apply.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    if media == JSON_PATCH:
        result = json_patch(target, patch)
    elif media in (MERGE_PATCH, STRATEGIC_MERGE_PATCH):
        if not isinstance(patch, dict):
            raise ApiError.bad_request("a merge patch must be a JSON object")
        merge = merge_patch if media == MERGE_PATCH else strategic_merge_patch
        result = merge(target, patch)
    else:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types "
            f"include: {JSON_PATCH}, {MERGE_PATCH}, {STRATEGIC_MERGE_PATCH}"
            + (
                " (server-side apply is not served by this test double)"
                if media == APPLY_PATCH
                else ""
            ),
        )
    if not isinstance(result, dict):
        raise ApiError.bad_request("the patched object is not a JSON object")
    return result


# ---------------------------------------------------------------------------
# Per-kind rules: defaulting, validation, immutability.
# ---------------------------------------------------------------------------

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_SUBDOMAIN_HELP = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character"
)
_LABEL_HELP = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
    "'-', and must start and end with an alphanumeric character"
)
_1035_HELP = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start "
    "with an alphabetic character, and end with an alphanumeric character"
)


def _name_causes(name: str, rule: str) -> list[Cause]:
    pattern, limit, help_text = {
        "subdomain": (_DNS_SUBDOMAIN, 253, _SUBDOMAIN_HELP),
        "label": (_DNS_LABEL, 63, _LABEL_HELP),
        "1035": (_DNS_1035_LABEL, 63, _1035_HELP),
    }[rule]
    if len(name) > limit:
        return [Cause.invalid("metadata.name", name, f"must be no more than {limit} characters")]
    if not pattern.match(name):
        return [Cause.invalid("metadata.name", name, help_text)]
    return []


def _labels_causes(obj: Object) -> list[Cause]:
    causes = []
    for key, value in (obj["metadata"].get("labels") or {}).items():
        if not _LABEL_KEY.match(key):
            causes.append(Cause.invalid("metadata.labels", key, "name part must be valid"))
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            causes.append(
                Cause.invalid(
                    f"metadata.labels[{key}]",
                    value,
                    "a valid label must be 63 characters or less, alphanumeric, '-', '_' or '.'",
                )
            )
    return causes


def _pod_spec_defaults(spec: Object) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for container in spec.get("containers") or []:
        if not isinstance(container, dict):
            continue
        image = str(container.get("image", ""))
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        default_pull = "Always" if tag in ("", "latest") and "@" not in image else "IfNotPresent"
        container.setdefault("imagePullPolicy", default_pull)
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})


def _pod_spec_causes(spec: Any, path: str, restart_policies: tuple[str, ...]) -> list[Cause]:
    if not isinstance(spec, dict):
        return [Cause.required(path)]
    causes = []
    containers = spec.get("containers")
    if not containers or not isinstance(containers, list):
        causes.append(Cause.required(f"{path}.containers"))
    else:
        seen = set()
        for index, container in enumerate(containers):
            where = f"{path}.containers[{index}]"
            if not isinstance(container, dict):
                causes.append(Cause.invalid(where, container, "must be an object"))
                continue
            name = container.get("name")
            if not name:
                causes.append(Cause.required(f"{where}.name"))
            elif not isinstance(name, str) or not _DNS_LABEL.match(name):
                causes.append(Cause.invalid(f"{where}.name", name, _LABEL_HELP))
            elif name in seen:
                causes.append(
                    Cause(f"{where}.name", "FieldValueDuplicate", f'Duplicate value: "{name}"')
                )
            seen.add(name)
            if not container.get("image"):
                causes.append(Cause.required(f"{where}.image"))
            for env_index, variable in enumerate(container.get("env") or []):
                if not isinstance(variable, dict) or not variable.get("name"):
                    causes.append(Cause.required(f"{where}.env[{env_index}].name"))
    policy = spec.get("restartPolicy")
    if policy not in restart_policies:
        causes.append(Cause.unsupported(f"{path}.restartPolicy", policy, restart_policies))
    return causes


def _pod_defaults(obj: Object) -> None:
    _pod_spec_defaults(obj.setdefault("spec", {}))
    status = obj.setdefault("status", {})
    status.setdefault("phase", "Pending")
    status.setdefault("qosClass", "BestEffort")


def _pod_causes(obj: Object) -> list[Cause]:
    return _pod_spec_causes(obj.get("spec"), "spec", ("Always", "OnFailure", "Never"))


def _pod_update_causes(old: Object, new: Object) -> list[Cause]:
    def mutable_masked(spec: Object) -> Object:
        masked = copy.deepcopy(spec)
        for key in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
            masked.pop(key, None)
        for container in masked.get("containers") or []:
            container.pop("image", None)
        return masked

    if mutable_masked(old.get("spec", {})) != mutable_masked(new.get("spec", {})):
        return [
            Cause.forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`, "
                "`spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing "
                "tolerations), `spec.terminationGracePeriodSeconds`",
            )
        ]
    return []


JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"


def _job_defaults(obj: Object) -> None:
    spec = obj.setdefault("spec", {})
    for key, value in (
        ("parallelism", 1),
        ("completions", 1),
        ("backoffLimit", 6),
        ("completionMode", "NonIndexed"),
        ("suspend", False),
        ("podReplacementPolicy", "TerminatingOrFailed"),
        ("manualSelector", None),
    ):
        if spec.get(key) is None and value is not None:
            spec[key] = value
    template = spec.setdefault("template", {})
    if not isinstance(template, dict):
        return
    if not spec.get("manualSelector"):
        # The server, not the client, owns a Job's selector and its pods' tracking labels.
        uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
        labels = template.setdefault("metadata", {}).setdefault("labels", {})
        labels.update(
            {"controller-uid": uid, JOB_UID_LABEL: uid, "job-name": name, JOB_NAME_LABEL: name}
        )
        spec.setdefault("selector", {"matchLabels": {JOB_UID_LABEL: uid}})
    template_spec = template.setdefault("spec", {})
    if isinstance(template_spec, dict):
        _pod_spec_defaults(template_spec)


def _job_causes(obj: Object) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes = _pod_spec_causes(
        (spec.get("template") or {}).get("spec"), "spec.template.spec", ("OnFailure", "Never")
    )
    for key in ("parallelism", "completions", "backoffLimit", "ttlSecondsAfterFinished"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            causes.append(Cause.invalid(f"spec.{key}", value, "must be greater than or equal to 0"))
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or deadline <= 0):
        causes.append(
            Cause.invalid("spec.activeDeadlineSeconds", deadline, "must be greater than 0")
        )
    if spec.get("completionMode") not in ("NonIndexed", "Indexed"):
        causes.append(
            Cause.unsupported(
                "spec.completionMode", spec.get("completionMode"), ("NonIndexed", "Indexed")
            )
        )
    return causes


def _job_update_causes(old: Object, new: Object) -> list[Cause]:
    return [
        Cause.invalid(f"spec.{key}", new["spec"].get(key), "field is immutable")
        for key in ("template", "selector", "completionMode", "podFailurePolicy")
        if old["spec"].get(key) != new["spec"].get(key)
    ]


def _secret_defaults(obj: Object) -> None:
    obj.setdefault("type", "Opaque")
    string_data = obj.pop("stringData", None) or {}
    if isinstance(string_data, dict) and string_data:
        data = obj.setdefault("data", {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()


def _data_causes(obj: Object, fields: tuple[str, ...]) -> list[Cause]:
    causes = []
    for name in fields:
        for key in obj.get(name) or {}:
            if not _CONFIG_KEY.match(key):
                causes.append(
                    Cause.invalid(
                        f"{name}[{key}]",
                        key,
                        "a valid config key must consist of "
                        "alphanumeric characters, '-', '_' or '.'",
                    )
                )
    return causes


def _secret_causes(obj: Object) -> list[Cause]:
    causes = _data_causes(obj, ("data",))
    for key, value in (obj.get("data") or {}).items():
        try:
            base64.b64decode(str(value), validate=True)
        except ValueError:
            causes.append(Cause.invalid(f"data[{key}]", "<value omitted>", "illegal base64 data"))
    return causes


def _immutable_data_causes(old: Object, new: Object) -> list[Cause]:
    if not old.get("immutable"):
        return []
    return [
        Cause.forbidden(name, "field is immutable when `immutable` is set")
        for name in ("data", "binaryData", "immutable")
        if old.get(name) != new.get(name)
    ]


def _namespace_defaults(obj: Object) -> None:
    labels = obj["metadata"].setdefault("labels", {})
    labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    obj.setdefault("status", {}).setdefault("phase", "Active")


class _ClusterIPs:
    """Hands out service addresses from 10.96.0.0/16, as the service IP allocator does."""

    def __init__(self) -> None:
        self._next = 1

    def allocate(self) -> str:
        self._next += 1
        return f"10.96.{self._next // 256}.{self._next % 256}"


def _service_defaults(obj: Object, ips: _ClusterIPs) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    if spec.get("clusterIP") is None:
        spec["clusterIP"] = ips.allocate()
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    for port in spec.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    obj.setdefault("status", {}).setdefault("loadBalancer", {})


def _service_causes(obj: Object) -> list[Cause]:
    spec = obj.get("spec") or {}
    if (
        spec.get("type") != "ExternalName"
        and spec.get("clusterIP") != "None"
        and not spec.get("ports")
    ):
        return [Cause.required("spec.ports")]
    return []


def _deployment_defaults(obj: Object) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    spec.setdefault(
        "strategy",
        {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}},
    )
    template_spec = spec.setdefault("template", {}).setdefault("spec", {})
    if isinstance(template_spec, dict):
        _pod_spec_defaults(template_spec)


def _deployment_causes(obj: Object) -> list[Cause]:
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    causes = _pod_spec_causes(template.get("spec"), "spec.template.spec", ("Always",))
    selector = spec.get("selector")
    if not selector:
        return [*causes, Cause.required("spec.selector")]
    matches = labels_match(
        parse_label_selector(selector_from_label_selector(selector)), template or {"metadata": {}}
    )
    if not matches:
        labels = (template.get("metadata") or {}).get("labels")
        causes.append(
            Cause.invalid(
                "spec.template.metadata.labels",
                labels,
                "`selector` does not match template `labels`",
            )
        )
    return causes


def _deployment_update_causes(old: Object, new: Object) -> list[Cause]:
    if old["spec"].get("selector") != new["spec"].get("selector"):
        return [Cause.invalid("spec.selector", new["spec"].get("selector"), "field is immutable")]
    return []


def _pvc_causes(obj: Object) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes = []
    if not spec.get("accessModes"):
        causes.append(Cause.required("spec.accessModes"))
    if not ((spec.get("resources") or {}).get("requests") or {}).get("storage"):
        causes.append(Cause.required("spec.resources[storage]"))
    return causes


@dataclass(frozen=True, slots=True)
class KindRules:
    """What a registry does for one kind beyond storing it.

    Attributes:
        name_rule: How names are checked: ``subdomain``, ``label`` or ``1035``.
        defaults: Fills in defaults on create and update.
        validate: Field errors of an object.
        validate_update: Field errors of an update from the old object to the new.
        default_propagation: The propagation policy a delete without one gets
            (batch/v1 Jobs orphan their pods, for backward compatibility).
        returns_deleted_object: Whether a delete answers with the object rather than
            a ``Status`` (pods and namespaces do).
    """

    name_rule: str = "subdomain"
    defaults: Callable[[Object], None] | None = None
    validate: Callable[[Object], list[Cause]] | None = None
    validate_update: Callable[[Object, Object], list[Cause]] | None = None
    default_propagation: str = "Background"
    returns_deleted_object: bool = False


_PLAIN_RULES = KindRules()


def _kind_rules(ips: _ClusterIPs) -> dict[str, KindRules]:
    return {
        "Namespace": KindRules("label", _namespace_defaults, returns_deleted_object=True),
        "Pod": KindRules(
            "subdomain", _pod_defaults, _pod_causes, _pod_update_causes, returns_deleted_object=True
        ),
        "Secret": KindRules("subdomain", _secret_defaults, _secret_causes, _immutable_data_causes),
        "ConfigMap": KindRules(
            "subdomain",
            None,
            lambda obj: _data_causes(obj, ("data", "binaryData")),
            _immutable_data_causes,
        ),
        "Service": KindRules("1035", lambda obj: _service_defaults(obj, ips), _service_causes),
        "PersistentVolumeClaim": KindRules(
            "subdomain",
            lambda obj: obj.setdefault("status", {}).setdefault("phase", "Pending"),
            _pvc_causes,
        ),
        "Job": KindRules(
            "subdomain",
            _job_defaults,
            _job_causes,
            _job_update_causes,
            default_propagation="Orphan",
        ),
        "Deployment": KindRules(
            "subdomain", _deployment_defaults, _deployment_causes, _deployment_update_causes
        ),
        "CustomResourceDefinition": KindRules("subdomain", _crd_defaults, _crd_causes),
    }


def _crd_defaults(obj: Object) -> None:
    """A definition is accepted and established at once (no name conflicts to wait on)."""
    obj.setdefault("status", {})["conditions"] = [
        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
         "lastTransitionTime": now_rfc3339()},
        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
         "lastTransitionTime": now_rfc3339()},
    ]  # fmt: skip
    names = obj.get("spec", {}).get("names", {})
    obj["status"]["acceptedNames"] = {k: v for k, v in names.items() if k != "listKind"}
    obj["status"]["storedVersions"] = [
        v["name"] for v in obj.get("spec", {}).get("versions", []) if v.get("storage")
    ]


def _crd_causes(obj: Object) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes = [Cause.required(f"spec.{key}") for key in ("group", "names", "versions")
              if not spec.get(key)]  # fmt: skip
    names = spec.get("names") or {}
    causes += [Cause.required(f"spec.names.{key}") for key in ("kind", "plural")
               if not names.get(key)]  # fmt: skip
    if spec.get("group") and names.get("plural"):
        expected = f"{names['plural']}.{spec['group']}"
        if obj["metadata"]["name"] != expected:
            causes.append(Cause.invalid("metadata.name", obj["metadata"]["name"],
                                        "must be spec.names.plural+\".\"+spec.group"))  # fmt: skip
    return causes


# ---------------------------------------------------------------------------
# The store.
# ---------------------------------------------------------------------------


def now_rfc3339() -> str:
    """The current time as ``metav1.Time`` serialises it: RFC 3339, whole seconds, UTC."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clone(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change, as a watch delivers it.

    Attributes:
        type: ``ADDED``, ``MODIFIED`` or ``DELETED``.
        resource: The kind changed.
        object: The object after the change (for DELETED, its last state stamped with
            the deletion's resourceVersion).
        previous: The object before a MODIFIED change, to decide what a selective
            watch sees when the change moves an object in or out of its selection.
    """

    type: str
    resource: Resource
    object: Object
    previous: Object | None = None

    @property
    def resource_version(self) -> int:
        return int(self.object["metadata"]["resourceVersion"])

    def as_seen_by(self, selection: Selection) -> tuple[str, Object] | None:
        """The event a watch with ``selection`` gets, if any: a change that moves an
        object into the selection is ADDED there, one that moves it out is DELETED."""
        now = selection.matches(self.object)
        before = self.previous is not None and selection.matches(self.previous)
        if self.type != "MODIFIED":
            return (self.type, self.object) if now else None
        if now:
            return ("MODIFIED" if before else "ADDED", self.object)
        return ("DELETED", self.object) if before else None


class ObjectStore:
    """An in-memory API server storage layer with the semantics of the real one.

    Args:
        resources: The kinds stored.
        history: How many watch events are kept; a watch from a resourceVersion older
            than the oldest kept answers 410 Expired (as after etcd compaction).
        namespaces: Namespaces that exist from the start.
        create_namespaces: Create a namespace the first time an object is created in
            it. The real server answers 404 instead; tests of namespace handling turn
            this off.
    """

    def __init__(
        self,
        resources: Iterable[Resource] = RESOURCES,
        *,
        history: int = 10_000,
        namespaces: Iterable[str] = ("default", "kube-system", "kube-public", "kube-node-lease"),
        create_namespaces: bool = True,
    ):
        self.resources = tuple(resources)
        self.create_namespaces = create_namespaces
        self._by_path = {(r.group, r.version, r.plural): r for r in self.resources}
        self._crd_schemas: dict[Resource, Object] = {}
        self._rules = _kind_rules(_ClusterIPs())
        self._objects: dict[Resource, dict[tuple[str, str], Object]] = {
            resource: {} for resource in self.resources
        }
        self._events: deque[WatchEvent] = deque(maxlen=history)
        self._revision = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._namespaces = self.resource("", "v1", "namespaces")
        for name in namespaces:
            self.create(self._namespaces, None, {"metadata": {"name": name}})

    # Lookup ---------------------------------------------------------------------

    def resource(self, group: str, version: str, plural: str) -> Resource:
        """The kind served at ``/apis/{group}/{version}/{plural}``.

        Raises:
            ApiError: 404 NotFound for a kind the store does not hold.
        """
        found = self._by_path.get((group, version, plural))
        if found is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return found

    def resource_for(self, api_version: str, kind: str) -> Resource:
        """The kind an object's ``apiVersion`` and ``kind`` name."""
        for resource in self.resources:
            if resource.api_version == api_version and resource.kind == kind:
                return resource
        raise ApiError(
            404, "NotFound", f"no kind {kind!r} is registered for version {api_version!r}"
        )

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion: the number of writes so far."""
        with self._lock:
            return self._revision

    # Reads ------------------------------------------------------------------------

    def get(self, resource: Resource, namespace: str | None, name: str) -> Object:
        """The stored object, with kind and apiVersion.

        Raises:
            ApiError: 404 NotFound.
        """
        with self._lock:
            return self._typed(resource, _clone(self._current(resource, namespace, name)))

    def list(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        label_selector: str = "",
        field_selector: str = "",
        limit: int = 0,
        continue_token: str = "",
    ) -> Object:
        """A ``…List`` object of the objects selected, sorted by namespace and name.

        ``limit`` and ``continue_token`` page through the list; the pages are read
        from the current state rather than a snapshot at the first page's version.
        """
        selection = Selection.parse(resource, namespace, label_selector, field_selector)
        after: tuple[str, ...] = ()
        if continue_token:
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(continue_token))["after"])
            except (ValueError, KeyError, TypeError):
                raise ApiError.bad_request("continue key is not valid") from None
        with self._lock:
            items = [
                _clone(obj)
                for key, obj in sorted(self._objects[resource].items())
                if key > after and selection.matches(obj)
            ]
            metadata: Object = {"resourceVersion": str(self._revision)}
        if limit and len(items) > limit:
            token = json.dumps({"after": _key_of(items[limit - 1])})
            metadata["continue"] = base64.urlsafe_b64encode(token.encode()).decode()
            metadata["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": metadata,
            "items": items,
        }

    def objects(self, resource: Resource, selection: Selection = Selection()) -> list[Object]:
        """Copies of the stored objects ``selection`` picks, for controllers."""
        with self._lock:
            return [
                self._typed(resource, _clone(obj))
                for obj in self._objects[resource].values()
                if selection.matches(obj)
            ]

    # Writes -----------------------------------------------------------------------

    def create(
        self,
        resource: Resource,
        namespace: str | None,
        obj: Object,
        *,
        dry_run: bool = False,
        field_validation: str = "Ignore",
        warnings: builtins.list[str] | None = None,
    ) -> Object:
        """Create ``obj``; the server sets uid, creationTimestamp, generation and
        resourceVersion, applies the kind's defaults and validates.

        Raises:
            ApiError: 409 AlreadyExists, 422 Invalid, 400 for a mismatched namespace
                or kind, 404 for a missing namespace (when not created on demand).
        """
        obj = self._checked_body(resource, namespace, obj)
        metadata = obj["metadata"]
        if not metadata.get("name") and metadata.get("generateName"):
            suffix = "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
            metadata["name"] = f"{metadata['generateName']}{suffix}"
        name = metadata.get("name") or ""
        if not name:
            raise ApiError.invalid(
                resource, "", [Cause.required("metadata.name", "name or generateName is required")]
            )
        for system_field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            metadata.pop(system_field, None)
        metadata.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
        if resource.has_status:
            metadata["generation"] = 1
            obj.pop("status", None)
        self._admit(resource, obj, None, field_validation, warnings)
        with self._lock:
            if resource.namespaced:
                self._ensure_namespace(namespace or "", dry_run)
            key = (namespace or "", name)
            if key in self._objects[resource]:
                raise ApiError.already_exists(resource, name)
            if dry_run:
                return self._typed(resource, obj)
            return self._commit(resource, key, obj, "ADDED")

    def replace(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        obj: Object,
        *,
        subresource: str = "",
        dry_run: bool = False,
        field_validation: str = "Ignore",
        warnings: builtins.list[str] | None = None,
    ) -> Object:
        """Replace the object (PUT); with ``subresource="status"`` only its status.

        A ``metadata.resourceVersion`` in ``obj`` is a precondition: a stale one is
        answered 409 Conflict. Without one the update is unconditional.

        Raises:
            ApiError: 404, 409 Conflict, 422 Invalid, 400 for a mismatched name.
        """
        obj = self._checked_body(resource, namespace, obj)
        if obj["metadata"].get("name") != name:
            raise ApiError.bad_request(
                f"the name of the object ({obj['metadata'].get('name')}) does not match "
                f"the name on the URL ({name})"
            )
        with self._lock:
            return self._update(
                resource, namespace, name, obj, subresource, dry_run, field_validation, warnings
            )

    def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str,
        *,
        subresource: str = "",
        dry_run: bool = False,
        field_validation: str = "Ignore",
        warnings: builtins.list[str] | None = None,
    ) -> Object:
        """Patch the object with a JSON, merge or strategic merge patch.

        Raises:
            ApiError: 404, 409 Conflict (a resourceVersion in the patch that is not the
                current one), 415, 422, 400.
        """
        with self._lock:
            current = self._typed(resource, _clone(self._current(resource, namespace, name)))
            patched = apply_patch(current, patch, content_type)
            patched = self._checked_body(resource, namespace, patched)
            if patched["metadata"].get("name") != name:
                raise ApiError.bad_request("a patch may not change the object's name")
            return self._update(
                resource, namespace, name, patched, subresource, dry_run, field_validation, warnings
            )

    def update(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        change: Callable[[Object], None],
        *,
        subresource: str = "",
    ) -> Object:
        """Read, change in place with ``change`` and write back, atomically: how the
        controllers of the tests write, never conflicting with themselves."""
        with self._lock:
            obj = self._typed(resource, _clone(self._current(resource, namespace, name)))
            change(obj)
            return self._update(resource, namespace, name, obj, subresource, False)

    def bind(self, namespace: str, name: str, node: str) -> Object:
        """Assign a pod to ``node``, as ``POST pods/{name}/binding`` does.

        Raises:
            ApiError: 404, or 409 Conflict when the pod is already assigned.
        """
        pods = self.resource("", "v1", "pods")
        with self._lock:
            pod = self._typed(pods, _clone(self._current(pods, namespace, name)))
            if pod["spec"].get("nodeName"):
                raise ApiError.conflict(
                    pods,
                    name,
                    f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
                )
            pod["spec"]["nodeName"] = node
            conditions = pod.setdefault("status", {}).setdefault("conditions", [])
            conditions.append(
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}
            )
            return self._commit(pods, (namespace, name), pod, "MODIFIED")

    def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        *,
        propagation: str | None = None,
        grace_period: int | None = None,
        preconditions: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> tuple[Object, bool]:
        """Delete the object; returns it and whether it is gone yet.

        An object with finalizers, a pod on a node that has not finished (graceful
        deletion) and a Foreground delete only get a ``deletionTimestamp``; they go
        when the finalizers are removed, the node agent confirms, or the dependents are
        gone. Dependents (by ownerReferences) are deleted after a Background delete,
        before a Foreground one's owner goes, and released by an Orphan one.

        Raises:
            ApiError: 404, 409 Conflict for a failed precondition, 400 for a bad policy.
        """
        policy = propagation or self.rules(resource).default_propagation
        if policy not in ("Background", "Foreground", "Orphan"):
            raise ApiError.bad_request(
                f"Unsupported value: {policy!r}: supported values: "
                '"Foreground", "Background", "Orphan"'
            )
        with self._lock:
            current = self._current(resource, namespace, name)
            metadata = current["metadata"]
            for field_name in ("uid", "resourceVersion"):
                expected = (preconditions or {}).get(field_name)
                if expected is not None and expected != metadata.get(field_name):
                    raise ApiError.conflict(
                        resource,
                        name,
                        f"Precondition failed: {field_name} in precondition: "
                        f"{expected}, {field_name} in object meta: {metadata.get(field_name)}",
                    )
            if dry_run:
                return self._typed(resource, _clone(current)), False
            return self._delete(resource, current, policy, grace_period)

    def delete_collection(
        self,
        resource: Resource,
        namespace: str | None,
        *,
        label_selector: str = "",
        field_selector: str = "",
        propagation: str | None = None,
    ) -> Object:
        """Delete every object selected; returns the ``…List`` of them as deleted."""
        listed = self.list(
            resource, namespace, label_selector=label_selector, field_selector=field_selector
        )
        deleted = []
        for item in listed["items"]:
            meta = item["metadata"]
            try:
                obj, _ = self.delete(
                    resource, meta.get("namespace"), meta["name"], propagation=propagation
                )
            except ApiError as error:
                if error.code != 404:
                    raise
                continue
            deleted.append(obj)
        listed["items"] = deleted
        return listed

    # Watching ----------------------------------------------------------------------

    def watch(
        self,
        resource: Resource,
        selection: Selection,
        resource_version: str = "",
        *,
        send_initial_events: bool = False,
    ) -> Watch:
        """Start a watch: changes after ``resource_version`` (or, without one or with
        ``"0"``, the current objects as ADDED first, then changes).

        Raises:
            ApiError: 410 Expired when ``resource_version`` is older than the history
                kept; 400 when it is not a number.
        """
        with self._lock:
            initial: list[tuple[str, Object]] = []
            if resource_version in ("", "0") or send_initial_events:
                initial = [
                    ("ADDED", self._typed(resource, _clone(obj)))
                    for _, obj in sorted(self._objects[resource].items())
                    if selection.matches(obj)
                ]
                cursor = self._revision
            else:
                try:
                    cursor = int(resource_version)
                except ValueError:
                    raise ApiError.bad_request(
                        f"invalid resource version: {resource_version!r}"
                    ) from None
                self._check_not_compacted(cursor)
            return Watch(self, resource, selection, cursor, initial)

    def wait_for_change(self, after: int, timeout: float) -> int:
        """Block until the resourceVersion passes ``after`` or ``timeout`` ends; return it."""
        with self._changed:
            self._changed.wait_for(lambda: self._revision > after or self._closed, timeout)
            return self._revision

    def close(self) -> None:
        """Wake and end every watch: the server is going away."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def _events_after(self, cursor: int) -> list[WatchEvent]:
        self._check_not_compacted(cursor)
        if not self._events:
            return []
        first = self._events[0].resource_version
        return list(self._events)[max(0, cursor + 1 - first) :]

    def _check_not_compacted(self, cursor: int) -> None:
        oldest_kept = self._events[0].resource_version if self._events else self._revision + 1
        if cursor < oldest_kept - 1 and cursor < self._revision:
            raise ApiError.expired(f"too old resource version: {cursor} ({oldest_kept - 1})")

    # Internals -------------------------------------------------------------------

    def rules(self, resource: Resource) -> KindRules:
        """The registry rules of ``resource``'s kind."""
        return self._rules.get(resource.kind, _PLAIN_RULES)

    def _current(self, resource: Resource, namespace: str | None, name: str) -> Object:
        obj = self._objects[resource].get((namespace or "", name))
        if obj is None:
            raise ApiError.not_found(resource, name)
        return obj

    @staticmethod
    def _typed(resource: Resource, obj: Object) -> Object:
        return {"kind": resource.kind, "apiVersion": resource.api_version, **obj}

    def _checked_body(self, resource: Resource, namespace: str | None, obj: Any) -> Object:
        if not isinstance(obj, dict):
            raise ApiError.bad_request("the body of the request is not a JSON object")
        obj = _clone(obj)
        kind, api_version = obj.pop("kind", resource.kind), obj.pop("apiVersion", None)
        if kind != resource.kind:
            raise ApiError.bad_request(
                f"{kind} in version {api_version!r} cannot be handled as a {resource.kind}"
            )
        if api_version not in (None, resource.api_version):
            raise ApiError.bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({resource.api_version})"
            )
        metadata = obj.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError.bad_request("metadata must be an object")
        if resource.namespaced:
            if metadata.get("namespace") not in (None, "", namespace):
                raise ApiError.bad_request(
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request"
                )
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
        return obj

    def _admit(
        self,
        resource: Resource,
        obj: Object,
        old: Object | None,
        field_validation: str = "Ignore",
        warnings: builtins.list[str] | None = None,
    ) -> None:
        if field_validation != "Ignore":
            self._check_fields(resource, obj, field_validation, warnings)
        rules = self.rules(resource)
        if rules.defaults is not None:
            rules.defaults(obj)
        name = obj["metadata"]["name"]
        causes = _name_causes(name, rules.name_rule) + _labels_causes(obj)
        if resource.custom:
            causes += self._custom_causes(resource, self._typed(resource, obj))
        if rules.validate is not None:
            causes += rules.validate(obj)
        if old is not None and rules.validate_update is not None:
            causes += rules.validate_update(old, obj)
        if causes:
            raise ApiError.invalid(resource, name, causes)

    def _check_fields(
        self,
        resource: Resource,
        obj: Object,
        field_validation: str,
        warnings: builtins.list[str] | None,
    ) -> None:
        """Field validation of a request (``fieldValidation``): a field the kind's schema
        does not know, or a value of the wrong type, fails the request with 400 under
        ``Strict`` (the API server's strict decoding) and is reported as a warning under
        ``Warn``, the server's default (the real server then drops an unknown field;
        the double keeps it). Built-in kinds are checked against the published schemas of
        :data:`~tests.support.kube_schemas.KUBERNETES_VERSION`; custom kinds are always
        checked against their CRD (see :meth:`_custom_causes`)."""
        if field_validation not in ("Strict", "Warn"):
            raise ApiError.bad_request(
                f"fieldValidation: unsupported value {field_validation!r}: "
                "supported values: Ignore, Warn, Strict"
            )
        errors = built_in_errors(self._typed(resource, obj))
        if errors and field_validation == "Strict":
            raise ApiError.bad_request(
                f"{resource.kind} in version {resource.version!r} cannot be handled as a "
                f"{resource.kind}: strict decoding error: {'; '.join(errors)}"
            )
        if warnings is not None:
            warnings.extend(errors)

    def _ensure_namespace(self, namespace: str, dry_run: bool) -> None:
        existing = self._objects[self._namespaces].get(("", namespace))
        if existing is None:
            if not self.create_namespaces:
                raise ApiError.not_found(self._namespaces, namespace)
            if not dry_run:
                self.create(self._namespaces, None, {"metadata": {"name": namespace}})
        elif existing["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} "
                "because it is being terminated",
            )

    def _update(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        obj: Object,
        subresource: str,
        dry_run: bool,
        field_validation: str = "Ignore",
        warnings: builtins.list[str] | None = None,
    ) -> Object:
        old = self._current(resource, namespace, name)
        expected = obj["metadata"].get("resourceVersion")
        if expected and expected != old["metadata"]["resourceVersion"]:
            raise ApiError.conflict(
                resource,
                name,
                "the object has been modified; please apply your changes "
                "to the latest version and try again",
            )
        new = self._merge_update(resource, old, obj, subresource)
        if subresource != "status":
            self._admit(resource, new, old, field_validation, warnings)
        if dry_run:
            return self._typed(resource, new)
        key = (namespace or "", name)
        released = old["metadata"].get("finalizers") and not new["metadata"].get("finalizers")
        if released and new["metadata"].get("deletionTimestamp"):
            # The last finalizer went: the deletion it held up completes now.
            return self._remove(resource, key, "Background")
        return self._commit(resource, key, new, "MODIFIED")

    @staticmethod
    def _merge_update(resource: Resource, old: Object, obj: Object, subresource: str) -> Object:
        """The object an update stores: what the request may change, on top of what
        only the server sets."""
        if subresource == "status":
            new = _clone(old)
            new["status"] = obj.get("status") or {}
            return new
        new = _clone(obj)
        system = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")
        for system_field in (*system, "generation", "resourceVersion"):
            new["metadata"].pop(system_field, None)
            if system_field in old["metadata"] and system_field != "resourceVersion":
                new["metadata"][system_field] = old["metadata"][system_field]
        if resource.has_status:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)

            def spec_of(o: Object) -> Object:
                return {k: v for k, v in o.items() if k not in ("metadata", "status")}

            if spec_of(new) != spec_of(old):
                new["metadata"]["generation"] = old["metadata"].get("generation", 0) + 1
        return new

    def _delete(
        self, resource: Resource, current: Object, policy: str, grace_period: int | None
    ) -> tuple[Object, bool]:
        key = _key_of(current)
        metadata = current["metadata"]
        marked = _clone(current)
        marked_meta = marked["metadata"]
        if resource.kind == "Pod":
            grace = current["spec"].get("terminationGracePeriodSeconds", 30)
            grace = grace if grace_period is None else grace_period
            on_node = current["spec"].get("nodeName")
            finished = current.get("status", {}).get("phase") in ("Succeeded", "Failed")
            if on_node and not finished and grace > 0:
                # Graceful deletion: the node agent stops the containers, then deletes
                # the pod with a grace period of 0.
                if metadata.get("deletionTimestamp"):
                    return self._typed(resource, _clone(current)), False
                marked_meta["deletionTimestamp"] = now_rfc3339()
                marked_meta["deletionGracePeriodSeconds"] = grace
                return self._commit(resource, key, marked, "MODIFIED"), False
        if resource == self._namespaces:
            marked_meta["deletionTimestamp"] = now_rfc3339()
            marked["status"] = {"phase": "Terminating"}
            self._commit(resource, key, marked, "MODIFIED")
            self._delete_namespace_contents(metadata["name"])
            return self._remove(resource, key, policy), True
        foreground = policy == "Foreground" and self._has_dependents(current)
        if not metadata.get("finalizers") and not foreground:
            return self._remove(resource, key, policy), True
        if metadata.get("deletionTimestamp") and not foreground:
            return self._typed(resource, _clone(current)), False
        marked_meta.setdefault("deletionTimestamp", now_rfc3339())
        marked_meta.setdefault("deletionGracePeriodSeconds", 0)
        finalizers = marked_meta.setdefault("finalizers", [])
        if foreground and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        committed = self._commit(resource, key, marked, "MODIFIED")
        if foreground:
            self._delete_dependents(current, "Background")
            if self._finish_foreground(committed):
                gone = self._typed(resource, _clone(committed))
                gone["metadata"]["resourceVersion"] = str(self._revision)
                return gone, True
        return committed, False

    def _remove(self, resource: Resource, key: tuple[str, str], policy: str) -> Object:
        obj = self._objects[resource].pop(key)
        self._revision += 1
        gone = _clone(obj)
        gone["metadata"]["resourceVersion"] = str(self._revision)
        gone = self._typed(resource, gone)
        self._record(WatchEvent("DELETED", resource, gone))
        if resource.kind == "CustomResourceDefinition":
            self._forget_definition(obj)
        if policy == "Orphan":
            self._orphan_dependents(obj)
        else:
            self._delete_dependents(obj, "Background")
        self._finish_foreground_owners(obj)
        return _clone(gone)

    def _commit(self, resource: Resource, key: tuple[str, str], obj: Object, event: str) -> Object:
        previous = self._objects[resource].get(key)
        self._revision += 1
        stored = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
        stored["metadata"]["resourceVersion"] = str(self._revision)
        self._objects[resource][key] = _clone(stored)
        typed = self._typed(resource, stored)
        previous_typed = self._typed(resource, previous) if previous is not None else None
        self._record(WatchEvent(event, resource, _clone(typed), previous_typed))
        if resource.kind == "CustomResourceDefinition":
            self._serve_definition(stored)
        return typed

    # Custom resources ----------------------------------------------------------------

    def _serve_definition(self, crd: Object) -> None:
        """Serve the kinds a CustomResourceDefinition defines, one per served version,
        as the API server's apiextensions registry does once the CRD is Established."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec.get("versions") or []:
            if not version.get("served"):
                continue
            resource = Resource(
                names["kind"],
                names["plural"],
                f"{spec['group']}/{version['name']}",
                spec.get("scope", "Namespaced") == "Namespaced",
                tuple(names.get("shortNames") or ()),
                tuple(names.get("categories") or ()),
                ("status",) if "status" in (version.get("subresources") or {}) else (),
                custom=True,
            )
            stale = self._by_path.get((resource.group, resource.version, resource.plural))
            if stale is not None and stale != resource:
                self._forget(stale)
            if stale != resource:
                self.resources = (*self.resources, resource)
                self._by_path[(resource.group, resource.version, resource.plural)] = resource
                self._objects.setdefault(resource, {})
            schema = ((version.get("schema") or {}).get("openAPIV3Schema")) or {}
            self._crd_schemas[resource] = schema

    def _forget(self, resource: Resource) -> None:
        """Stop serving a custom kind; its objects go with it, as when a CRD is deleted."""
        for obj in list(self._objects.pop(resource, {}).values()):
            self._revision += 1
            gone = self._typed(resource, _clone(obj))
            gone["metadata"]["resourceVersion"] = str(self._revision)
            self._record(WatchEvent("DELETED", resource, gone))
        self.resources = tuple(r for r in self.resources if r != resource)
        self._by_path.pop((resource.group, resource.version, resource.plural), None)
        self._crd_schemas.pop(resource, None)

    def _forget_definition(self, crd: Object) -> None:
        spec = crd["spec"]
        for resource in [r for r in self.resources if r.custom and r.group == spec["group"]]:
            if resource.plural == spec["names"]["plural"]:
                self._forget(resource)

    def _custom_causes(self, resource: Resource, obj: Object) -> builtins.list[Cause]:
        """The object checked against its CRD's ``openAPIV3Schema``."""
        schema = self._crd_schemas.get(resource)
        if not schema:
            return []
        validator = jsonschema.Draft7Validator(schema)
        causes = []
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
            path = ".".join(str(part) for part in error.path)
            if error.validator == "required":
                missing = error.message.split("'")[1] if "'" in error.message else ""
                causes.append(Cause.required(".".join(p for p in (path, missing) if p)))
            else:
                causes.append(Cause.invalid(path or "<object>", error.instance, error.message))
        return causes

    def _record(self, event: WatchEvent) -> None:
        self._events.append(event)
        self._changed.notify_all()

    def _dependents(self, owner: Object) -> Iterator[tuple[Resource, tuple[str, str], Object]]:
        uid = owner["metadata"]["uid"]
        for resource, objects in self._objects.items():
            for key, obj in list(objects.items()):
                references = obj["metadata"].get("ownerReferences") or []
                if any(reference.get("uid") == uid for reference in references):
                    yield resource, key, obj

    def _has_dependents(self, owner: Object) -> bool:
        return next(self._dependents(owner), None) is not None

    def _delete_dependents(self, owner: Object, policy: str) -> None:
        for resource, key, obj in list(self._dependents(owner)):
            if key in self._objects[resource]:
                namespace = key[0] or None
                self.delete(resource, namespace, obj["metadata"]["name"], propagation=policy)

    def _orphan_dependents(self, owner: Object) -> None:
        uid = owner["metadata"]["uid"]
        for resource, key, obj in list(self._dependents(owner)):
            released = _clone(obj)
            references = [r for r in released["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if references:
                released["metadata"]["ownerReferences"] = references
            else:
                del released["metadata"]["ownerReferences"]
            self._commit(resource, key, released, "MODIFIED")

    def _finish_foreground(self, owner: Object) -> bool:
        """Remove a Foreground-deleted owner once its dependents are gone."""
        metadata = owner["metadata"]
        if "foregroundDeletion" not in (metadata.get("finalizers") or []):
            return False
        if self._has_dependents(owner):
            return False
        resource = self.resource_for(owner["apiVersion"], owner["kind"])
        key = _key_of(owner)
        if key not in self._objects[resource]:
            return True
        remaining = [f for f in metadata["finalizers"] if f != "foregroundDeletion"]
        if remaining:
            finished = _clone(self._objects[resource][key])
            finished["metadata"]["finalizers"] = remaining
            self._commit(resource, key, finished, "MODIFIED")
            return False
        self._remove(resource, key, "Background")
        return True

    def _finish_foreground_owners(self, dependent: Object) -> None:
        for reference in dependent["metadata"].get("ownerReferences") or []:
            for resource, objects in self._objects.items():
                for obj in list(objects.values()):
                    if obj["metadata"]["uid"] == reference.get("uid"):
                        self._finish_foreground(self._typed(resource, obj))

    def _delete_namespace_contents(self, namespace: str) -> None:
        for resource in self.resources:
            if not resource.namespaced:
                continue
            for key, obj in list(self._objects[resource].items()):
                if key[0] == namespace and key in self._objects[resource]:
                    self.delete(resource, namespace, obj["metadata"]["name"], grace_period=0)


def _key_of(obj: Object) -> tuple[str, str]:
    metadata = obj["metadata"]
    return (metadata.get("namespace") or "", metadata["name"])


class Watch:
    """One open watch: the initial events, then the changes after its cursor.

    Iterate with :meth:`next_events`; it raises :class:`ApiError` 410 Expired when
    the watch falls behind the history kept.
    """

    def __init__(
        self,
        store: ObjectStore,
        resource: Resource,
        selection: Selection,
        cursor: int,
        initial: list[tuple[str, Object]],
    ):
        self._store = store
        self.resource = resource
        self.selection = selection
        self.cursor = cursor
        self._initial = initial

    def next_events(self, timeout: float) -> list[tuple[str, Object]]:
        """The events since the last call, waiting up to ``timeout`` for one."""
        if self._initial:
            initial, self._initial = self._initial, []
            return initial
        deadline = time.monotonic() + timeout
        store = self._store
        with store._changed:
            while True:
                events = store._events_after(self.cursor)
                if events:
                    self.cursor = events[-1].resource_version
                    seen = (
                        event.as_seen_by(self.selection)
                        for event in events
                        if event.resource == self.resource
                    )
                    chosen = [item for item in seen if item is not None]
                    if chosen:
                        return [(kind, _clone(obj)) for kind, obj in chosen]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or store.closed:
                    return []
                store._changed.wait(remaining)
