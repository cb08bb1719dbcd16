"""The Helm chart: it lints strictly, every value set of ``charts/unsafechain/ci/``
renders objects that Kubernetes 1.33 (and, for the custom resources, the KEDA, Strimzi
and Prometheus Operator CRDs) accept, the pods start with settings the platform itself
accepts on the ports their Services expose, and a wrong value is refused by name.

No cluster is involved: what a real API server, admission, the scheduler and the images
would do is not tested here.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.chart import (
    CHART,
    CI_VALUES,
    ROOT,
    component,
    env_of,
    helm,
    pod_specs,
    render,
    requires_helm,
)
from tests.support.kube_schemas import BUILT_IN, CUSTOM_SPECS, KUBERNETES_VERSION
from unsafechain.correction.settings import CorrectionServiceSettings
from unsafechain.dataset.config import load_config
from unsafechain.generation.settings import GenerationServiceSettings
from unsafechain.judge.settings import JudgeServiceSettings
from unsafechain.runtime.settings import ServerSettings, settings_from_values
from unsafechain.training.settings import TrainingServiceSettings

pytestmark = requires_helm

_METADATA = {
    "type": "object",
    "required": ["name", "labels"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}

# Each custom resource the chart renders: a spec its CRD accepts, and the chart's names
# and labels.
CUSTOM = {
    key: {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _METADATA, "spec": spec},
    }
    for key, spec in CUSTOM_SPECS.items()
}

GPU_COMPONENTS = {"tgi", "vllm"}
GRPC_SERVICES = {"generation", "judge", "correction", "training"}
STAGE_SERVICES = {"generation", "judge", "correction"}


def values_args(path: Path | None) -> list[str]:
    return ["-f", str(path)] if path else []


VALUE_SETS = [None, *CI_VALUES]
IDS = ["defaults", *(path.stem for path in CI_VALUES)]


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_chart_lints_strictly(values: Path | None) -> None:
    done = helm("lint", "--strict", str(CHART), *values_args(values))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_every_rendered_object_is_a_valid_object_of_a_known_kind(values: Path | None) -> None:
    for doc in render(*values_args(values)):
        key = (doc["apiVersion"], doc["kind"])
        where = f"{doc['kind']} {doc['metadata']['name']}"
        if key in BUILT_IN:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where}: {error.message} at {list(error.path)}")
        elif key in CUSTOM:
            try:
                jsonschema.validate(doc, CUSTOM[key])
            except jsonschema.ValidationError as error:
                pytest.fail(f"{where}: {error.message} at {list(error.path)}")
        else:
            pytest.fail(f"{where}: {key} is no kind this test knows how to validate")


def test_the_value_sets_render_what_they_are_for() -> None:
    kinds = {
        path.stem: {(component(doc), doc["kind"]) for doc in render("-f", str(path))}
        for path in CI_VALUES
    }
    assert ("tgi", "Deployment") in kinds["gpu-values"]
    assert ("vllm", "Deployment") in kinds["gpu-values"]
    assert ("judge", "ServiceMonitor") in kinds["gpu-values"]
    assert ("worker-route", "PodMonitor") in kinds["gpu-values"]
    assert not {kind for _, kind in kinds["minimal-values"]} & {"ScaledObject", "KafkaTopic"}
    assert not {name for name, _ in kinds["minimal-values"]} & GPU_COMPONENTS
    assert ("topics", "KafkaTopic") in kinds["strimzi-values"]
    assert ("topics", "Job") not in kinds["strimzi-values"]
    assert {name for name, kind in kinds["keda-values"] if kind == "ScaledObject"} == {
        "worker-generate",
        "worker-judge",
        "worker-route",
        "worker-correct",
    }


def test_strimzi_topics_are_every_build_topic_and_its_dead_letter_topic() -> None:
    docs = render("-f", str(CHART / "ci" / "strimzi-values.yaml"))
    topics = {doc["spec"]["topicName"] for doc in docs if doc["kind"] == "KafkaTopic"}
    build = ["prompts", "generated", "judged", "to-correct", "records"]
    expected = {f"unsafechain.v1.{t}" for t in build} | {f"unsafechain.v1.{t}.dlq" for t in build}
    assert topics == expected | {"unsafechain.v1.datasets"}
    for doc in docs:
        if doc["kind"] == "KafkaTopic":
            assert doc["metadata"]["labels"]["strimzi.io/cluster"] == "build"
            assert doc["spec"]["partitions"] == 8


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_every_container_is_probed_bounded_and_locked_down(values: Path | None) -> None:
    for doc, spec in pod_specs(render(*values_args(values))):
        where = f"{doc['kind']} {doc['metadata']['name']}"
        assert spec["enableServiceLinks"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            if doc["kind"] != "Job":
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in container, f"{where}: no {probe}"
            assert container["resources"]["requests"], f"{where}: no requests"
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in tmp, f"{where}: /tmp is no emptyDir"
            tag = container["image"].rsplit(":", 1)[1]
            assert tag and tag != "latest" and "/" not in tag, f"{where}: unpinned image"


def test_grpc_services_are_probed_on_grpc_health_unless_they_speak_tls() -> None:
    for values, tls in (("minimal-values.yaml", False), ("tls-values.yaml", True)):
        docs = render("-f", str(CHART / "ci" / values))
        for doc, spec in pod_specs(docs):
            if component(doc) not in GRPC_SERVICES:
                continue
            container = spec["containers"][0]
            port = int(env_of(container)["UNSAFECHAIN_PORT"])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                expected = {"port": port} if tls else {"port": port, "service": ""}
                assert container[probe]["tcpSocket" if tls else "grpc"] == expected


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_gpus_are_requested_only_by_the_gpu_components(values: Path | None) -> None:
    for doc, spec in pod_specs(render(*values_args(values))):
        gpu = component(doc) in GPU_COMPONENTS
        for container in spec["containers"]:
            resources = container["resources"]
            asks = "nvidia.com/gpu" in resources.get("requests", {})
            assert asks == gpu, f"{doc['metadata']['name']}: nvidia.com/gpu {asks}"
            if gpu:
                assert (
                    resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
                )
        if gpu:
            assert spec["nodeSelector"] and spec["tolerations"], doc["metadata"]["name"]
        else:
            assert not any("nvidia" in key for key in spec.get("nodeSelector", {}))
            assert not spec.get("tolerations"), doc["metadata"]["name"]


def test_gpu_servers_read_their_hub_token_from_a_secret_and_cache_models_on_a_claim() -> None:
    docs = render("-f", str(CHART / "ci" / "gpu-values.yaml"))
    for doc, spec in pod_specs(docs):
        if component(doc) not in GPU_COMPONENTS:
            continue
        container = spec["containers"][0]
        token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {f"{component(doc)}-models"}
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"


MARKER = "zz-marker-5f1c"
SECRET_NAMES = [
    f"--set=secretEnv[0].name=OPENAI_API_KEY,secretEnv[0].secretName={MARKER}-openai,secretEnv[0].key=k",
    f"--set=tls.enabled=true,tls.secretName={MARKER}-tls,tls.clientCertificateSecret={MARKER}-client",
    f"--set=auth.tokensSecret.name={MARKER}-tokens,auth.clientTokenSecret.name={MARKER}-client-token",
    f"--set=inference.tgi.enabled=true,inference.tgi.hubTokenSecret.name={MARKER}-hf",
    f"--set=kafka.tls.enabled=true,kafka.tls.caSecret.name={MARKER}-kafka-ca,"
    f"kafka.tls.clientCertificateSecret={MARKER}-kafka-client",
    f"--set=kafka.sasl.mechanism=PLAIN,kafka.sasl.username=u,kafka.sasl.passwordSecret.name={MARKER}-sasl",
    "--set=workers.judge.autoscaling.enabled=true",
]


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def test_credentials_are_rendered_only_as_references_to_existing_secrets() -> None:
    docs = render("-f", str(CHART / "ci" / "gpu-values.yaml"), *SECRET_NAMES)
    assert not [doc for doc in docs if doc["kind"] == "Secret"]
    for doc in docs:
        for path, text in _strings(doc):
            if MARKER in text:
                # A Secret's name, where a pod refers to it; never in data or env values.
                assert path.endswith((".secretName", ".secretKeyRef.name")) or (
                    doc["kind"] == "TriggerAuthentication" and ".secretTargetRef[" in path
                ), f"{doc['kind']} {doc['metadata']['name']}{path}"


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        (f"auth.tokensSecret.value={MARKER}", "value"),
        (f"services.judge.env.UNSAFECHAIN_AUTH_TOKENS={MARKER}", "UNSAFECHAIN_AUTH_TOKENS"),
        (f"tls.certificate={MARKER}", "certificate"),
        (f"inference.tgi.hubToken={MARKER}", "hubToken"),
    ],
)
def test_an_inline_credential_is_refused(setting: str, named: str) -> None:
    done = helm("template", "rel", str(CHART), "--set", setting)
    assert done.returncode != 0
    assert named in done.stderr


def _start_settings(
    name: str, container: dict[str, Any], config: Path, monkeypatch: pytest.MonkeyPatch
) -> ServerSettings:
    classes: dict[str, type[ServerSettings]] = {
        "generation": GenerationServiceSettings,
        "judge": JudgeServiceSettings,
        "correction": CorrectionServiceSettings,
        "training": TrainingServiceSettings,
    }
    with monkeypatch.context() as patch:
        for key, value in env_of(container).items():
            patch.setenv(key, value)
        # The service-link variable a Service named like the chart would inject.
        patch.setenv("UNSAFECHAIN_SERVICE_PORT", "tcp://10.0.0.7:50051")
        return settings_from_values(classes[name], {}, config=config)


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_no_path_in_a_rendered_config_is_relative_to_its_read_only_folder(
    values: Path | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod reads its config from the ConfigMap's folder (/etc/unsafechain, read-only);
    a relative path in it would start there. Each config is loaded from a folder of its
    own, as the pod loads it, and no setting may lead into that folder."""
    docs = render(*values_args(values))
    maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
    folder = tmp_path / "etc-unsafechain"
    folder.mkdir()
    build = folder / "config.yaml"
    build.write_text(maps["rel-unsafechain-config"]["config.yaml"])
    loaded: list[str] = [load_config(build).model_dump_json()]
    for doc, spec in pod_specs(docs):
        name = component(doc)
        if name not in GRPC_SERVICES:
            continue
        config_map = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")
        path = folder / f"{config_map}.yaml"
        path.write_text(maps[config_map]["config.yaml"])
        container = spec["containers"][0]
        loaded.append(_start_settings(name, container, path, monkeypatch).model_dump_json())
    assert len(loaded) > 1
    assert not [dump for dump in loaded if str(folder) in dump]


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_services_expose_the_ports_the_pods_start_with(
    values: Path | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(*values_args(values))
    services = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Service"}
    maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
    build = tmp_path / "build.yaml"
    build.write_text(maps["rel-unsafechain-config"]["config.yaml"])
    config = load_config(build)
    for doc, spec in pod_specs(docs):
        name = component(doc)
        container = spec["containers"][0]
        if name.startswith("worker-"):
            assert container["args"][:4] == [
                "worker",
                name.removeprefix("worker-"),
                "--config",
                "/etc/unsafechain/config.yaml",
            ]
            continue
        if name not in GRPC_SERVICES:
            continue
        assert container["args"] == ["serve", name, "--config", "/etc/unsafechain/config.yaml"]
        config_map = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")
        path = tmp_path / f"{config_map}.yaml"
        path.write_text(maps[config_map]["config.yaml"])
        settings = _start_settings(name, container, path, monkeypatch)
        ports = {p["name"]: p for p in services[doc["metadata"]["name"]]["spec"]["ports"]}
        container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"]["port"] == container_ports["grpc"] == settings.port
        assert ports["metrics"]["port"] == container_ports["metrics"] == settings.metrics_port
        assert ports["grpc"]["targetPort"] == "grpc" and ports["metrics"]["targetPort"] == "metrics"
        if name in STAGE_SERVICES:
            remote = getattr(config.remote, name)
            assert remote.address == f"{doc['metadata']['name']}:{settings.port}"
            assert remote.uses_tls == settings.uses_tls


def _peers(policy: dict[str, Any], port: int) -> list[dict[str, Any]]:
    # A rule without `from` would admit every peer: the chart never renders one.
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])
    return [
        peer
        for rule in policy["spec"]["ingress"]
        if any(p["port"] == port for p in rule["ports"])
        for peer in rule["from"]
    ]


