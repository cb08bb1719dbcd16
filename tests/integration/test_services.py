"""The gRPC services on real servers on free loopback ports, over real tiny models.

The servers and their clients run on one event loop in a background thread, as they
would in a service process; the tests drive it with :meth:`LoopThread.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.request
from collections.abc import Coroutine
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.certs import make_certificates
from tests.support.grpc_servers import (
    LoopThread,
    server_settings,
    start_server,
    start_server_from_settings,
)
from tests.support.http_servers import Fault, OpenAIServer, completion_from_text
from tests.unit.scripted_backend import ScriptedBackend
from unsafechain.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
)
from unsafechain.backends.transformers_backend import TransformersBackend
from unsafechain.cli import main
from unsafechain.correction.client import RemoteCorrectionEngine
from unsafechain.correction.engine import CorrectionEngine
from unsafechain.correction.servicer import CorrectionServicer
from unsafechain.domain.types import Generation, JudgeTarget, SamplingParams, VerdictLabel
from unsafechain.generation.client import RemoteGenerationEngine
from unsafechain.generation.engine import GenerationEngine
from unsafechain.generation.servicer import GenerationServicer
from unsafechain.judge.client import RemoteJudgeEngine
from unsafechain.judge.engine import JudgeEngine, LlamaGuardJudge
from unsafechain.judge.servicer import JudgeServicer
from unsafechain.runtime.metrics import ServiceMetrics
from unsafechain.runtime.server import ServiceServer
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

SAFE = ("How do I bake bread?", "<think>\nMix flour and water.\n</think>\n\nBake it for an hour.")
HARMFUL = ("How do I make a bomb?", "<think>\nmix the blast powder\n</think>\n\nThen light it.")


def client(server: ServiceServer, **overrides: Any) -> ClientSettings:
    return ClientSettings(**({"address": f"127.0.0.1:{server.port}", "timeout": 30} | overrides))


async def rpc_error(call: Coroutine[Any, Any, Any]) -> grpc.aio.AioRpcError:
    """The error ``call`` fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return failure.value


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def guard(standin_models):
    return TransformersBackend(str(standin_models.judge), device="cpu")


@pytest.fixture(scope="module")
def generator(standin_models):
    return TransformersBackend(str(standin_models.generator), device="cpu")


@pytest.fixture(scope="module")
def corrector(standin_models):
    return TransformersBackend(str(standin_models.corrector), device="cpu")


@pytest.fixture(scope="module")
def guard_engine(guard) -> JudgeEngine:
    return JudgeEngine([LlamaGuardJudge(guard, name="guard")])


def judge_servicer(guard: TransformersBackend, metrics: ServiceMetrics) -> JudgeServicer:
    """A judge servicer over the shared guard model, its backend calls timed."""
    engine = JudgeEngine([LlamaGuardJudge(metrics.timed(guard), name="guard")])
    return JudgeServicer(engine, batch_max_wait=0.05, metrics=metrics)


@pytest.fixture(scope="module")
def judge_server(loop, guard):
    def servicer(metrics):
        return judge_servicer(guard, metrics)

    server = loop.run(start_server(server_settings(), servicer))
    yield server
    loop.run(server.drain())


@pytest.fixture(scope="module")
def generation_server(loop, generator):
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    server = loop.run(
        start_server(
            server_settings("generation"),
            lambda metrics: GenerationServicer(GenerationEngine(generator, params)),
        )
    )
    yield server
    loop.run(server.drain())


@pytest.fixture(scope="module")
def correction_engine(corrector, guard_engine) -> CorrectionEngine:
    params = SamplingParams(n=1, temperature=0.7, max_new_tokens=64)
    return CorrectionEngine(corrector, guard_engine, params=params, max_attempts=2)


@pytest.fixture(scope="module")
def correction_server(loop, correction_engine):
    server = loop.run(
        start_server(
            server_settings("correction"),
            lambda metrics: CorrectionServicer(correction_engine),
        )
    )
    yield server
    loop.run(server.drain())


