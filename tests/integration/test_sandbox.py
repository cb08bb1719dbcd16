"""The sandbox for model-written code, with the real bubblewrap: hostile programs are
contained, the 164 canonical HumanEval solutions pass, and MBPP answers are checked."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from unsafechain.dataset.stages import RouteStage
from unsafechain.evaluation.benchmarks import BenchmarkItem, BenchmarkSettings, load_benchmark
from unsafechain.evaluation.scoring import score_answer
from unsafechain.intake.answers import AnswerCheck, check_mbpp
from unsafechain.intake.settings import SourceSettings
from unsafechain.intake.sources import PromptRecord, read_source
from unsafechain.sandbox.runner import Limits, Sandbox, processes_of
from unsafechain.v1 import case_pb2

pytestmark = pytest.mark.integration

SOURCES = Path(__file__).parents[1] / "data" / "sources"

LIMITS = Limits(
    wall_seconds=5,
    cpu_seconds=5,
    memory_bytes=512 << 20,
    processes=32,
    file_bytes=8 << 20,
    tmp_bytes=16 << 20,
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


def test_a_plain_program_runs_as_a_fresh_unprivileged_user(sandbox):
    first = sandbox.run_python("import os; print(os.getuid(), os.getgid(), os.getgroups())")
    second = sandbox.run_python("import os; print(os.getuid())")
    assert first.ok and second.ok
    uid = int(first.stdout.split()[0])
    assert uid == first.uid and uid != 0
    assert first.stdout.split()[1:] == [str(uid), "[]"]
    assert first.uid != second.uid
    if os.geteuid() == 0:
        # No account has these ids.
        assert uid >= 1_000_000


def test_the_network_is_not_there():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    program = f"""
import socket
for host, port in (("127.0.0.1", {port}), ("8.8.8.8", 53), ("1.1.1.1", 443)):
    try:
        socket.create_connection((host, port), timeout=2)
        print("reached", host)
    except OSError as error:
        print("blocked", host, error.errno)
"""
    result = Sandbox(LIMITS).run_python(program)
    listener.close()
    assert result.ok
    assert result.stdout.count("blocked") == 3 and "reached" not in result.stdout
    assert not accepted


def test_the_file_system_is_read_only_but_a_small_tmp(sandbox):
    program = """
import os
for path in ("/usr/evil", "/evil", "/root/evil"):
    try:
        open(path, "w")
        print("wrote", path)
    except OSError as error:
        print("refused", path)
open("/tmp/ok", "w").write("fine")
print("tmp", open("/tmp/ok").read())
print("host files", os.path.exists("/etc/passwd"), os.path.exists("/work"))
"""
    result = sandbox.run_python(program)
    assert result.ok, result.stderr
    assert "wrote" not in result.stdout and result.stdout.count("refused") == 3
    assert "tmp fine" in result.stdout
    assert "host files False False" in result.stdout


def test_a_fork_bomb_is_contained(sandbox):
    program = """
import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
except OSError as error:
    print("fork refused after", children, error.errno)
"""
    result = sandbox.run_python(program)
    assert "fork refused after" in result.stdout
    assert int(result.stdout.split()[3]) < LIMITS.processes
    # Every process of the run is gone once it returns, sleepers included.
    assert processes_of(result.uid) == []


def test_a_4_gb_allocation_fails_inside(sandbox):
    result = sandbox.run_python("block = bytearray(4 * 1024 ** 3)\nprint('allocated')")
    assert not result.ok
    assert "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_an_endless_loop_is_killed_at_the_wall_clock_with_what_it_started(sandbox):
    program = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
while True:
    pass
"""
    quick = Sandbox(Limits(wall_seconds=2, cpu_seconds=30, processes=8))
    result = quick.run_python(program)
    assert result.timed_out and result.returncode is None
    assert "timed out" in result.reason
    assert 2 <= result.seconds < 6
    assert processes_of(result.uid) == []


def test_cpu_time_is_limited_even_before_the_wall_clock(sandbox):
    spinner = Sandbox(Limits(wall_seconds=20, cpu_seconds=1))
    result = spinner.run_python("while True:\n    pass")
    assert not result.timed_out and result.signal is not None
    assert result.reason in ("killed by SIGXCPU", "killed by SIGKILL")
    assert result.seconds < 10


