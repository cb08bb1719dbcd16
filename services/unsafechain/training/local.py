"""The local executor: each run an ``unsafechain train`` process beside the service.

A run's process gets its settings as ``--config-json`` and writes its reports (see
:mod:`unsafechain.training.reporting`) and its logs to ``<state_dir>/logs/<run>.log``,
which the executor follows. At most ``local.max_concurrent_runs`` train at once; the
others wait as PENDING, oldest first.

Stopping: cancel sends SIGTERM to the run's process group (the run saves a checkpoint
at its next step and exits), then SIGKILL after ``local.stop_grace_seconds``. When the
service shuts down it stops its runs the same way and leaves them unfinished; when it
starts again it starts them again, and each resumes from its checkpoint. A run whose
process outlived the service (the service was killed) is followed again where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

from unsafechain.training.manager import Executor, TrainingManager
from unsafechain.training.reporting import parse_report
from unsafechain.training.runs import RunRecord
from unsafechain.training.settings import LocalExecutorSettings

logger = logging.getLogger(__name__)

STOPPED_EXIT_STATUS = 3
"""``unsafechain train``'s exit status when it stopped at a checkpoint on SIGTERM."""

_POLL_SECONDS = 0.25


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``),
    which tells it from a later process given the same pid; None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def launch_arguments(settings_json: str) -> list[str]:
    """The ``unsafechain`` arguments that run a run: its settings inline, its reports on
    stdout, no progress bar. Both executors start runs with them."""
    return ["train", "--config-json", settings_json, "--report-to", "-", "--no-progress"]