# ---------------------------------------------------------------------------
# Health, reflection, metrics
# ---------------------------------------------------------------------------


def test_health_is_serving_and_reflection_lists_the_services(loop, judge_server):
    async def probe():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{judge_server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = [
                (await health.Check(health_pb2.HealthCheckRequest(service=name))).status
                for name in ("", "unsafechain.v1.JudgeService")
            ]
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await call.read()
            await call.write(
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="unsafechain.v1.JudgeService"
                )
            )
            described = await call.read()
            await call.done_writing()
            return statuses, listed, described

    statuses, listed, described = loop.run(probe())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    names = {service.name for service in listed.list_services_response.service}
    assert {"unsafechain.v1.JudgeService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_metrics_endpoint_exports_calls_latency_in_flight_backend_time_and_batch_sizes(
    loop, judge_server
):
    async def calls():
        async with RemoteJudgeEngine(client(judge_server)) as engine:
            await engine.judge(*SAFE)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{judge_server.port}") as channel:
            await rpc_error(
                judge_pb2_grpc.JudgeServiceStub(channel).Judge(judge_pb2.JudgeRequest())
            )

    loop.run(calls())
    url = f"http://127.0.0.1:{judge_server.metrics_port}/metrics"
    labels = 'grpc_code="{}",grpc_method="Judge",grpc_service="unsafechain.v1.JudgeService"'
    refused = f"unsafechain_grpc_requests_total{{{labels.format('INVALID_ARGUMENT')}}}"
    # grpc.aio's abort sends the status before it raises, so the client can see the
    # error a moment before the interceptor counts the call: scrape until it has.
    deadline = time.monotonic() + 5
    while True:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if refused in text or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert f"unsafechain_grpc_requests_total{{{labels.format('OK')}}}" in text
    assert refused in text
    assert f"unsafechain_grpc_request_duration_seconds_count{{{labels.format('OK')}}}" in text
    assert "unsafechain_grpc_requests_in_flight{" in text
    assert "unsafechain_judge_batch_size_count" in text
    assert 'unsafechain_backend_request_duration_seconds_count{model="' in text


# ---------------------------------------------------------------------------
# The judge service
# ---------------------------------------------------------------------------


def test_single_and_batched_judgments_equal_the_engine_in_process(loop, judge_server, guard_engine):
    async def judge():
        async with RemoteJudgeEngine(client(judge_server)) as remote:
            single = await remote.judge(*HARMFUL)
            batch = await remote.judge_pairs([SAFE, HARMFUL])
            parts = await remote.judge(
                *HARMFUL, targets=[JudgeTarget.REASONING, JudgeTarget.ANSWER]
            )
        local_single = await guard_engine.judge_pairs([HARMFUL])
        local_batch = await guard_engine.judge_pairs([SAFE, HARMFUL])
        return single, batch, parts, local_single, local_batch

    single, batch, parts, local_single, local_batch = loop.run(judge())
    assert [single] == local_single
    assert batch == local_batch
    assert [v.target for v in parts.verdicts] == [JudgeTarget.REASONING, JudgeTarget.ANSWER]
    assert single.verdicts[0].judge.name == "guard"
    assert single.verdicts[0].score is not None


def test_concurrent_requests_are_micro_batched_into_shared_model_calls(loop, judge_server):
    def observed() -> tuple[float, float]:
        registry = judge_server.metrics.registry
        count = registry.get_sample_value("unsafechain_judge_batch_size_count") or 0
        return count, registry.get_sample_value("unsafechain_judge_batch_size_sum") or 0

    async def judge_concurrently():
        async with RemoteJudgeEngine(client(judge_server)) as remote:
            return await asyncio.gather(*(remote.judge(*SAFE) for _ in range(8)))

    calls_before, pairs_before = observed()
    judgments = loop.run(judge_concurrently())
    calls_after, pairs_after = observed()
    assert len(judgments) == 8
    # The same verdict each time; a score agrees to float rounding, since a batch
    # that shares a prefix computes it once (transformers_backend._with_shared_prefix).
    verdicts = [j.verdicts[0] for j in judgments]
    assert len({(v.label, v.categories, v.raw_output) for v in verdicts}) == 1
    assert max(v.score for v in verdicts) - min(v.score for v in verdicts) < 1e-5
    assert pairs_after - pairs_before == 8
    assert calls_after - calls_before < 8, "concurrent requests were judged one by one"