@pytest.mark.parametrize("values", ["gpu-values.yaml", "tls-values.yaml"])
def test_network_policies_allow_exactly_the_paths_of_the_architecture(values: str) -> None:
    docs = render("-f", str(CHART / "ci" / values))
    policies = {component(doc): doc for doc in docs if doc["kind"] == "NetworkPolicy"}
    deployed = {component(doc) for doc in docs if doc["kind"] == "Deployment"}
    gated = (GRPC_SERVICES | GPU_COMPONENTS) & deployed
    assert set(policies) == gated
    chosen = yaml.safe_load((CHART / "ci" / values).read_text())["networkPolicy"]
    clients = chosen.get("clients", [])
    prometheus = chosen.get("prometheus")
    workers = {
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/instance": "rel", "unsafechain.io/role": "worker"}
        }
    }
    for name, policy in policies.items():
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
        service = next(doc for doc in docs if doc["kind"] == "Service" and component(doc) == name)
        port = next(p["port"] for p in service["spec"]["ports"] if p["name"] in ("grpc", "http"))
        if name in GPU_COMPONENTS:
            callers = {
                peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                for peer in _peers(policy, port)
            }
            assert callers == STAGE_SERVICES, name
            assert len(spec["ingress"]) == 1
            continue
        expected = clients if name == "training" else [workers, *clients]
        assert _peers(policy, port) == expected, name
        if name == "training" and not clients and not prometheus:
            assert spec["ingress"] == [], "nothing may reach the training service"
        metrics = [
            rule for rule in spec["ingress"] if any(p["port"] == 9464 for p in rule["ports"])
        ]
        assert metrics == (
            [{"ports": [{"port": 9464, "protocol": "TCP"}], "from": [prometheus]}]
            if prometheus
            else []
        )
        assert len(spec["ingress"]) == bool(expected) + len(metrics)