class _Process:
    """A run's process: a child of this service, or one adopted after a restart."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None):
        self.pid = pid
        self.popen = popen
        self.started = process_start_time(pid)

    def exit_status(self) -> int | bool | None:
        """The exit status once it ended (None when unknown: not our child); False while
        it runs."""
        if self.popen is not None:
            code = self.popen.poll()
            return False if code is None else code
        if self.started is not None and process_start_time(self.pid) == self.started:
            return False
        return None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)


class LocalExecutor(Executor):
    """Runs as processes on the service's machine.

    Args:
        settings: The executor's settings.
        env: The runs' environment (default: the service's).
    """

    name = "local"

    def __init__(self, settings: LocalExecutorSettings, env: dict[str, str] | None = None):
        self._settings = settings
        self._env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        self._manager: TrainingManager | None = None
        self._queue: list[str] = []
        self._processes: dict[str, _Process] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._killers: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    @property
    def manager(self) -> TrainingManager:
        assert self._manager is not None, "the executor is not started"
        return self._manager

    async def start(self, manager: TrainingManager, runs: list[RunRecord]) -> None:
        self._manager = manager
        for run in sorted(runs, key=lambda run: run.created_at):
            if run.process is not None:
                process = _Process(run.process["pid"], None)
                if process.started == run.process.get("started"):
                    logger.info("run %s: its process %d is still running", run.id, process.pid)
                    self._follow(run.id, process)
                    continue
            if run.cancel_requested:
                self.manager.update(run.id, state="cancelled", process=None)
            elif run.process is not None:
                self._restart_later(run)
            else:
                self._queue.append(run.id)
        self._start_queued()

    async def launch(self, run: RunRecord) -> None:
        self._queue.append(run.id)
        self.manager.update(run.id, message=self._waiting_message(run.id))
        self._start_queued()

    async def cancel(self, run: RunRecord) -> None:
        if run.id in self._queue:
            self._queue.remove(run.id)
            self.manager.update(run.id, state="cancelled", message="cancelled before it started")
            return
        process = self._processes.get(run.id)
        if process is not None:
            self._stop(run.id, process)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        self._closing = True
        self._queue.clear()
        for run_id, process in list(self._processes.items()):
            logger.info("stopping run %s at a checkpoint: the service is shutting down", run_id)
            self._stop(run_id, process)
        followers = list(self._followers.values())
        if followers:
            await asyncio.wait(followers, timeout=self._settings.stop_grace_seconds + 5)

    # ------------------------------------------------------------------------------

    def _waiting_message(self, run_id: str) -> str:
        ahead = self._queue.index(run_id) if run_id in self._queue else 0
        busy = len(self._processes)
        return (
            f"waiting for a free slot ({busy} of {self._settings.max_concurrent_runs} "
            f"training, {ahead} ahead)"
        )

    def _restart_later(self, run: RunRecord) -> None:
        if run.restarts >= self._settings.max_restarts:
            self.manager.update(
                run.id,
                state="failed",
                process=None,
                message=f"its process ended without a report {run.restarts + 1} times "
                "(the service stopped or was killed around it); not started again",
            )
            return
        self.manager.update(
            run.id,
            restarts=run.restarts + 1,
            process=None,
            message="started again after a restart of the service: resumes from its checkpoint",
        )
        self._queue.append(run.id)

    def _start_queued(self) -> None:
        while self._queue and len(self._processes) < self._settings.max_concurrent_runs:
            run_id = self._queue.pop(0)
            run = self.manager.get(run_id)
            try:
                self._spawn(run)
            except OSError as error:
                self.manager.update(
                    run_id, state="failed", message=f"cannot start the run's process: {error}"
                )
        for run_id in self._queue:
            self.manager.update(run_id, message=self._waiting_message(run_id))

    def _spawn(self, run: RunRecord) -> None:
        log_path = self.manager.store.log_path(run.id)
        argv = [*self._settings.command, *launch_arguments(json.dumps(run.settings))]
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = _Process(popen.pid, popen)
        self.manager.update(
            run.id,
            executor_ref=f"process/{popen.pid}",
            process={"pid": popen.pid, "started": process.started or 0},
            message="the process started",
        )
        logger.info("run %s: process %d started (log %s)", run.id, popen.pid, log_path)
        self._follow(run.id, process)

    def _follow(self, run_id: str, process: _Process) -> None:
        self._processes[run_id] = process
        task = asyncio.get_running_loop().create_task(
            self._follow_process(run_id, process), name=f"follow-{run_id}"
        )
        self._followers[run_id] = task

    async def _follow_process(self, run_id: str, process: _Process) -> None:
        path = self.manager.store.log_path(run_id)
        try:
            while True:
                status = process.exit_status()
                self._read_reports(run_id, path)
                if status is not False:
                    break
                await asyncio.sleep(_POLL_SECONDS)
            self._read_reports(run_id, path)
            self._ended(run_id, status)
        except Exception:
            logger.exception("run %s: following its process failed", run_id)
            self.manager.update(run_id, state="failed", message="the service lost track of it")
        finally:
            self._processes.pop(run_id, None)
            self._followers.pop(run_id, None)
            killer = self._killers.pop(run_id, None)
            if killer is not None:
                killer.cancel()
            if not self._closing:
                self._start_queued()

    def _read_reports(self, run_id: str, path: Path) -> None:
        run = self.manager.get(run_id)
        try:
            with path.open("rb") as log:
                log.seek(run.log_offset)
                data = log.read()
        except OSError:
            return
        whole = data.rfind(b"\n") + 1
        if not whole:
            return
        for line in data[:whole].decode("utf-8", "replace").splitlines():
            report = parse_report(line)
            if report is not None:
                self.manager.report(run_id, report)
        self.manager.update(run_id, log_offset=run.log_offset + whole)

    def _ended(self, run_id: str, status: int | bool | None) -> None:
        run = self.manager.get(run_id)
        log = self.manager.store.log_path(run_id)
        if status == 0 and run.outputs:
            self.manager.update(run_id, state="succeeded", message="", process=None)
        elif run.cancel_requested:
            self.manager.update(
                run_id,
                state="cancelled",
                process=None,
                message=f"cancelled at step {run.step}; its checkpoints are in {run.output_dir}",
            )
        elif status == STOPPED_EXIT_STATUS or status is None or self._closing:
            # Stopped at a checkpoint by someone else than a cancel (the service's
            # shutdown), or gone while the service was away: started again.
            if self._closing:
                self.manager.update(
                    run_id,
                    message="stopped at a checkpoint by the service's shutdown; resumes when "
                    "the service starts again",
                )
            else:
                self._restart_later(run)
        else:
            how = (
                f"killed by signal {signal.Signals(-status).name}"
                if isinstance(status, int) and status < 0
                else f"exit status {status}"
            )
            detail = (
                f": {run.message}" if run.message and run.message != "the process started" else ""
            )
            self.manager.update(
                run_id,
                state="failed",
                process=None,
                message=f"the run's process ended with {how}{detail} (log: {log})",
            )

    def _stop(self, run_id: str, process: _Process) -> None:
        process.signal(signal.SIGTERM)

        async def kill_later() -> None:
            await asyncio.sleep(self._settings.stop_grace_seconds)
            if process.exit_status() is False:
                logger.warning(
                    "run %s did not stop within %gs: killed",
                    run_id,
                    self._settings.stop_grace_seconds,
                )
                process.signal(signal.SIGKILL)

        previous = self._killers.pop(run_id, None)
        if previous is not None:
            previous.cancel()
        self._killers[run_id] = asyncio.get_running_loop().create_task(kill_later())
