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
``build.concurrency`` = ``--concurrency``, synthetic prompts in a temporary folder),
run in each ``--mode`` (``bench/build_modes.py``): ``embedded``, every stage in the
build's process; ``grpc``, the stages sent to the generation, judge and correction
services, each its own process on the same models; ``kafka``, a stage worker per stage
on a Tansu broker. The script reports the build's wall time, cases per second, HTTP
calls per case and per second by kind, the CPU per case of the mode's processes (the
build's over its life, the services' and workers' while the build ran; the broker's
and the test servers' apart), each process's peak RSS, and the latency limit:

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
    make bench-modes
    .venv/bin/python bench/build_throughput.py --prompts 2000 --concurrency 8 --latency 0.05
    .venv/bin/python bench/build_throughput.py --prompts 1000 --mode embedded grpc kafka
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The test servers live in tests/support; the script runs from bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_modes import MODE_NAMES, MODES, Child, spawn
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
class ProcessFigures:
    """One process of a build's mode: its CPU while the build ran and over its whole
    life, its peak RSS and how it ended."""

    name: str
    part_of_build: bool
    cpu_seconds: float
    cpu_seconds_total: float
    cpu_ms_per_case: float
    peak_rss_mb: float
    exit_status: int


@dataclass(frozen=True)
class Result:
    """One build's figures. ``cpu_*`` are the mode's: every process of it but the
    broker, summed (the embedded mode has the build's alone)."""

    mode: str
    started_at: str
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
    calls_per_second: dict[str, float]
    calls_per_second_cases: dict[str, float]
    cpu_ms_per_case: float
    cpu_ms_per_call: float
    cpu_seconds: float
    processes: list[ProcessFigures]
    broker_cpu_ms_per_case: float | None
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


def measure(args: argparse.Namespace) -> Result:
    """Run one build of ``args.mode`` against the servers; its figures."""
    workload = BuildWorkload(
        latency=args.latency,
        hard_share=args.hard_share,
        fault_rate=args.fault_rate,
        seed=args.seed,
    )
    profile = None
    if args.profile:
        profile = args.profile / f"c{args.concurrency}"
        profile.mkdir(parents=True, exist_ok=True)
    with workload, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        config = folder / "build.yaml"
        mode = MODES[args.mode](folder, profile)
        try:
            mode.start(build_config(args, folder, workload), config)
            # The mode's own processes first, the broker last.
            others = sorted(mode.children, key=lambda child: not child.part_of_build)
            at_start = {child.name: child.cpu_seconds_now() for child in others}
            load_before = _load()
            started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
            own_before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.monotonic()
            build = spawn("build", mode.command("build", mode.build_arguments(config)), None)
            try:
                ended = build.reap(args.timeout)
            finally:
                if build.ended is None:
                    # Interrupted (Ctrl-C): the build is not left running alone.
                    build.stop()
            wall = time.monotonic() - started
            own_after = resource.getrusage(resource.RUSAGE_SELF)
            load_after = _load()
            gone = [child.name for child in others if child.poll() is not None]
            if gone:
                raise SystemExit(f"{', '.join(gone)} ended during the build:\n{_logs(others)}")
            at_end = {child.name: child.cpu_seconds_now() for child in others}
        finally:
            mode.stop()
        if ended.exit_status != 0:
            raise SystemExit(f"unsafechain build exited with {ended.exit_status}\n{_logs(others)}")
        manifest = json.loads((folder / "out" / "manifest.json").read_text())
        counts = workload.counts()
        first, last = workload.busy_span()
    counted = manifest["counts"]
    cases, hard = int(counted["cases"]), int(counted["hard"])
    cases_seconds = last - first
    rate = cases / cases_seconds
    sequential, concurrent = latency_limits(
        args.concurrency, args.latency, args.samples, hard / cases if cases else 0.0
    )

    def figures(child: Child, cpu: float) -> ProcessFigures:
        assert child.ended is not None
        return ProcessFigures(
            name=child.name,
            part_of_build=child.part_of_build,
            cpu_seconds=round(cpu, 2),
            cpu_seconds_total=round(child.ended.cpu_seconds, 2),
            cpu_ms_per_case=round(cpu * 1000 / cases, 1),
            peak_rss_mb=round(child.ended.peak_rss_mb, 1),
            exit_status=child.ended.exit_status,
        )

    processes = [figures(build, ended.cpu_seconds)] + [
        figures(child, at_end[child.name] - at_start[child.name]) for child in others
    ]
    cpu = sum(p.cpu_seconds for p in processes if p.part_of_build)
    brokers = [p for p in processes if not p.part_of_build]
    calls = {kind: counts[kind].requests for kind in KINDS}
    return Result(
        mode=args.mode,
        started_at=started_at,
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
        calls=calls,
        faults={kind: counts[kind].faults for kind in KINDS},
        calls_per_case={kind: round(calls[kind] / cases, 2) for kind in KINDS},
        calls_per_second={kind: round(calls[kind] / wall, 1) for kind in KINDS},
        calls_per_second_cases={kind: round(calls[kind] / cases_seconds, 1) for kind in KINDS},
        cpu_ms_per_case=round(cpu * 1000 / cases, 1),
        cpu_ms_per_call=round(cpu * 1000 / sum(calls.values()), 2),
        cpu_seconds=round(cpu, 2),
        processes=processes,
        broker_cpu_ms_per_case=(
            round(sum(p.cpu_seconds for p in brokers) * 1000 / cases, 1) if brokers else None
        ),
        server_cpu_ms_per_case=round(_cpu(own_after, own_before) * 1000 / cases, 1),
        peak_rss_mb=round(ended.peak_rss_mb, 1),
        limit_sequential_corrections=round(sequential, 1),
        limit_concurrent_corrections=round(concurrent, 1),
        fraction_of_limit_sequential=round(rate / sequential, 3),
        fraction_of_limit_concurrent=round(rate / concurrent, 3),
        load_before=load_before,
        load_after=load_after,
    )


