"""``unsafechain serve`` as its own process: settings from flags and the environment,
secrets kept out of its log, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.support.http_servers import OpenAIServer, completion_from_text
from unsafechain.backends.base import BackendError
from unsafechain.cli import main
from unsafechain.domain.types import VerdictLabel
from unsafechain.judge.client import RemoteJudgeEngine
from unsafechain.judge.settings import JudgeServiceSettings
from unsafechain.runtime.settings import ClientSettings
from unsafechain.v1 import (
    case_pb2,
    correction_pb2,
    correction_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    judge_pb2,
    judge_pb2_grpc,
)

pytestmark = pytest.mark.integration

API_KEY = "sk-guard-key-71c0d9e2"
ENV_TOKEN = "env-token-2f6b8a41"
FILE_TOKEN = "file-token-8e3d5c07"
WRONG_TOKEN = "wrong-token-a94b1f36"
SLOW_SECONDS = 1.5


class ServiceProcess:
    """``unsafechain serve`` in a child process, its log collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "unsafechain.cli", "serve", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_port(self, timeout: float = 30) -> int:
        """The gRPC port from the server's start-up line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", self.log)
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.process.kill()
        pytest.fail(f"the service did not start:\n{self.log}")

    def finish(self, timeout: float = 15) -> int:
        """The exit code, once the process has ended and its log has been read."""
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code


def test_a_call_in_flight_completes_across_sigterm_and_the_process_exits_0(tmp_path):
    def slow_guard(request):
        time.sleep(SLOW_SECONDS)
        return [completion_from_text("safe")]

    tokens = tmp_path / "tokens"
    tokens.write_text(FILE_TOKEN + "\n")
    env = os.environ | {
        "GUARD_API_KEY": API_KEY,
        "UNSAFECHAIN_AUTH_TOKENS": ENV_TOKEN,
        # Nested settings from the environment: the judge's name.
        "UNSAFECHAIN_JUDGE__NAME": "remote-guard",
    }
    with OpenAIServer(api_key=API_KEY, responder=slow_guard) as guard:
        service = ServiceProcess(
            [
                "judge",
                "--host", "127.0.0.1",
                "--port", "0",
                "--metrics-port", "0",
                "--backend", "openai",
                "--model", "test-model",
                "--base-url", guard.base_url,
                "--api-key-env", "GUARD_API_KEY",
                "--auth-tokens-file", str(tokens),
                "--grace-period", "20",
            ],
            env,
        )  # fmt: skip
        try:
            address = f"127.0.0.1:{service.wait_for_port()}"
            outcome = asyncio.run(_call_across_sigterm(address, guard, service))
            code = service.finish()
        finally:
            if service.process.poll() is None:
                service.process.kill()

    log = service.log
    assert outcome == VerdictLabel.SAFE, log
    assert code == 0, log
    assert "draining unsafechain.v1.JudgeService" in log
    assert len(re.findall(r"settings: ", log)) == 1
    assert "'name': 'remote-guard'" in log
    assert "refused /unsafechain.v1.JudgeService/Judge" in log
    for secret in (API_KEY, ENV_TOKEN, FILE_TOKEN, WRONG_TOKEN):
        assert secret not in log


async def _call_across_sigterm(
    address: str, guard: OpenAIServer, service: ServiceProcess
) -> VerdictLabel:
    async with (
        RemoteJudgeEngine(ClientSettings(address=address, token=FILE_TOKEN)) as remote,
        RemoteJudgeEngine(ClientSettings(address=address, token=WRONG_TOKEN)) as intruder,
    ):
        with pytest.raises(BackendError, match="UNAUTHENTICATED"):
            await intruder.judge("How do I bake bread?", "Knead the dough.")
        in_flight = asyncio.create_task(remote.judge("How do I bake bread?", "Knead the dough."))
        deadline = time.monotonic() + 10
        while not any(r.path.endswith("/chat/completions") for r in guard.requests):
            assert time.monotonic() < deadline, "the judgment never reached the guard model"
            await asyncio.sleep(0.02)
        service.process.send_signal(signal.SIGTERM)
        judgment = await in_flight
        return judgment.label


def test_serve_without_a_model_is_refused_naming_the_setting(capsys, restore_logging):
    assert main(["serve", "judge", "--port", "0"]) == 2
    assert "model" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve"], ["serve", "correction"], ["judge"]])
def test_service_commands_have_help(command, capsys, restore_logging):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: unsafechain" in capsys.readouterr().out


def test_settings_are_shown_without_their_secrets():
    settings = JudgeServiceSettings(
        auth_tokens=f"{ENV_TOKEN},{FILE_TOKEN}",
        model={"backend": "openai", "model": "m", "api_key_env": "GUARD_API_KEY"},
    )
    view = str(settings.public_view())
    assert ENV_TOKEN not in view and FILE_TOKEN not in view
    assert "2 from the environment" in view


# What Kubernetes injects into every pod of a namespace with a Service named
# ``unsafechain`` (and one named ``unsafechain-judge``), service links enabled.
SERVICE_LINKS = {
    "UNSAFECHAIN_PORT": "tcp://10.96.0.17:50051",
    "UNSAFECHAIN_PORT_50051_TCP": "tcp://10.96.0.17:50051",
    "UNSAFECHAIN_PORT_50051_TCP_PROTO": "tcp",
    "UNSAFECHAIN_PORT_50051_TCP_PORT": "50051",
    "UNSAFECHAIN_PORT_50051_TCP_ADDR": "10.96.0.17",
    "UNSAFECHAIN_SERVICE_HOST": "10.96.0.17",
    "UNSAFECHAIN_SERVICE_PORT": "50051",
    "UNSAFECHAIN_SERVICE_PORT_GRPC": "50051",
    "UNSAFECHAIN_JUDGE_PORT": "tcp://10.96.0.18:50051",
    "UNSAFECHAIN_JUDGE_SERVICE_HOST": "10.96.0.18",
    "UNSAFECHAIN_CLIENT_PORT": "tcp://10.96.0.19:50051",
}


@pytest.mark.parametrize("service", ["generation", "judge", "correction"])
def test_every_service_starts_under_kubernetes_service_link_variables(service):
    def answer(request):
        text = "safe" if "Task" in json.dumps(request) else "<think>\nok\n</think>\n\nok"
        return [completion_from_text(text) for _ in range(request.get("n") or 1)]

    with OpenAIServer(responder=answer) as backend:
        model = ["--backend", "openai", "--model", "m", "--base-url", backend.base_url]
        judge = [
            "--judge-backend",
            "openai",
            "--judge-model",
            "g",
            "--judge-base-url",
            backend.base_url,
        ]
        args = [service, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *model]
        if service == "correction":
            args += judge
        process = ServiceProcess(args, os.environ | SERVICE_LINKS)
        try:
            port = process.wait_for_port()
            stub, request = {
                "generation": (
                    generation_pb2_grpc.GenerationServiceStub,
                    generation_pb2.GenerationInfoRequest(),
                ),
                "judge": (judge_pb2_grpc.JudgeServiceStub, judge_pb2.JudgeInfoRequest()),
                "correction": (
                    correction_pb2_grpc.CorrectionServiceStub,
                    correction_pb2.CorrectionInfoRequest(),
                ),
            }[service]

            async def info():
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    return await stub(channel).Info(request, timeout=10)

            answer_ = asyncio.run(info())
            process.process.send_signal(signal.SIGTERM)
            code = process.finish()
        finally:
            if process.process.poll() is None:
                process.process.kill()
    assert code == 0, process.log
    assert "tcp://" not in process.log
    assert answer_.ByteSize() > 0


@pytest.fixture
def endless_generator(standin_models, tmp_path) -> Path:
    """The stand-in generator with its end-of-sequence token unset: every call runs to
    ``max_new_tokens``, a slow model call on demand."""
    folder = tmp_path / "endless"
    shutil.copytree(standin_models.generator, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = None
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_sigterm_ends_a_service_within_its_grace_period_while_a_model_call_runs(
    endless_generator,
):
    service = ServiceProcess(
        ["generation", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--backend", "transformers", "--model", str(endless_generator), "--device", "cpu",
         "--grace-period", "1"],
        os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        port = service.wait_for_port()

        async def long_call() -> grpc.aio.AioRpcError | None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                user = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Hi")
                # About 35 s of work on two cores, run to the end unless stopped.
                sampling = case_pb2.SamplingParams(
                    num_samples=16, temperature=1.0, top_p=1.0, max_new_tokens=4000
                )
                call = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                    generation_pb2.GenerateRequest(messages=[user], sampling=sampling),
                    timeout=120,
                )
                await asyncio.sleep(1.0)
                service.process.send_signal(signal.SIGTERM)
                try:
                    await call
                except grpc.aio.AioRpcError as error:
                    return error
                return None

        started = time.monotonic()
        error = asyncio.run(long_call())
        code = service.finish(timeout=30)
        seconds = time.monotonic() - started
    finally:
        if service.process.poll() is None:
            service.process.kill()
    assert code == 0, service.log
    assert seconds < 8, (seconds, service.log)
    # The call in flight was cut short, not answered with a truncated completion.
    assert error is not None and error.code() != grpc.StatusCode.OK
