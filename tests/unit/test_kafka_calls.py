"""Every blocking broker call of the Kafka code has a timeout: a rebalance or a broker
that stops answering never wedges a worker or the build."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2] / "pipelines" / "unsafechain"
FILES = [ROOT / "streaming" / "kafka.py", ROOT / "dataset" / "kafka.py"]
BLOCKING = {"commit", "committed", "end_offsets", "flush", "poll"}
CLIENTS = {"consumer", "producer", "_consumer", "_producer", "_probe", "future"}


def _receiver(call: ast.Call) -> str:
    value = call.func.value  # type: ignore[attr-defined]
    return value.attr if isinstance(value, ast.Attribute) else getattr(value, "id", "")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_blocking_broker_call_has_a_timeout(path):
    unbounded = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, receiver = node.func.attr, _receiver(node)
        blocking = name in BLOCKING or (name in {"get", "close"} and receiver in CLIENTS)
        if blocking and receiver in CLIENTS:
            keywords = {keyword.arg for keyword in node.keywords}
            if not keywords & {"timeout", "timeout_ms"}:
                unbounded.append(f"{path.name}:{node.lineno} {receiver}.{name}()")
    assert unbounded == []
