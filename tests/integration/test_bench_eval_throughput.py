"""The evaluation throughput benchmark runs and reports sensible numbers (no speed
targets: machines differ)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPTS, SAMPLES, MODELS = 5, 2, 2


def test_eval_throughput_benchmark_reports_requests_and_fractions(tmp_path):
    out = tmp_path / "result.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "eval_throughput.py"),
        *("--prompts", str(PROMPTS), "--samples", str(SAMPLES)),
        *("--concurrency", "4", "--latency", "0.01", "--resamples", "100"),
        *("--json", str(out)),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr

    result = json.loads(out.read_text())
    generation, judge = result["generation"], result["judge"]
    # One request per case carries its K samples (n=K); every sample is judged once.
    assert generation["requests"] == PROMPTS * MODELS
    assert generation["samples"] == PROMPTS * SAMPLES * MODELS
    assert judge["requests"] == judge["samples"] == PROMPTS * SAMPLES * MODELS
    for stage in (generation, judge):
        assert 0 < stage["fraction_active"] <= 1.5
        assert 0 < stage["fraction_wall"] <= 1.5
        assert 1 <= stage["max_in_flight"] <= 4
    assert result["ceiling_per_second"] == pytest.approx(4 / 0.01)
    assert result["wall_seconds"] >= result["cases_seconds"] > 0
    assert result["unsafe_fraction"] == pytest.approx(0.5)
    assert "| judge |" in run.stdout