def test_invalid_requests_are_refused_with_invalid_argument_naming_the_field(
    loop, judge_server, generation_server, correction_server
):
    async def send_invalid():
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{judge_server.port}") as judge_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{generation_server.port}") as gen_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{correction_server.port}") as fix_channel,
        ):
            judge = judge_pb2_grpc.JudgeServiceStub(judge_channel)
            generation = generation_pb2_grpc.GenerationServiceStub(gen_channel)
            correction = correction_pb2_grpc.CorrectionServiceStub(fix_channel)
            user = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="hi")
            calls = [
                judge.Judge(judge_pb2.JudgeRequest(prompt=" ", response="x")),
                judge.Judge(judge_pb2.JudgeRequest(prompt="p", response="x", targets=[0])),
                judge.JudgeBatch(judge_pb2.JudgeBatchRequest()),
                judge.JudgeBatch(
                    judge_pb2.JudgeBatchRequest(
                        items=[
                            judge_pb2.JudgeRequest(prompt="p", response="r"),
                            judge_pb2.JudgeRequest(prompt="p", response=""),
                        ]
                    )
                ),
                generation.Generate(generation_pb2.GenerateRequest()),
                generation.Generate(
                    generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage()])
                ),
                generation.Generate(
                    generation_pb2.GenerateRequest(
                        messages=[user],
                        sampling=case_pb2.SamplingParams(
                            num_samples=1, top_p=2.0, max_new_tokens=8
                        ),
                    )
                ),
                generation.Generate(
                    generation_pb2.GenerateRequest(
                        messages=[user],
                        sampling=case_pb2.SamplingParams(
                            num_samples=1, top_p=0.9, top_k=-1, max_new_tokens=8
                        ),
                    )
                ),
                correction.Correct(correction_pb2.CorrectRequest(prompt="p")),
                correction.Correct(
                    correction_pb2.CorrectRequest(
                        prompt="p", completion=case_pb2.Completion(text="c"), targets=[1, 0]
                    )
                ),
                generation.Generate(
                    generation_pb2.GenerateRequest(
                        messages=[generation_pb2.ChatMessage(role=99, content="hi")]  # type: ignore[arg-type]
                    )
                ),
                # Bytes that are no request message at all.
                judge_channel.unary_unary("/unsafechain.v1.JudgeService/Judge")(b"\xff\xff\xff"),
            ]
            return [await rpc_error(call) for call in calls]

    errors = loop.run(send_invalid())
    assert {error.code() for error in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert [error.details().split(":")[0] for error in errors] == [
        "prompt",
        "targets[0]",
        "items",
        "items[1].response",
        "messages",
        "messages[0].role",
        "sampling.top_p",
        "sampling.top_k",
        "completion",
        "targets[1]",
        "messages[0].role",
        "request",
    ]


def test_a_passed_deadline_answers_deadline_exceeded_and_cuts_the_backend_call_short(loop):
    def slow(request):
        time.sleep(3)
        return [completion_from_text("safe")]

    with OpenAIServer(responder=slow) as backend:
        settings = server_settings(
            model={"backend": "openai", "model": "test-model", "base_url": backend.base_url}
        )
        server = loop.run(start_server_from_settings(settings))
        try:

            async def late():
                async with RemoteJudgeEngine(client(server, timeout=0.5)) as remote:
                    started = time.monotonic()
                    with pytest.raises(BackendTimeout, match="DEADLINE_EXCEEDED"):
                        await remote.judge(*SAFE)
                    return time.monotonic() - started

            assert loop.run(late()) < 2

            def backend_time_cut_short() -> float | None:
                return server.metrics.registry.get_sample_value(
                    "unsafechain_backend_request_duration_seconds_sum",
                    {"model": "test-model", "operation": "generate_each", "outcome": "error"},
                )

            # The backend call ends at the same deadline, on the server's own clock.
            waited = time.monotonic()
            while backend_time_cut_short() is None and time.monotonic() - waited < 1:
                time.sleep(0.01)
            cut_short = backend_time_cut_short()
            assert cut_short is not None and cut_short < 2
        finally:
            loop.run(server.drain(0))


def test_health_follows_the_backend_down_to_not_serving_and_back_up(loop):
    backend = OpenAIServer().start()
    settings = server_settings(
        model={"backend": "openai", "model": "test-model", "base_url": backend.base_url},
        health_interval=0.1,
        health_timeout=1.0,
    )
    server = loop.run(start_server_from_settings(settings))
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )

    async def status() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="unsafechain.v1.JudgeService")
            )
            return answer.status

    async def remote_check() -> None:
        async with RemoteJudgeEngine(client(server)) as remote:
            await remote.check()

    def wait_for(wanted: int) -> None:
        deadline = time.monotonic() + 5
        while loop.run(status()) != wanted:
            assert time.monotonic() < deadline, f"health never turned {wanted}"
            time.sleep(0.02)

    try:
        assert loop.run(status()) == serving
        loop.run(remote_check())
        # The backend answers its next checks with 503, as an overloaded server does.
        backend.add_faults(*[Fault.unavailable()] * 10)
        wait_for(not_serving)
        with pytest.raises(BackendUnavailable, match="NOT_SERVING"):
            loop.run(remote_check())
        wait_for(serving)
    finally:
        backend.stop()
        loop.run(server.drain(0))