def test_a_huge_file_is_capped(sandbox):
    program = """
chunk = b"x" * (1 << 20)
written = 0
try:
    with open("/tmp/huge", "wb") as handle:
        while written < 1 << 30:
            handle.write(chunk)
            written += len(chunk)
except OSError as error:
    print("stopped at", written >> 20, "MiB", error.errno)
"""
    result = sandbox.run_python(program)
    # Either the file-size limit (SIGXFSZ) or the tmpfs size stops it, far below 1 GiB.
    assert "stopped at" in result.stdout or result.reason == "killed by SIGXFSZ"
    if "stopped at" in result.stdout:
        assert int(result.stdout.split()[2]) <= LIMITS.tmp_bytes >> 20


def test_endless_output_is_cut(sandbox):
    result = sandbox.run_python("while True:\n    print('spam' * 100)")
    assert not result.ok
    assert len(result.stdout) <= LIMITS.output_bytes + 20
    assert result.stdout.endswith("[output cut]")


def test_the_164_canonical_humaneval_solutions_pass():
    # Given as a model's answer to the evaluation's HumanEval scorer, so the programs it
    # builds (prompt, answer, test, check) are the ones that run here.
    humaneval = load_benchmark(BenchmarkSettings(name="humaneval"))
    assert len(humaneval.items) == 164
    sandbox = Sandbox(Limits(wall_seconds=20, cpu_seconds=20))

    def run(item: BenchmarkItem) -> tuple[str, bool | None, str]:
        answer = f"```python\n{item.reference['canonical_solution']}```"
        score = score_answer(humaneval, item, answer, sandbox=sandbox)
        return item.id, score.correct, score.detail

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(run, humaneval.items))
    failed = [(task, detail) for task, correct, detail in outcomes if correct is not True]
    assert failed == []


def test_a_wrong_solution_fails_with_its_reason(sandbox):
    program = "def add(a, b):\n    return a - b\n\nassert add(2, 2) == 4, 'add is wrong'\n"
    result = sandbox.run_python(program)
    assert not result.ok
    assert result.reason.startswith("exit status 1") and "add is wrong" in result.reason


# --- MBPP answers checked in the sandbox (the build's gold-answer check) ---------------


def _mbpp_tasks() -> list[PromptRecord]:
    source = SourceSettings(name="mbpp", path=str(SOURCES / "mbpp.jsonl"), loader="mbpp")
    return [item for item in read_source(source) if isinstance(item, PromptRecord)]


def test_the_published_mbpp_solutions_pass_and_wrong_or_missing_code_fails():
    tasks = _mbpp_tasks()
    # The sample's third task has no tests: the loader rejects it.
    assert len(tasks) == 2
    for task in tasks:
        fenced = f"Here it is:\n```python\n{task.metadata['code']}\n```\nDone."
        assert check_mbpp(task.metadata, fenced) == AnswerCheck.CORRECT, task.id
    first = tasks[0].metadata
    wrong = "```python\ndef similar_elements(a, b):\n    return ()\n```"
    assert check_mbpp(first, wrong) == AnswerCheck.WRONG
    assert check_mbpp(first, "Loop over both lists and keep what they share.") == AnswerCheck.WRONG
    assert check_mbpp(first, "```python\nwhile True:\n    pass\n```") == AnswerCheck.WRONG
    assert check_mbpp({}, "anything") is None


def test_the_route_stage_prefers_a_completion_whose_code_passes():
    task = _mbpp_tasks()[0]
    case = case_pb2.Case(id="m1")
    case.prompt.source.name = "mbpp"
    case.prompt.metadata.update(task.metadata)
    for index, answer in enumerate(
        ("I would use sets.", f"```python\n{task.metadata['code']}\n```")
    ):
        case.completions.add(index=index, answer=answer, label=case_pb2.VERDICT_LABEL_SAFE)
    stage = RouteStage(checkers={"mbpp": check_mbpp}, drop_wrong=True)
    asyncio.run(stage.process(case))
    assert case.status == case_pb2.CASE_STATUS_SAFE_ORIGINAL
    assert (case.response.completion_index, case.response.answer_check) == (1, "correct")