def test_a_worker_whose_service_is_off_may_call_the_inference_server_itself() -> None:
    docs = render(
        "-f", str(CHART / "ci" / "gpu-values.yaml"), "--set", "services.generation.enabled=false"
    )
    tgi = next(doc for doc in docs if doc["kind"] == "NetworkPolicy" and component(doc) == "tgi")
    callers = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for peer in _peers(tgi, 8080)
    }
    assert callers == {"judge", "correction", "worker-generate"}


def test_the_training_service_may_do_only_what_its_executor_does() -> None:
    docs = render("-f", str(CHART / "ci" / "gpu-values.yaml"))
    role = next(doc for doc in docs if doc["kind"] == "Role")
    rules = {
        (rule["apiGroups"][0], resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("batch", "jobs"): ["create", "delete", "get", "list", "watch"],
        ("", "pods"): ["get", "list", "watch"],
        ("", "pods/log"): ["get"],
    }
    deployment = next(
        doc for doc in docs if doc["kind"] == "Deployment" and component(doc) == "training"
    )
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == role["metadata"]["name"]
    binding = next(doc for doc in docs if doc["kind"] == "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": role["metadata"]["name"], "namespace": "ns"}
    ]
    training = next(
        doc for doc in docs if doc["kind"] == "ConfigMap" and component(doc) == "training"
    )
    kube = yaml.safe_load(training["data"]["config.yaml"])["kubernetes"]
    assert kube["namespace"] == "ns" and kube["instance"] == "rel"
    assert kube["image"] == "ghcr.io/unsafechain/unsafechain-cuda:0.1.0"
    assert kube["gpus"] == 2 and kube["hub_token_secret"] == {"name": "hf-token", "key": "token"}