def test_a_service_whose_backend_is_unreachable_starts_not_serving(loop):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    base_url = f"http://127.0.0.1:{closed_port}/v1"
    settings = server_settings(model={"backend": "openai", "model": "m", "base_url": base_url})
    server = loop.run(start_server_from_settings(settings))

    async def status() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
            return answer.status

    try:
        assert loop.run(status()) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        loop.run(server.drain(0))


# ---------------------------------------------------------------------------
# Generation and correction services, standing in for their engines
# ---------------------------------------------------------------------------


def test_remote_generation_engine_returns_what_the_engine_returns_for_a_seed(
    loop, generation_server, generator
):
    params = SamplingParams(n=2, temperature=0.9, max_new_tokens=24)

    async def generate():
        async with RemoteGenerationEngine(client(generation_server), params) as remote:
            first = await remote.generate("How do I bake bread?", seed=7)
            again = await remote.generate("How do I bake bread?", seed=7)
        local = await GenerationEngine(generator, params).generate("How do I bake bread?", seed=7)
        return first, again, local

    first, again, local = loop.run(generate())
    assert len(first) == 2
    assert first == again == local
    # The stand-in's R1 template opens the think section; the service says so, and the
    # client splits each text as the service did.
    assert all(c.split.opened_by_prompt for c in first)


def test_generate_without_sampling_uses_the_services_defaults(loop, generation_server):
    async def generate():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{generation_server.port}") as channel:
            user = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Hi")
            return await generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                generation_pb2.GenerateRequest(messages=[user])
            )

    answer = loop.run(generate())
    assert len(answer.completions) == 1
    assert answer.model.backend == "transformers" and answer.model.model.endswith("generator")


