"""The build benchmark's modes: the CPU and memory of the processes it starts, read from
``wait4`` and ``/proc``; killing what outlives its timeout; the config sections each
mode adds, valid for the build (no service, worker or broker started)."""

from __future__ import annotations

import os
import pstats
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from build_modes import (
    MODE_NAMES,
    MODES,
    SERVICES,
    cpu_seconds_now,
    kafka_section,
    remote_section,
    spawn,
    unsafechain_command,
)

from unsafechain.dataset.config import RemoteStages
from unsafechain.streaming.kafka import KafkaSettings

# Burns about 0.3 s of CPU and holds 64 MiB, then says so and waits to be stopped.
BURN = (
    "import time\n"
    "end = time.process_time() + 0.3\n"
    "while time.process_time() < end: pass\n"
    "held = bytearray(64 * 1024 * 1024)\n"
    "print('burnt', flush=True)\n"
    "time.sleep(30)\n"
)


def _python(tmp_path: Path, code: str, name: str = "child"):
    return spawn(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def test_cpu_seconds_now_reads_the_process_own_cpu_time():
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    expected = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    # Clock ticks are 10 ms; the two reads are a moment apart.
    assert cpu_seconds_now(os.getpid()) == pytest.approx(expected, abs=0.05)


def test_a_running_child_reports_its_cpu_and_once_stopped_its_peak_memory(tmp_path):
    child = _python(tmp_path, BURN)
    try:
        child.wait_for_line("burnt", timeout=20)
        assert 0.25 <= child.cpu_seconds_now() < 5
        assert child.poll() is None
    finally:
        ended = child.stop(timeout=10)
    assert ended.exit_status == -signal.SIGTERM
    assert ended.cpu_seconds >= 0.25
    assert ended.peak_rss_mb >= 64
    # Reaped once: asking again gives the same, and Popen knows it ended.
    assert child.reap(timeout=1) is ended
    assert child.process.returncode == -signal.SIGTERM


def test_a_small_child_of_a_big_parent_reports_its_own_peak_memory(tmp_path):
    # wait4 would report at least the parent's RSS at the fork: 256 MiB and more.
    held = bytearray(b"\x01") * (256 * 1024 * 1024)
    child = _python(tmp_path, "import time; print('ready', flush=True); time.sleep(0.3)")
    child.wait_for_line("ready", timeout=20)
    ended = child.reap(timeout=10)
    assert ended.exit_status == 0
    assert 1 < ended.peak_rss_mb < 64
    assert len(held) == 256 * 1024 * 1024


# Like a service: the first SIGTERM drains (here 0.3 s), and Python's default handler
# is back for a second one, which would end it at once.
DRAINS = (
    "import signal, sys, time\n"
    "def drain(*_):\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
    "    print('draining', flush=True)\n"
    "    time.sleep(0.3)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, drain)\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


def test_a_child_is_told_to_stop_once_and_left_to_drain(tmp_path):
    child = _python(tmp_path, DRAINS)
    child.wait_for_line("ready", timeout=20)
    child.terminate()
    child.wait_for_line("draining", timeout=20)
    child.terminate()
    assert child.stop(timeout=10).exit_status == 0


def test_a_child_that_outlives_its_timeout_is_killed(tmp_path):
    child = _python(tmp_path, "import time; time.sleep(30)")
    started = time.monotonic()
    ended = child.reap(timeout=0.3)
    assert ended.exit_status == -signal.SIGKILL
    assert time.monotonic() - started < 5


def test_waiting_for_a_line_says_why_when_the_child_ends_first(tmp_path):
    child = _python(tmp_path, "print('no port for you'); raise SystemExit(3)", "judge")
    with pytest.raises(RuntimeError, match=r"judge exited with 3:\n.*no port for you"):
        child.wait_for_line(r"serving \S+ on", timeout=20)


def test_waiting_for_a_line_gives_up_after_its_timeout(tmp_path):
    child = _python(tmp_path, "import time; time.sleep(30)")
    try:
        with pytest.raises(RuntimeError, match=r"logged no 'ready' in 0\.3 s"):
            child.wait_for_line("ready", timeout=0.3)
    finally:
        child.stop(timeout=10)


def test_a_profiled_command_runs_the_cli_under_a_cpu_timed_cprofile(tmp_path):
    plain = unsafechain_command(["worker", "judge"])
    assert Path(plain[0]).name == "unsafechain" and plain[1:] == ["worker", "judge"]
    profiled = unsafechain_command(["worker", "judge"], tmp_path / "w.prof")
    assert Path(profiled[1]).name == "cpu_profile.py"
    assert profiled[2:] == [str(tmp_path / "w.prof"), "unsafechain.cli", "worker", "judge"]


def test_the_grpc_mode_sends_every_stage_to_its_service():
    addresses = {service: f"127.0.0.1:{5000 + i}" for i, service in enumerate(SERVICES)}
    remote = RemoteStages.model_validate(remote_section(addresses))
    assert remote.judge is not None and remote.judge.address == "127.0.0.1:5001"
    assert remote.generation is not None and remote.correction is not None


def test_a_kafka_worker_polls_as_many_cases_as_an_embedded_stage_holds():
    settings = KafkaSettings.model_validate(kafka_section("127.0.0.1:9092", 32))
    assert settings.max_poll_records == 32
    assert settings.bootstrap_servers == ("127.0.0.1:9092",)


def test_every_mode_has_its_runner(tmp_path):
    assert set(MODES) == set(MODE_NAMES)
    arguments = MODES["kafka"](tmp_path).build_arguments(tmp_path / "b.yaml")
    assert arguments[:3] == ["build", "--config", str(tmp_path / "b.yaml")]
    assert arguments[arguments.index("--bus") + 1] == "kafka"
    embedded = MODES["embedded"](tmp_path).build_arguments(tmp_path / "b.yaml")
    assert embedded[embedded.index("--bus") + 1] == "embedded"


def test_the_cpu_profile_counts_cpu_not_the_time_spent_waiting(tmp_path):
    (tmp_path / "busy.py").write_text(
        "import sys, time\n"
        "def burn():\n"
        "    end = time.thread_time() + 0.2\n"
        "    while time.thread_time() < end: pass\n"
        "def wait():\n"
        "    time.sleep(0.5)\n"
        "burn(); wait()\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    out = tmp_path / "busy.prof"
    script = Path(__file__).resolve().parents[2] / "bench" / "cpu_profile.py"
    run = subprocess.run(
        [sys.executable, str(script), str(out), "busy", "3"],
        env=os.environ | {"PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    # The module's exit status is the command's, and the profile is written anyway.
    assert run.returncode == 3, run.stderr
    stats = pstats.Stats(str(out)).stats
    seconds = {name: cum for (_, _, name), (_, _, _, cum, _) in stats.items()}
    assert seconds["burn"] >= 0.15
    assert seconds["wait"] < 0.05
