"""The schemas the Kubernetes test doubles and the chart tests validate objects with.

Built-in kinds are checked against the published OpenAPI schemas of
:data:`KUBERNETES_VERSION` with ``kubernetes-validate`` (strict: an unknown field is an
error). The custom resources the chart writes (KEDA, Strimzi, the Prometheus Operator)
have no schema in that package, so the part of each CRD the chart relies on is written
down here: the fields of ``spec`` the chart may write (no others), which are required
and their types. :func:`crd` wraps one into a ``CustomResourceDefinition`` for the API
double (:mod:`tests.support.kube_store`), which then serves the kind and validates its
objects against it, as an API server validates against a CRD's structural schema.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate

KUBERNETES_VERSION = "1.33.0"
"""The Kubernetes release whose schemas the objects are checked against."""

BUILT_IN = {
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "Namespace"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "Pod"),
    ("apps/v1", "Deployment"),
    ("batch/v1", "Job"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
}
"""The built-in kinds checked with kubernetes-validate."""


def _spec(spec: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": required,
            "properties": spec}  # fmt: skip


# The custom resources, written down from their CRDs (the CRDs themselves are not to be
# had here): the fields of spec the chart may write (no others), the required ones and
# their types. KEDA 2.x ScaledObject and TriggerAuthentication (keda.sh/v1alpha1;
# the kafka scaler's metadata are strings), Strimzi KafkaTopic (kafka.strimzi.io/v1beta2),
# Prometheus Operator ServiceMonitor and PodMonitor (monitoring.coreos.com/v1).
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ENDPOINTS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "port": {"type": "string"},
            "path": {"type": "string"},
            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
            "scheme": {"enum": ["http", "https"]},
        },
    },
}
CUSTOM_SPECS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _spec(
        {
            "scaleTargetRef": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "kind": {"type": "string"},
                    "apiVersion": {"type": "string"},
                },
            },
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer"},
            "cooldownPeriod": {"type": "integer"},
            "idleReplicaCount": {"type": "integer"},
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["type", "metadata"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"const": "kafka"},
                        "metadata": {
                            **_STRING_MAP,
                            "required": [
                                "bootstrapServers",
                                "consumerGroup",
                                "topic",
                                "lagThreshold",
                            ],
                        },
                        "authenticationRef": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                        },
                    },
                },
            },
        },
        ["scaleTargetRef", "triggers"],
    ),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _spec(
        {
            "secretTargetRef": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["parameter", "name", "key"],
                    "properties": {
                        "parameter": {"type": "string"},
                        "name": {"type": "string"},
                        "key": {"type": "string"},
                    },
                },
            },
            "env": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["parameter", "name"],
                    "properties": {
                        "parameter": {"type": "string"},
                        "name": {"type": "string"},
                        "containerName": {"type": "string"},
                    },
                },
            },
        },
        [],
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): _spec(
        {
            "topicName": {"type": "string"},
            "partitions": {"type": "integer", "minimum": 1},
            "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
            "config": {"type": "object"},
        },
        [],
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _spec(
        {
            "selector": {"type": "object"},
            "namespaceSelector": {"type": "object"},
            "podMetricsEndpoints": _ENDPOINTS,
        },
        ["selector", "podMetricsEndpoints"],
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _spec(
        {
            "selector": {"type": "object"},
            "namespaceSelector": {"type": "object"},
            "endpoints": _ENDPOINTS,
        },
        ["selector", "endpoints"],
    ),
}


CUSTOM_NAMES: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): {"plural": "scaledobjects", "shortNames": ["so"]},
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "plural": "triggerauthentications", "shortNames": ["ta", "triggerauth"]},
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): {
        "plural": "kafkatopics", "shortNames": ["kt"], "categories": ["strimzi"]},
    ("monitoring.coreos.com/v1", "PodMonitor"): {"plural": "podmonitors", "shortNames": ["pmon"]},
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "plural": "servicemonitors", "shortNames": ["smon"]},
}  # fmt: skip
"""The names each custom kind's CRD gives it (plural, short names, categories)."""

WITH_STATUS = {"ScaledObject", "KafkaTopic"}
"""The custom kinds whose CRDs declare a status subresource."""


def crd(api_version: str, kind: str) -> dict[str, Any]:
    """The ``CustomResourceDefinition`` of a kind of :data:`CUSTOM_SPECS`: one served,
    stored version whose schema is the ``spec`` written down here (``status`` is left
    open, as the operators' CRDs mostly do)."""
    group, _, version_name = api_version.rpartition("/")
    names: dict[str, Any] = {"kind": kind, "listKind": f"{kind}List", "singular": kind.lower(),
                             **CUSTOM_NAMES[(api_version, kind)]}  # fmt: skip
    schema = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": CUSTOM_SPECS[(api_version, kind)],
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    version: dict[str, Any] = {
        "name": version_name,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": schema},
    }
    if kind in WITH_STATUS:
        version["subresources"] = {"status": {}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names['plural']}.{group}"},
        "spec": {
            "group": group,
            "names": names,
            "scope": "Namespaced",
            "versions": [version],
        },
    }


def built_in_errors(obj: dict[str, Any]) -> list[str]:
    """What kubernetes-validate (strict) finds wrong with a built-in object, each as
    ``path: message``; empty for a valid object or a kind it has no schema for."""
    if (obj.get("apiVersion"), obj.get("kind")) not in BUILT_IN:
        return []
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path) or "<object>"
        return [f"{path}: {error.message}"]
    return []
