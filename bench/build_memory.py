"""Benchmark: the build's memory and finalize time as the dataset grows.

The same build as ``bench/build_throughput.py`` (its config and its fixed-latency
OpenAI-compatible test servers, ``tests/support/build_workload.py``), run once per
``--prompts`` value with a short latency (2 ms by default) so that even 100,000 prompts
take minutes. While ``unsafechain build`` runs in its subprocess, its resident set
(``VmRSS`` of ``/proc/<pid>/status``) is sampled every ``--every`` seconds, and the
requests' arrival times split the run into three phases:

- **intake**: from the start to the first request (reading, deduplicating and
  splitting the prompts, opening the store);
- **cases**: from the first request to the end of the last one (the stages);
- **finalize**: from then to the exit (the dataset's files, subsets, exports and card,
  streamed from the case store).

The report gives the peak RSS of the whole run (the last ``VmHWM`` read, at most one
sample before the exit: ``wait4``'s ``ru_maxrss`` would start from this benchmark's own
size at the fork, see ``bench/build_modes.py``) and of each phase (the sampled
``VmRSS``), the finalize time per training row, and the ratio
of each run's peak to the first run's: the goal (issue 15) is at most 1.2 from 10,000
to 100,000 prompts, with the finalize time per row not growing. ``--plot`` draws the
sampled RSS of every run against the share of its run time, phases marked.

Usage::

    make bench-memory
    .venv/bin/python bench/build_memory.py --prompts 10000 100000 --plot rss.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_modes import peak_rss_kib_now, status_kib, unsafechain_command
from build_throughput import ROOT, build_config
from machine import host_description

from tests.support.build_workload import BuildWorkload

PHASES = ("intake", "cases", "finalize")


@dataclass(frozen=True)
class Run:
    """One build's memory and time figures."""

    prompts: int
    cases: int
    rows: int
    wall_seconds: float
    phase_seconds: dict[str, float]
    peak_rss_mib: float
    phase_peak_rss_mib: dict[str, float]
    finalize_ms_per_row: float
    cpu_ms_per_case: float
    load_before: float
    load_after: float
    samples: list[tuple[float, float]]


def run_build(config: Path, every: float) -> tuple[float, float, float, list[tuple[float, float]]]:
    """``unsafechain build`` in a subprocess, its RSS sampled: wall and CPU seconds,
    peak RSS in MiB (``VmHWM``) and the samples (monotonic time, MiB)."""
    command = unsafechain_command(
        ["build", "--config", str(config), "--no-progress", "--log-level", "WARNING"]
    )
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    samples: list[tuple[float, float]] = []
    peak_kib = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            rss, peak = status_kib(process.pid, "VmRSS"), peak_rss_kib_now(process.pid)
            if rss is not None:
                samples.append((time.monotonic(), rss / 1024))
            if peak is not None:
                peak_kib[0] = max(peak_kib[0], peak)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join(timeout=5)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"unsafechain build exited with {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime, peak_kib[0] / 1024, samples


def measure(args: argparse.Namespace, prompts: int) -> Run:
    """One build of ``prompts`` prompts; its figures."""
    workload = BuildWorkload(latency=args.latency, seed=args.seed)
    with workload, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        config = folder / "build.yaml"
        build_args = argparse.Namespace(
            prompts=prompts, samples=args.samples, concurrency=args.concurrency, seed=args.seed
        )
        config.write_text(json.dumps(build_config(build_args, folder, workload), indent=2))
        load_before = round(os.getloadavg()[0], 2)
        started = time.monotonic()
        wall, cpu, peak, samples = run_build(config, args.every)
        load_after = round(os.getloadavg()[0], 2)
        manifest = json.loads((folder / "out" / "manifest.json").read_text())
        first, last = workload.busy_span()
    ended = started + wall
    bounds = {"intake": (started, first), "cases": (first, last), "finalize": (last, ended)}
    phase_peak = {
        phase: round(max((rss for t, rss in samples if low <= t < high), default=0.0), 1)
        for phase, (low, high) in bounds.items()
    }
    counts = manifest["counts"]
    rows = int(counts["written"]) + int(counts["test_rows"])
    return Run(
        prompts=prompts,
        cases=int(counts["cases"]),
        rows=rows,
        wall_seconds=round(wall, 1),
        phase_seconds={phase: round(high - low, 2) for phase, (low, high) in bounds.items()},
        peak_rss_mib=round(peak, 1),
        phase_peak_rss_mib=phase_peak,
        finalize_ms_per_row=round((ended - last) * 1000 / max(rows, 1), 3),
        cpu_ms_per_case=round(cpu * 1000 / int(counts["cases"]), 1),
        load_before=load_before,
        load_after=load_after,
        samples=[(round(t - started, 2), round(rss, 1)) for t, rss in samples],
    )


def plot(runs: list[Run], path: Path) -> None:
    """The sampled RSS of each run against the share of its run time."""
    from unsafechain.domain.plots import new_figure, save_png

    figure = new_figure(9, 4.5)
    axis = figure.subplots()
    for run in runs:
        wall = run.wall_seconds
        (line,) = axis.plot(
            [t / wall for t, _ in run.samples],
            [rss for _, rss in run.samples],
            label=f"{run.prompts:,} prompts ({wall:.0f} s, peak {run.peak_rss_mib:.0f} MiB)",
        )
        intake, cases = run.phase_seconds["intake"], run.phase_seconds["cases"]
        for boundary in (intake, intake + cases):
            axis.axvline(boundary / wall, color=line.get_color(), linestyle=":", linewidth=1)
    axis.set_title("Build RSS over the run (dotted: end of intake, end of cases)", loc="left")
    axis.set_xlabel("share of the run's wall time")
    axis.set_ylabel("RSS (MiB)")
    axis.set_ylim(bottom=0)
    axis.legend(loc="lower right")
    save_png(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (K)")
    parser.add_argument("--concurrency", type=int, default=32, help="build.concurrency")
    parser.add_argument("--latency", type=float, default=0.002, help="seconds per request")
    parser.add_argument("--every", type=float, default=0.2, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="draw the RSS of every run into this PNG")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if min(args.prompts) < 1 or args.samples < 1 or args.concurrency < 1 or args.latency <= 0:
        parser.error("--prompts, --samples and --concurrency must be at least 1, --latency > 0")

    print(f"machine: {host_description()}")
    print(
        f"K={args.samples}, C={args.concurrency}, latency {args.latency * 1000:g} ms, "
        f"RSS sampled every {args.every:g} s"
    )
    print(
        "| prompts | rows | s (wall) | s intake / cases / finalize | peak RSS MiB (VmHWM) "
        "| peak MiB intake / cases / finalize | of the first run's peak "
        "| finalize ms per row | CPU ms/case | load before / after |"
    )
    print("| --- " * 10 + "|")
    runs: list[Run] = []
    for prompts in args.prompts:
        run = measure(args, prompts)
        runs.append(run)
        phases = " / ".join(f"{run.phase_seconds[p]:.1f}" for p in PHASES)
        peaks = " / ".join(f"{run.phase_peak_rss_mib[p]:.0f}" for p in PHASES)
        print(
            f"| {run.prompts} | {run.rows} | {run.wall_seconds} | {phases} "
            f"| {run.peak_rss_mib:.0f} | {peaks} | {run.peak_rss_mib / runs[0].peak_rss_mib:.2f} "
            f"| {run.finalize_ms_per_row} | {run.cpu_ms_per_case} "
            f"| {run.load_before} / {run.load_after} |",
            flush=True,
        )
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps([asdict(run) for run in runs], indent=2) + "\n")


if __name__ == "__main__":
    main()