def test_keda_never_scales_a_stage_past_the_partitions() -> None:
    docs = render("-f", str(CHART / "ci" / "keda-values.yaml"))
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            assert doc["spec"]["maxReplicaCount"] <= 6
            trigger = doc["spec"]["triggers"][0]["metadata"]
            stage = component(doc).removeprefix("worker-")
            assert trigger["consumerGroup"] == f"unsafechain.v1.{stage}"
        if doc["kind"] == "Deployment" and component(doc).startswith("worker-"):
            assert "replicas" not in doc["spec"], "KEDA owns the replica count"


SCHEMA_REFUSALS = [
    (["--set", "services.judge.prot=50051"], "prot"),
    (["--set-string", "kafka.partitions=four"], "partitions"),
    (["--set", "image.tag=latest"], "tag"),
    (["--set", "kafka.topics.create=bitnami"], "create"),
    (["--set", "networkPolicy.enabeld=false"], "enabeld"),
    (["--set", "tls.enabled=true"], "secretName"),
    (["--set", "kafka.sasl.mechanism=SCRAM-SHA-1"], "mechanism"),
    (
        ["--set", "kafka.sasl.mechanism=PLAIN,kafka.sasl.username=u"],
        "kafka.sasl.passwordSecret.name",
    ),
    (["--set", "kafka.settings.security.protocol=SSL"], "settings"),
    (["--set", "kafka.tls.clientCertificateSecret=x"], "clientCertificateSecret"),
]