def _logs(children: list[Child]) -> str:
    """The end of each child's log, to say why a mode failed."""
    return "\n".join(f"--- {child.name}:\n{child.log_text()[-2000:]}" for child in children)


def _by_process(r: Result, figure: str, digits: int) -> str:
    """One figure of every process of the build's mode: ``build 9.5, judge 3.1``."""
    return ", ".join(f"{p.name} {getattr(p, figure):.{digits}f}" for p in r.processes)


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
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=MODE_NAMES,
        default=["embedded"],
        help="embedded: every stage in the build's process; grpc: the stages sent to the "
        "three services; kafka: stage workers on a broker. Several run one build each, in "
        "turn, at every --concurrency",
    )
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument(
        "--hard-share", type=float, default=0.32, help="share of prompts judged hard"
    )
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="share of requests failed (500 or 429)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompts, faults and build.seed")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds a build may take before it is killed"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run every Python process of each build under cProfile timed by CPU "
        "(bench/cpu_profile.py), its statistics in this folder "
        "(c<C>/<mode>-<process>.prof); the profiler slows them down",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if args.prompts < 1 or args.samples < 1 or min(args.concurrency) < 1 or args.latency <= 0:
        parser.error("--prompts, --samples and --concurrency must be at least 1, --latency > 0")
    if not 0 <= args.hard_share <= 1 or not 0 <= args.fault_rate < 1:
        parser.error("--hard-share must be within [0, 1], --fault-rate within [0, 1)")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")

    machine = host_description()
    print(f"machine: {machine}")
    print(
        f"{args.prompts} prompts, K={args.samples}, latency {args.latency * 1000:g} ms, "
        f"hard share {args.hard_share:g}, fault rate {args.fault_rate:g}"
    )
    print(
        "| mode | C | cases | hard | s (wall) | s (cases) | cases/s "
        "| limit (concurrent corrections) | of it "
        "| calls/s over the wall: gen / judge / correct "
        "| calls/case gen / judge / correct (total) "
        "| CPU ms/case, the mode's processes | ms/call | CPU ms/case by process "
        "| peak RSS MiB by process | test servers' CPU ms/case | broker CPU ms/case "
        "| load (1 min) before / after |"
    )
    print("| --- " * 17 + "|")
    results = []
    for concurrency in args.concurrency:
        for mode in args.mode:
            r = measure(
                argparse.Namespace(**(vars(args) | {"concurrency": concurrency, "mode": mode}))
            )
            results.append(r)
            per_case, per_second = r.calls_per_case, r.calls_per_second
            total = sum(r.calls.values()) / r.cases
            broker = "–" if r.broker_cpu_ms_per_case is None else r.broker_cpu_ms_per_case
            print(
                f"| {r.mode} | {r.concurrency} | {r.cases} | {r.hard} | {r.wall_seconds} "
                f"| {r.cases_seconds} | {r.cases_per_second} "
                f"| {r.limit_concurrent_corrections} | {r.fraction_of_limit_concurrent:.2f} "
                f"| {per_second['generate']} / {per_second['judge']} / {per_second['correct']} "
                f"| {per_case['generate']} / {per_case['judge']} / {per_case['correct']} "
                f"({total:.2f}) | {r.cpu_ms_per_case} | {r.cpu_ms_per_call} "
                f"| {_by_process(r, 'cpu_ms_per_case', 1)} | {_by_process(r, 'peak_rss_mb', 0)} "
                f"| {r.server_cpu_ms_per_case} | {broker} "
                f"| {r.load_before} / {r.load_after} |",
                flush=True,
            )
            lives = ", ".join(f"{p.name} {p.cpu_seconds_total}" for p in r.processes)
            print(
                f"  {r.started_at} UTC; wall {r.wall_seconds} s: {r.before_seconds} s before "
                f"the first request, {r.cases_seconds} s of cases, {r.after_seconds} s after "
                f"the last answer; {r.cases_per_second_wall} cases/s over the wall; calls/s "
                f"over the cases {r.calls_per_second_cases}; corrected {r.corrected}, failed "
                f"{r.failed}; faults {r.faults}; the mode's CPU {r.cpu_seconds} s; CPU s over "
                f"each process's life: {lives}",
                flush=True,
            )
    if args.json:
        payload = {"machine": machine, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
