"""Benchmark: the build's throughput against fixed-latency OpenAI-compatible servers.

The generator, the Llama Guard judge and the corrector are each a fixed-latency
OpenAI-compatible test server on loopback (``tests/support/build_workload.py``), in
this process; every request is counted by the server of its kind (generate, judge,
correct). About ``--hard-share`` of the prompts are hard (a hash of the prompt decides):
the judge answers ``unsafe`` / ``S1`` for every original completion of a hard prompt,
``safe`` for the others and for every correction. ``--fault-rate`` fails that share of
all requests with HTTP 500 or 429 (the backends retry them).

The build is the real one: ``unsafechain build`` in a subprocess over a config on
those servers (``backend: openai`` for all three models, K = ``--samples``,
``build.concurrency`` = ``--concurrency``, synthetic prompts in a temporary folder).
The script reports the build process's wall time, CPU time and peak RSS (from
``wait4``), cases per second, HTTP calls per case by kind, and the latency limit:

- every stage runs ``build.concurrency`` C cases at once; a case spends one latency L
  in the generate stage (one request, ``n`` = K) and one in the judge stage (K
  requests at once), so either stage passes at most C / L cases per second;
- the correct stage gets only the hard cases (a share h); it corrects a case's K
  unsafe completions concurrently (``CorrectStage``, since issue 15), a correction
  and its re-judgment each, 2·L per hard case: at most C / (2·h·L) cases per second;
  one after another, as the code did before, 2K·L: C / (2K·h·L).

The limit is the smallest stage's: min(C / L, C / (2·h·L)) as the code stands, with
concurrent corrections (the issue's 160 cases/s at C = 8, L = 50 ms, K = 4, h = 0.32),
and min(C / L, C / (2K·h·L)) with sequential ones (63), reported beside it to compare
with the figures measured before.

Usage::

    make bench-build
    .venv/bin/python bench/build_throughput.py --prompts 2000 --concurrency 8 --latency 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The test servers live in tests/support; the script runs from bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import host_description

from tests.support.build_workload import KINDS, BuildWorkload, latency_limits

ROOT = Path(__file__).resolve().parents[1]
CONSONANTS, VOWELS = "bcdfghklmnprstvz", "aeiou"


def write_prompts(path: Path, count: int, seed: int) -> None:
    """``count`` distinct synthetic prompts, one JSON object a line: twelve made-up
    words each, drawn at random, so that no two are near-duplicates."""
    draw = random.Random(seed)

    def word() -> str:
        return "".join(draw.choice(CONSONANTS) + draw.choice(VOWELS) for _ in range(3))

    with path.open("w", encoding="utf-8") as f:
        for index in range(count):
            words = " ".join(word() for _ in range(12))
            prompt = f"Request {index}: explain how to combine {words}."
            f.write(json.dumps({"prompt": prompt}) + "\n")


def build_config(args: argparse.Namespace, folder: Path, workload: BuildWorkload) -> dict[str, Any]:
    """The build: synthetic prompts, the three models on the test servers."""
    prompts = folder / "prompts.jsonl"
    write_prompts(prompts, args.prompts, args.seed)
    return {
        "build": {
            "output": str(folder / "out"),
            "seed": args.seed,
            "concurrency": args.concurrency,
            "queue_size": max(16, args.concurrency),
        },
        "sources": [{"name": "synthetic", "path": str(prompts)}],
        "models": workload.models_config(args.concurrency, args.samples),
        "generation": {
            "model": "generator",
            "samples": args.samples,
            "temperature": 0.6,
            "top_p": 0.95,
            "max_new_tokens": 1024,
        },
        "judging": {
            "judges": [{"name": "llama-guard-3", "kind": "llama_guard", "model": "guard"}],
            "targets": ["full"],
        },
        "routing": {"hard_fraction": 1.0},
        "correction": {
            "model": "corrector",
            "max_attempts": 3,
            "temperature": 0.7,
            "max_new_tokens": 1024,
        },
    }


@dataclass(frozen=True)
class Result:
    """One build's figures."""

    prompts: int
    samples: int
    concurrency: int
    latency: float
    fault_rate: float
    cases: int
    hard: int
    corrected: int
    failed: int
    wall_seconds: float
    before_seconds: float
    cases_seconds: float
    after_seconds: float
    cases_per_second: float
    cases_per_second_wall: float
    calls: dict[str, int]
    faults: dict[str, int]
    calls_per_case: dict[str, float]
    cpu_ms_per_case: float
    cpu_ms_per_call: float
    cpu_seconds: float
    server_cpu_ms_per_case: float
    peak_rss_mb: float
    limit_sequential_corrections: float
    limit_concurrent_corrections: float
    fraction_of_limit_sequential: float
    fraction_of_limit_concurrent: float
    load_before: float
    load_after: float


def _cpu(after: resource.struct_rusage, before: resource.struct_rusage) -> float:
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _load() -> float:
    """The one-minute load average."""
    return round(os.getloadavg()[0], 2)


def run_build(config_path: Path) -> tuple[float, float, float, int]:
    """``unsafechain build`` in a subprocess: wall and CPU seconds, peak RSS in MiB, and
    the exit status. Its stdout (the manifest) is dropped; its warnings are shown."""
    command = [
        str(Path(sys.executable).with_name("unsafechain")),
        "build",
        "--config",
        str(config_path),
        "--no-progress",
        "--log-level",
        "WARNING",
    ]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, process.returncode