@pytest.mark.parametrize(("args", "named"), SCHEMA_REFUSALS)
def test_a_wrong_value_fails_template_and_lint_naming_it(args: list[str], named: str) -> None:
    for command in (["template", "rel"], ["lint", "--strict"]):
        done = helm(*command, str(CHART), *args)
        assert done.returncode != 0, (command, args)
        assert named in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "workers.judge.replicas=5"], "workers.judge.replicas"),
        (
            [
                "--set",
                "workers.generate.autoscaling.enabled=true,workers.generate.autoscaling.maxReplicas=9",
            ],
            "workers.generate.autoscaling.maxReplicas",
        ),
        (
            ["--set", "inference.vllm.enabled=true,inference.vllm.serves[0]=nope"],
            "inference.vllm.serves",
        ),
        (["--set", "kafka.topics.create=strimzi"], "kafka.topics.strimzi.cluster"),
    ],
)
def test_a_bound_between_values_is_refused_naming_it(args: list[str], named: str) -> None:
    done = helm("template", "rel", str(CHART), *args)
    assert done.returncode != 0, args
    assert named in done.stderr, done.stderr
    # The schema's refusals fail lint too; a template's `fail` (a bound relating two
    # values, which JSON Schema cannot state) is only reported by lint, which exits 0.
    linted = helm("lint", "--strict", str(CHART), *args)
    assert named in linted.stdout + linted.stderr


def test_the_chart_installs_the_platforms_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    images = {
        container["image"]
        for _, spec in pod_specs(render())
        for container in spec["containers"]
        if "unsafechain" in container["image"]
    }
    assert all(image.endswith(f":{project['version']}") for image in images), images


def test_everything_that_talks_to_kafka_gets_its_tls_and_sasl_from_secrets() -> None:
    docs = render("-f", str(CHART / "ci" / "tls-values.yaml"))
    config = next(doc for doc in docs if doc["kind"] == "ConfigMap" and component(doc) == "config")
    security = yaml.safe_load(config["data"]["config.yaml"])["kafka"]["security"]
    assert security["protocol"] == "SASL_SSL"
    assert security["sasl_password_env"] == "KAFKA_SASL_PASSWORD"
    talkers = [
        (doc, spec)
        for doc, spec in pod_specs(docs)
        if component(doc).startswith("worker-") or component(doc) == "topics"
    ]
    assert len(talkers) == 5
    for _doc, spec in talkers:
        container = spec["containers"][0]
        password = next(e for e in container["env"] if e["name"] == "KAFKA_SASL_PASSWORD")
        assert password["valueFrom"]["secretKeyRef"] == {"name": "kafka-sasl", "key": "password"}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        ca = volumes[mounts["/etc/unsafechain/kafka-tls"]]["secret"]
        assert ca["secretName"] == "kafka-ca"
        assert security["ca_file"] == "/etc/unsafechain/kafka-tls/" + ca["items"][0]["path"]
        client = volumes[mounts["/etc/unsafechain/kafka-client-tls"]]["secret"]
        assert client["secretName"] == "kafka-client-tls"
    scaled = next(doc for doc in docs if doc["kind"] == "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"
    auth = next(doc for doc in docs if doc["kind"] == "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {
        "password",
        "ca",
        "cert",
        "key",
    }
    for doc, spec in pod_specs(docs):
        if component(doc) in GRPC_SERVICES | GPU_COMPONENTS:
            names = {e["name"] for e in spec["containers"][0].get("env", [])}
            assert "KAFKA_SASL_PASSWORD" not in names, "only what talks to Kafka gets it"


# Values whose content is another schema's (the build configuration, the training
# service's settings) or Kubernetes' own (resources, selectors, tolerations, peers).
FREE_FORM = {
    "config",
    "settings",
    "resources",
    "nodeSelector",
    "tolerations",
    "env",
    "labels",
    "prometheus",
    "clients",
}


def test_every_value_is_documented_where_it_is_set() -> None:
    undocumented = []
    path: list[tuple[int, str]] = []
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        found = re.match(r"^(\s*)([A-Za-z][\w.]*):(.*)$", line)
        if not found:
            continue
        indent, key, rest = len(found[1]), found[2], found[3].strip()
        path = [(i, k) for i, k in path if i < indent]
        if any(k in FREE_FORM for _, k in path):
            continue
        path.append((indent, key))
        leaf = bool(rest) and not rest.startswith("#")
        if leaf and not lines[number - 1].strip().startswith("#"):
            undocumented.append(".".join(k for _, k in path))
    assert not undocumented