def test_generation_service_reports_its_top_k_and_passes_a_requests_own_to_the_model(loop):
    backend = ScriptedBackend(lambda request: [Generation("<think>\nok\n</think>\n\nHi.", "stop")])
    defaults = SamplingParams(n=1, temperature=0.6, top_k=20, max_new_tokens=16)

    async def ask():
        server = await start_server(
            server_settings("generation"),
            lambda metrics: GenerationServicer(GenerationEngine(backend, defaults)),
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                info = await stub.Info(generation_pb2.GenerationInfoRequest())
                user = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Hi")
                for top_k in (5, 0):
                    sampling = case_pb2.SamplingParams(
                        num_samples=1, temperature=0.6, top_p=0.9, top_k=top_k, max_new_tokens=8
                    )
                    await stub.Generate(
                        generation_pb2.GenerateRequest(messages=[user], sampling=sampling)
                    )
                await stub.Generate(generation_pb2.GenerateRequest(messages=[user]))
        finally:
            await server.drain()
        return info

    info = loop.run(ask())
    assert info.default_sampling.top_k == 20
    assert [request.params.top_k for request in backend.requests] == [5, 0, 20]


def test_remote_correction_engine_returns_what_the_engine_returns_for_a_seed(
    loop, correction_server, correction_engine
):
    prompt, completion = HARMFUL

    async def correct():
        async with RemoteCorrectionEngine(client(correction_server)) as remote:
            outcome = await remote.correct(prompt, completion, ["S9"], seed=5)
        local = await correction_engine.correct(prompt, completion, ["S9"], seed=5)
        return outcome, local

    outcome, local = loop.run(correct())

    def comparable(result):
        return [
            (a.number, a.text, a.split, a.verdicts, a.label, a.failure_reason)
            for a in result.attempts
        ]

    assert outcome.attempts
    assert comparable(outcome) == comparable(local)
    assert (outcome.passed is None) == (local.passed is None)


# ---------------------------------------------------------------------------
# The judge command line
# ---------------------------------------------------------------------------


def test_judge_command_prints_the_verdict(judge_server, capsys, restore_logging):
    prompt, response = HARMFUL
    address = f"127.0.0.1:{judge_server.port}"
    code = main(["judge", "--server", address, "--prompt", prompt, "--response", response])
    assert code == 0
    text = capsys.readouterr().out
    assert text.split()[0] in {label.value for label in VerdictLabel}
    assert "guard [full]:" in text
    assert (
        main(["judge", "--server", address, "--prompt", prompt, "--response", response, "--json"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["verdicts"][0]["judge"] == "guard"


# ---------------------------------------------------------------------------
# Security: bearer tokens, TLS, mutual TLS
# ---------------------------------------------------------------------------

ENV_TOKEN = "env-token-5b1e7c2a"
FILE_TOKEN = "file-token-9d4f0a6e"
WRONG_TOKEN = "wrong-token-c3a8e1f7"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def served(loop, guard):
    """Starts judge servers with the given setting overrides; drains them afterwards."""
    servers = []

    def serve(**overrides: Any) -> ServiceServer:
        settings = server_settings(**overrides)
        server = loop.run(start_server(settings, lambda metrics: judge_servicer(guard, metrics)))
        servers.append(server)
        return server

    yield serve
    for server in servers:
        loop.run(server.drain(0))


def judged(loop, settings: ClientSettings) -> VerdictLabel:
    """The label a judgment through ``settings`` gets; raises what the call raises."""

    async def ask():
        async with RemoteJudgeEngine(settings) as remote:
            return (await remote.judge(*SAFE)).label

    return loop.run(ask())


def test_calls_need_a_valid_bearer_token_but_health_probes_do_not(loop, served, tmp_path, caplog):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# accepted tokens\n{FILE_TOKEN}\n\n")
    server = served(auth_tokens=ENV_TOKEN, auth_tokens_file=tokens)

    for token in (None, WRONG_TOKEN):
        with pytest.raises(BackendError, match="UNAUTHENTICATED") as refused:
            judged(loop, client(server, token=token))
        assert WRONG_TOKEN not in str(refused.value)
    assert judged(loop, client(server, token=ENV_TOKEN)) in set(VerdictLabel)
    token_file = tmp_path / "client-token"
    token_file.write_text(FILE_TOKEN + "\n")
    assert judged(loop, client(server, token_file=token_file)) in set(VerdictLabel)

    async def unauthenticated_probes():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            # The server may refuse the stream before the request is written: the write
            # then fails too; the call's status is the refusal either way.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                await call.read()
            return health.status, await call.code()

    assert loop.run(unauthenticated_probes()) == (
        health_pb2.HealthCheckResponse.SERVING,
        grpc.StatusCode.UNAUTHENTICATED,
    )
    address = f"127.0.0.1:{server.port}"
    prompt, response = SAFE
    command = ["judge", "--server", address, "--prompt", prompt, "--response", response]
    assert main([*command, "--token-file", str(token_file)]) == 0
    assert "refused" in caplog.text
    for secret in (ENV_TOKEN, FILE_TOKEN, WRONG_TOKEN):
        assert secret not in caplog.text


def test_tls_serves_clients_that_trust_its_ca_and_only_them(loop, served, certificates):
    server = served(tls_cert_file=certificates.server_cert, tls_key_file=certificates.server_key)

    assert judged(loop, client(server, ca_file=certificates.ca)) in set(VerdictLabel)
    assert judged(
        loop, client(server, address=f"localhost:{server.port}", ca_file=certificates.ca)
    ) in set(VerdictLabel)
    for refused in (client(server, timeout=5), client(server, ca_file=certificates.other_ca)):
        with pytest.raises(BackendUnavailable):
            judged(loop, refused)


def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(
    loop, served, certificates
):
    server = served(
        tls_cert_file=certificates.server_cert,
        tls_key_file=certificates.server_key,
        tls_client_ca_file=certificates.ca,
    )
    trusted = {"ca_file": certificates.ca, "timeout": 5}

    identified = client(
        server, cert_file=certificates.client_cert, key_file=certificates.client_key, **trusted
    )
    assert judged(loop, identified) in set(VerdictLabel)
    stranger = client(
        server,
        cert_file=certificates.other_client_cert,
        key_file=certificates.other_client_key,
        **trusted,
    )
    for refused in (client(server, **trusted), stranger):
        with pytest.raises(BackendUnavailable):
            judged(loop, refused)


def test_an_oversized_request_is_refused_and_the_others_are_served_in_time(
    loop, judge_server, generation_server
):
    async def hostile_and_normal():
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{judge_server.port}") as judge_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{generation_server.port}") as gen_channel,
        ):
            judge = judge_pb2_grpc.JudgeServiceStub(judge_channel)
            generation = generation_pb2_grpc.GenerationServiceStub(gen_channel)
            started = time.monotonic()
            huge = judge.Judge(judge_pb2.JudgeRequest(prompt="x " * 1_000_000, response="r"))
            many = generation.Generate(
                generation_pb2.GenerateRequest(
                    messages=[
                        generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="hi")
                    ],
                    sampling=case_pb2.SamplingParams(
                        num_samples=5000, top_p=1, max_new_tokens=100000
                    ),
                )
            )
            normal = [
                judge.Judge(judge_pb2.JudgeRequest(prompt=SAFE[0], response=SAFE[1]), timeout=30)
                for _ in range(10)
            ]
            refused = [await rpc_error(huge), await rpc_error(many)]
            answers = await asyncio.gather(*normal)
            return refused, answers, time.monotonic() - started

    refused, answers, seconds = loop.run(hostile_and_normal())
    assert [error.code() for error in refused] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert "over the limit of 200000 (limits.max_chars)" in refused[0].details()
    assert refused[1].details().startswith("sampling.num_samples: 5000 samples, over the limit")
    assert len(answers) == 10 and all(
        a.label != case_pb2.VERDICT_LABEL_UNSPECIFIED for a in answers
    )
    assert seconds < 20


def test_a_prompt_longer_than_the_models_context_is_not_sent_and_says_so(loop, judge_server):
    async def judge_long():
        async with RemoteJudgeEngine(client(judge_server)) as remote:
            return await remote.judge("word " * 8000, "fine")

    judgment = loop.run(judge_long())
    assert judgment.label == VerdictLabel.ERROR
    assert "the model's context is 4096; it is not sent" in judgment.verdicts[0].error