def measure(args: argparse.Namespace) -> Result:
    """Run one build against the servers; its figures."""
    workload = BuildWorkload(
        latency=args.latency,
        hard_share=args.hard_share,
        fault_rate=args.fault_rate,
        seed=args.seed,
    )
    with workload, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        config = folder / "build.yaml"
        config.write_text(json.dumps(build_config(args, folder, workload), indent=2))
        load_before = _load()
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        wall, cpu, rss, returncode = run_build(config)
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        load_after = _load()
        if returncode != 0:
            raise SystemExit(f"unsafechain build exited with {returncode}")
        manifest = json.loads((folder / "out" / "manifest.json").read_text())
        counts = workload.counts()
        arrivals = [
            r.received_at
            for server in workload.servers.values()
            for r in server.requests
            if r.method == "POST"
        ]
    counted = manifest["counts"]
    cases, hard = int(counted["cases"]), int(counted["hard"])
    first, last = min(arrivals), max(arrivals) + args.latency
    cases_seconds = last - first
    rate = cases / cases_seconds
    sequential, concurrent = latency_limits(
        args.concurrency, args.latency, args.samples, hard / cases if cases else 0.0
    )
    return Result(
        prompts=args.prompts,
        samples=args.samples,
        concurrency=args.concurrency,
        latency=args.latency,
        fault_rate=args.fault_rate,
        cases=cases,
        hard=hard,
        corrected=int(counted["corrected"]),
        failed=int(counted["failed"]),
        wall_seconds=round(wall, 2),
        before_seconds=round(first - started, 2),
        cases_seconds=round(cases_seconds, 2),
        after_seconds=round(started + wall - last, 2),
        cases_per_second=round(rate, 1),
        cases_per_second_wall=round(cases / wall, 1),
        calls={kind: counts[kind].requests for kind in KINDS},
        faults={kind: counts[kind].faults for kind in KINDS},
        calls_per_case={kind: round(counts[kind].requests / cases, 2) for kind in KINDS},
        cpu_ms_per_case=round(cpu * 1000 / cases, 1),
        cpu_ms_per_call=round(cpu * 1000 / sum(c.requests for c in counts.values()), 2),
        cpu_seconds=round(cpu, 2),
        server_cpu_ms_per_case=round(_cpu(own_after, own_before) * 1000 / cases, 1),
        peak_rss_mb=round(rss, 1),
        limit_sequential_corrections=round(sequential, 1),
        limit_concurrent_corrections=round(concurrent, 1),
        fraction_of_limit_sequential=round(rate / sequential, 3),
        fraction_of_limit_concurrent=round(rate / concurrent, 3),
        load_before=load_before,
        load_after=load_after,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=500, help="synthetic prompts (N)")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (K)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[8],
        help="build.concurrency; several values run one build each, in turn",
    )
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument(
        "--hard-share", type=float, default=0.32, help="share of prompts judged hard"
    )
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="share of requests failed (500 or 429)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompts, faults and build.seed")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if args.prompts < 1 or args.samples < 1 or min(args.concurrency) < 1 or args.latency <= 0:
        parser.error("--prompts, --samples and --concurrency must be at least 1, --latency > 0")
    if not 0 <= args.hard_share <= 1 or not 0 <= args.fault_rate < 1:
        parser.error("--hard-share must be within [0, 1], --fault-rate within [0, 1)")

    machine = host_description()
    print(f"machine: {machine}")
    print(
        f"{args.prompts} prompts, K={args.samples}, latency {args.latency * 1000:g} ms, "
        f"hard share {args.hard_share:g}, fault rate {args.fault_rate:g}"
    )
    print(
        "| C | cases | hard | s (wall) | s (cases) | cases/s | limit, sequential corrections "
        "| of it | limit, concurrent corrections (as it stands) | of it "
        "| calls/case gen / judge / correct (total) "
        "| CPU ms/case | peak RSS MiB | load (1 min) before / after |"
    )
    print("| --- " * 14 + "|")
    results = []
    for concurrency in args.concurrency:
        r = measure(argparse.Namespace(**(vars(args) | {"concurrency": concurrency})))
        results.append(r)
        per_case = r.calls_per_case
        total = sum(r.calls.values()) / r.cases
        print(
            f"| {r.concurrency} | {r.cases} | {r.hard} | {r.wall_seconds} | {r.cases_seconds} "
            f"| {r.cases_per_second} | {r.limit_sequential_corrections} "
            f"| {r.fraction_of_limit_sequential:.2f} | {r.limit_concurrent_corrections} "
            f"| {r.fraction_of_limit_concurrent:.2f} "
            f"| {per_case['generate']} / {per_case['judge']} / {per_case['correct']} "
            f"({total:.2f}) | {r.cpu_ms_per_case} | {r.peak_rss_mb:.0f} "
            f"| {r.load_before} / {r.load_after} |",
            flush=True,
        )
        print(
            f"  wall {r.wall_seconds} s: {r.before_seconds} s before the first request, "
            f"{r.cases_seconds} s of cases, {r.after_seconds} s after the last answer; "
            f"{r.cases_per_second_wall} cases/s over the wall; corrected {r.corrected}, "
            f"failed {r.failed}; faults {r.faults}; build CPU {r.cpu_seconds} s, "
            f"{r.cpu_ms_per_call} ms per call; the test servers' CPU "
            f"{r.server_cpu_ms_per_case} ms per case",
            flush=True,
        )
    if args.json:
        payload = {"machine": machine, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
