"""The command line as a user meets it: known failures end with one ``error:`` line that
names the flag or configuration key and says what to do, Ctrl-C ends with one line and
status 130, and nothing prints a traceback. Each runs the installed ``unsafechain``
console script in a process of its own, as a shell would (the errors a command finds
in its configuration are tested in-process in tests/unit/test_cli_errors.py)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.certs import make_certificates
from tests.support.http_servers import OpenAIServer
from tests.support.kafka_broker import free_port
from unsafechain.demo.standins import StandinModels

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNSAFECHAIN = str(Path(sys.executable).parent / "unsafechain")
DEMO = ROOT / "pipelines" / "unsafechain" / "demo" / "demo.yaml"


def run(*args: str, timeout: float = 60, log_level: str = "WARNING"):
    return subprocess.run(
        [UNSAFECHAIN, "--log-level", log_level, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The failure's stderr: exactly one line, ``error: …``, no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def demo_config(tmp_path: Path, standins: StandinModels, **models: str) -> Path:
    """The demo's build configuration on the session's stand-ins, with model folders
    replaced as ``models`` says."""
    config = yaml.safe_load(DEMO.read_text())
    folders = {"generator": standins.generator, "guard": standins.judge,
               "corrector": standins.corrector}  # fmt: skip
    for key, folder in folders.items():
        config["models"][key]["model"] = models.get(key, str(folder))
    for source in config["sources"]:
        source["path"] = str(DEMO.parent / source["path"])  # the demo's, from its folder
    config["build"]["output"] = str(tmp_path / "build")
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_local_model_folder_that_is_not_there_names_the_key_and_the_standins_command(
    tmp_path: Path, standin_models
) -> None:
    missing = ".cache/standins-not-made/judge"
    done = run("build", "--config", str(demo_config(tmp_path, standin_models, guard=missing)))
    assert done.returncode == 2
    line = one_error_line(done)
    # The config is in tmp_path: its relative paths start there.
    assert line.startswith(f"error: models.guard.model: {tmp_path / missing} is no folder here")
    assert f"unsafechain standins --out {tmp_path / '.cache/standins-not-made'}" in line


@pytest.mark.parametrize(
    "command",
    [
        ["build", "--bus", "kafka"],
        ["topics", "create"],
        ["worker", "judge"],
    ],
    ids=["build", "topics", "worker"],
)
def test_no_broker_is_said_at_once_with_what_to_do(command: list[str], standin_models, tmp_path):
    bootstrap = f"127.0.0.1:{free_port()}"
    config = demo_config(tmp_path, standin_models)
    started = time.monotonic()
    done = run(*command, "--config", str(config), "--bootstrap", bootstrap)
    assert time.monotonic() - started < 20
    assert done.returncode == 2
    line = one_error_line(done)
    assert line.startswith(f"error: kafka.bootstrap_servers: no broker answers ({bootstrap}")
    assert "make kafka-up" in line and "--bootstrap" in line


def test_ports_in_use_and_missing_tls_files_are_named_before_the_model_loads(
    busy_port: int, standin_models
) -> None:
    started = time.monotonic()
    done = run(
        "serve", "judge", "--host", "127.0.0.1", "--port", str(busy_port),
        "--metrics-host", "127.0.0.1", "--metrics-port", str(busy_port),
        "--backend", "transformers", "--model", str(standin_models.judge),
        "--tls-cert", "/nonexistent/server.crt", "--tls-key", "/nonexistent/server.key",
    )  # fmt: skip
    assert time.monotonic() - started < 15
    assert done.returncode == 2
    line = one_error_line(done)
    assert (
        f"--port {busy_port}: 127.0.0.1:{busy_port} is in use; pick a free one with --port" in line
    )
    assert f"--metrics-port {busy_port}:" in line and "with --metrics-port" in line
    assert "--tls-cert /nonexistent/server.crt: No such file or directory" in line


@pytest.fixture
def tls_judge(tmp_path: Path, standin_models) -> Iterator[tuple[int, Path]]:
    """A judge service speaking TLS on a free port; its port and the certificates."""
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    process = subprocess.Popen(
        [UNSAFECHAIN, "--log-level", "WARNING", "serve", "judge", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--backend", "transformers",
         "--model", str(standin_models.judge), "--tls-cert", str(certs.server_cert),
         "--tls-key", str(certs.server_key)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the TLS judge service did not start"
            time.sleep(0.2)
        yield port, certs.ca
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_a_tls_mismatch_says_to_pass_the_ca_file(tls_judge: tuple[int, Path]) -> None:
    port, ca = tls_judge
    question = ["--prompt", "How do I pick a lock?", "--response", "I can't help with that."]
    plaintext = run("judge", "--server", f"127.0.0.1:{port}", *question)
    assert plaintext.returncode == 1
    assert "pass --ca-file" in one_error_line(plaintext)
    untrusted = run("judge", "--server", f"127.0.0.1:{port}", "--tls", *question)
    assert untrusted.returncode == 1
    assert "pass --ca-file with the CA that signed it" in one_error_line(untrusted)
    trusted = run("judge", "--server", f"127.0.0.1:{port}", "--ca-file", str(ca), *question)
    assert trusted.returncode == 0, trusted.stderr


def test_ctrl_c_ends_a_build_with_one_line_and_status_130(tmp_path: Path, standin_models) -> None:
    config = demo_config(tmp_path, standin_models)
    process = subprocess.Popen(
        [UNSAFECHAIN, "build", "--config", str(config), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # INFO records until the last model has loaded
        lines.append(line)
        if "loaded" in line and "corrector" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, "".join(lines) + err
    assert "Traceback" not in err and "terminate called" not in err, err
    (last,) = [line for line in err.splitlines() if line.strip()][-1:]
    assert last.startswith("interrupted: ") and last.endswith("cases stored; run again to resume")
    assert [line for line in err.splitlines() if "interrupted" in line] == [last]


def test_global_options_go_before_or_after_the_command_and_the_version_is_there() -> None:
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("unsafechain ")
    for args in (["--log-level", "ERROR", "topics", "create"], ["topics", "create", "--verbose"]):
        done = run(*args, "--help")
        assert done.returncode == 0, done.stderr


def test_a_build_whose_judge_was_not_reached_exits_non_zero_saying_so(tmp_path: Path) -> None:
    """The guard behind a port nothing listens on: every verdict is ERROR; the build
    writes what it has and ends with status 1 and one line saying why."""
    with OpenAIServer(model="generator") as generator, OpenAIServer(model="corrector") as fixer:
        unreachable = f"http://127.0.0.1:{free_port()}/v1"
        endpoints = {
            "generator": generator.base_url,
            "guard": unreachable,
            "corrector": fixer.base_url,
        }
        config = {
            "build": {"output": str(tmp_path / "out"), "concurrency": 2},
            "sources": [
                {"name": "demo", "path": str(DEMO.parent / "prompts" / "redteam.jsonl"), "limit": 3}
            ],
            "models": {
                key: {
                    "backend": "openai",
                    "model": key,
                    "base_url": url,
                    "retry": {"max_attempts": 1},
                }
                for key, url in endpoints.items()
            },
            "generation": {"model": "generator", "samples": 2},
            "judging": {
                "judges": [{"name": "llama_guard", "kind": "llama_guard", "model": "guard"}]
            },
            "correction": {"model": "corrector"},
        }
        path = tmp_path / "build.yaml"
        path.write_text(yaml.safe_dump(config))
        # ERROR: the judge's failed calls are WARNING records, one per call.
        done = run("build", "--config", str(path), "--no-progress", timeout=120, log_level="ERROR")
    assert done.returncode == 1, done.stderr
    line = one_error_line(done)
    assert line.startswith("error: 6 of 6 verdicts are ERROR: the judge calls failed")
    assert "--retry-failed" in line
    assert "dataset written to" in done.stdout
