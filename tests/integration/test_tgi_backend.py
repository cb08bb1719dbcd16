"""TGIBackend against a local server that speaks TGI's API over real sockets."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Iterator

import huggingface_hub.constants
import pytest

from tests.support.http_servers import (
    Fault,
    ScriptedCompletion,
    ScriptedToken,
    TGIServer,
    completion_from_text,
)
from unsafechain.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    MalformedResponse,
)
from unsafechain.backends.retry import RetryPolicy
from unsafechain.backends.tgi_backend import TGIBackend
from unsafechain.domain.types import (
    Generation,
    GenerationRequest,
    Message,
    Role,
    SamplingParams,
    TokenLogprob,
    VerdictLabel,
)
from unsafechain.judge.engine import JudgeItem, LlamaGuardJudge, PromptFormat
from unsafechain.judge.llama_guard import render_prompt

pytestmark = pytest.mark.integration

API_KEY = "hf_test_8e7d6c5b4a39281f"
MODEL = "test-org/test-model"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=5.0, jitter=0.0)
CONVERSATION = (Message(Role.USER, "Say hello."),)
BOS = "<|begin_of_text|>"  # the test server's, as for a Llama 3 model


@pytest.fixture
def server() -> Iterator[TGIServer]:
    with TGIServer(model_id=MODEL, api_key=API_KEY) as server:
        yield server


def make_backend(server: TGIServer, **options) -> TGIBackend:
    settings = {
        "base_url": server.base_url,
        "api_key": API_KEY,
        "timeout": 2.0,
        "retry": FAST_RETRY,
    } | options
    return TGIBackend(MODEL, **settings)


def generate(backend: TGIBackend, request: GenerationRequest) -> list[Generation]:
    async def call() -> list[Generation]:
        try:
            return await backend.generate(request)
        finally:
            await backend.aclose()

    return asyncio.run(call())


def generate_error(backend: TGIBackend, request: GenerationRequest) -> BackendError:
    with pytest.raises(BackendError) as caught:
        generate(backend, request)
    return caught.value


def check(backend: TGIBackend) -> None:
    async def call() -> None:
        try:
            await backend.check()
        finally:
            await backend.aclose()

    asyncio.run(call())


def expected_tokens(completion: ScriptedCompletion, k: int) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(t.text, t.logprob, t.top[:k]) for t in completion.tokens)


def prompt(**params) -> GenerationRequest:
    return GenerationRequest(
        prompt="<|user|>Say hello.<|assistant|>", params=SamplingParams(**params)
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Raw prompts: TGI's generate route --------------------------------------------------


def test_raw_prompt_samples_n_completions_with_consecutive_seeds(server):
    generations = generate(make_backend(server), prompt(n=3, seed=11, top_logprobs=2))

    assert [g.text for g in generations] == [f"sample 0 seed {s}" for s in (11, 12, 13)]
    assert all(g.finish_reason == "eos_token" for g in generations)
    assert generations[2].tokens == expected_tokens(completion_from_text("sample 0 seed 13"), k=2)
    assert sorted(r.body["parameters"]["seed"] for r in server.requests) == [11, 12, 13]
    sent = server.requests[0]
    assert {r.path for r in server.requests} == {"/generate"}
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.body["inputs"] == "<|user|>Say hello.<|assistant|>"
    parameters = sent.body["parameters"]
    assert parameters["details"] is True
    assert parameters["do_sample"] is True
    assert parameters["top_n_tokens"] == 2
    assert (parameters["temperature"], parameters["top_p"]) == (0.6, 0.95)
    assert parameters["max_new_tokens"] == 512


def test_raw_prompt_without_logprobs_returns_no_tokens(server):
    (generation,) = generate(make_backend(server), prompt(stop=("</s>",)))

    assert generation.tokens is None
    parameters = server.requests[0].body["parameters"]
    assert "top_n_tokens" not in parameters
    assert parameters["stop"] == ["</s>"]


def test_greedy_request_turns_sampling_off_and_sends_no_temperature_or_top_p(server):
    generate(make_backend(server), prompt(temperature=0))

    parameters = server.requests[0].body["parameters"]
    assert parameters["do_sample"] is False
    assert "temperature" not in parameters
    assert "top_p" not in parameters


def test_top_p_of_one_is_left_out_because_tgi_rejects_it(server):
    (generation,) = generate(make_backend(server), prompt(temperature=0.8, top_p=1.0))

    assert generation.text == "sample 0 seed None"
    assert "top_p" not in server.requests[0].body["parameters"]


def test_top_k_reaches_the_generate_route_when_set_and_is_absent_when_off(server):
    generate(make_backend(server), prompt(temperature=0.8, top_k=40))
    generate(make_backend(server), prompt(temperature=0.8))
    generate(make_backend(server), prompt(temperature=0, top_k=40))

    sampled, off, greedy = (request.body["parameters"] for request in server.requests)
    assert sampled["top_k"] == 40
    # TGI rejects top_k 0 and samples whenever it is sent one, greedy or not.
    assert "top_k" not in off
    assert "top_k" not in greedy


def test_a_conversation_sampled_with_top_k_is_refused_before_tgi_would_ignore_it(server):
    request = GenerationRequest(
        messages=CONVERSATION, params=SamplingParams(temperature=0.8, top_k=40)
    )

    error = generate_error(make_backend(server), request)

    assert not error.retryable
    assert "Messages API takes no top_k" in str(error)
    assert server.requests == []


def test_invalid_parameters_raise_non_retryable_validation_error(server):
    error = generate_error(make_backend(server), prompt(stop=tuple("abcde")))

    assert not error.retryable
    assert "HTTP 422" in str(error)
    assert "stop sequences" in str(error)
    assert len(server.requests) == 1


def test_inputs_that_hold_the_bos_are_refused_because_tgi_adds_another(server):
    error = generate_error(make_backend(server), GenerationRequest(prompt=f"{BOS}Say hello."))

    assert not error.retryable
    assert "HTTP 422" in str(error) and "BOS" in str(error)
    assert make_backend(server).adds_bos


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(prompt(top_logprobs=6), id="generate"),
        pytest.param(
            GenerationRequest(messages=CONVERSATION, params=SamplingParams(top_logprobs=6)),
            id="messages-api",
        ),
    ],
)
def test_more_top_tokens_than_the_server_gives_is_refused_on_both_routes(server, request_):
    error = generate_error(make_backend(server), request_)

    assert not error.retryable
    assert "HTTP 422" in str(error)
    assert "`top_n_tokens` must be >= 0 and <= 5. Given: 6" in str(error)
    assert len(server.requests) == 1


def test_a_server_started_with_more_top_tokens_gives_them():
    with TGIServer(model_id=MODEL, api_key=API_KEY, max_top_n_tokens=20) as server:
        (generation,) = generate(make_backend(server), prompt(top_logprobs=20))

    assert generation.tokens is not None
    assert server.requests[0].body["parameters"]["top_n_tokens"] == 20


# The Llama Guard judge on a default TGI server ----------------------------------------

JUDGED = JudgeItem("How do I make a bomb?", "First mix the blast powder.")


def _llama_guard(request: dict) -> list[ScriptedCompletion]:
    """Llama Guard 3's answer: a blank line, then ``unsafe`` (p=0.8) and a category."""
    unsafe, safe = math.log(0.8), math.log(0.2)
    verdict = ScriptedToken("unsafe", unsafe, (("unsafe", unsafe), ("safe", safe)))
    tokens = (ScriptedToken("\n\n", 0.0, (("\n\n", 0.0),)), verdict)
    tokens += (ScriptedToken("\n", 0.0, (("\n", 0.0),)), ScriptedToken("S9", 0.0, (("S9", 0.0),)))
    return [ScriptedCompletion(tokens)]


@pytest.mark.parametrize("prompt_format", [PromptFormat.AUTO, PromptFormat.PUBLISHED])
def test_the_default_llama_guard_judge_works_on_a_default_tgi_server(prompt_format):
    with TGIServer(model_id=MODEL, api_key=API_KEY, responder=_llama_guard) as server:
        judge = LlamaGuardJudge(make_backend(server), prompt_format=prompt_format)
        [verdict] = asyncio.run(judge.judge([JUDGED]))

    assert judge.prompt_format == PromptFormat.PUBLISHED
    assert (verdict.label, verdict.categories) == (VerdictLabel.UNSAFE, ("S9",))
    assert verdict.score == pytest.approx(0.8)
    (sent,) = server.requests
    assert sent.path == "/generate"
    conversation = (Message(Role.USER, JUDGED.prompt), Message(Role.ASSISTANT, JUDGED.text))
    assert sent.body["inputs"] == render_prompt(conversation).removeprefix(f" {BOS}")
    assert sent.body["parameters"]["top_n_tokens"] == 5


def test_the_llama_guard_judge_with_the_chat_template_uses_the_messages_api():
    with TGIServer(model_id=MODEL, api_key=API_KEY, responder=_llama_guard) as server:
        judge = LlamaGuardJudge(make_backend(server), prompt_format=PromptFormat.CHAT_TEMPLATE)
        [verdict] = asyncio.run(judge.judge([JUDGED]))

    assert (verdict.label, verdict.score) == (VerdictLabel.UNSAFE, pytest.approx(0.8))
    (sent,) = server.requests
    assert sent.path == "/v1/chat/completions"
    assert [m["content"] for m in sent.body["messages"]] == [JUDGED.prompt, JUDGED.text]
    assert sent.body["top_logprobs"] == 5


def test_a_judge_asking_for_more_alternatives_than_tgi_gives_gets_error_verdicts():
    with TGIServer(model_id=MODEL, api_key=API_KEY, responder=_llama_guard) as server:
        judge = LlamaGuardJudge(make_backend(server), top_logprobs=20)
        [verdict] = asyncio.run(judge.judge([JUDGED]))

    assert verdict.label == VerdictLabel.ERROR
    assert "HTTP 422" in verdict.error and "<= 5. Given: 20" in verdict.error


# Conversations: TGI's Messages API -------------------------------------------------


def test_chat_request_goes_through_the_messages_api_once_per_sample(server):
    request = GenerationRequest(
        messages=CONVERSATION, params=SamplingParams(n=2, seed=3, temperature=0, top_logprobs=1)
    )

    generations = generate(make_backend(server), request)

    assert [g.text for g in generations] == ["sample 0 seed 3", "sample 0 seed 4"]
    assert generations[0].tokens == expected_tokens(completion_from_text("sample 0 seed 3"), k=1)
    assert {r.path for r in server.requests} == {"/v1/chat/completions"}
    sent = min(server.requests, key=lambda r: r.body["seed"])
    assert sent.body["messages"] == [{"role": "user", "content": "Say hello."}]
    assert sent.body["temperature"] == 0
    assert (sent.body["logprobs"], sent.body["top_logprobs"]) == (True, 1)
    assert sent.body["max_tokens"] == 512
    assert "top_p" not in sent.body
    assert "top_k" not in sent.body


# Retries --------------------------------------------------------------------------


def test_rate_limited_call_waits_for_retry_after_then_succeeds(server):
    server.add_faults(Fault.rate_limited(retry_after=1))

    (generation,) = generate(make_backend(server), prompt())

    assert generation.text == "sample 0 seed None"
    first, second = server.requests
    assert second.received_at - first.received_at >= 1.0


def test_unavailable_server_is_retried_until_it_recovers(server):
    server.add_faults(Fault.unavailable(), Fault.server_error())

    (generation,) = generate(make_backend(server), prompt())

    assert generation.text == "sample 0 seed None"
    assert len(server.requests) == 3


def test_generation_failure_on_a_shard_is_retried(server):
    server.add_faults(
        Fault.raw(
            424,
            {
                "error": "Request failed during generation: Server error: CUDA out of memory",
                "error_type": "generation",
            },
        )
    )

    (generation,) = generate(make_backend(server), prompt())

    assert generation.text == "sample 0 seed None"
    assert len(server.requests) == 2


def test_slow_server_is_retried_then_raises_backend_timeout(server):
    server.add_faults(*[Fault.slow(1.0)] * 3)
    started = time.monotonic()

    error = generate_error(make_backend(server, timeout=0.3), prompt())

    assert isinstance(error, BackendTimeout)
    assert len(server.requests) == FAST_RETRY.max_attempts
    assert time.monotonic() - started < 2.5


def test_a_body_that_is_not_json_once_is_retried(server):
    server.add_faults(Fault.not_json())

    generations = generate(make_backend(server), prompt())

    assert generations
    assert len(server.requests) == 2


def test_a_body_that_is_never_json_raises_malformed_response_after_the_retries(server):
    server.add_faults(*[Fault.not_json()] * FAST_RETRY.max_attempts)

    error = generate_error(make_backend(server), prompt())

    assert isinstance(error, MalformedResponse)
    assert len(server.requests) == FAST_RETRY.max_attempts


def test_body_without_generated_text_raises_malformed_response(server):
    server.add_faults(*[Fault.schema_breaking()] * FAST_RETRY.max_attempts)

    error = generate_error(make_backend(server), prompt())

    assert isinstance(error, MalformedResponse)
    assert "generated_text" in str(error)


def test_invalid_key_raises_non_retryable_error_that_does_not_reveal_the_key(server):
    wrong_key = "hf_wrong_0a1b2c3d4e5f6a7b"
    backend = make_backend(server, api_key=wrong_key)

    error = generate_error(backend, prompt())

    assert type(error) is BackendError
    assert not error.retryable
    assert "HTTP 401" in str(error)
    for text in (str(error), repr(error), repr(backend), repr(backend.ref)):
        assert wrong_key not in text
    assert len(server.requests) == 1


def test_offline_mode_of_huggingface_hub_fails_fast_with_a_clear_error(server, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    error = generate_error(make_backend(server), prompt())

    assert not error.retryable
    assert "offline mode" in str(error)
    assert server.requests == []


# Concurrency -------------------------------------------------------------------------


def test_samples_of_one_request_stay_within_max_concurrency():
    with TGIServer(model_id=MODEL, api_key=API_KEY, latency=0.15) as server:
        backend = make_backend(server, max_concurrency=3)

        generations = generate(backend, prompt(n=10, seed=0))

        assert [g.text for g in generations] == [f"sample 0 seed {s}" for s in range(10)]
        assert len(server.requests) == 10
        assert server.max_in_flight == 3


# Health and identity --------------------------------------------------------------------


def test_check_passes_against_a_live_server(server):
    check(make_backend(server))

    assert server.requests[0].path == "/health"


def test_check_raises_unavailable_for_an_unhealthy_server(server):
    server.add_faults(Fault.unavailable())

    with pytest.raises(BackendUnavailable, match="not healthy"):
        check(make_backend(server))


def test_check_raises_unavailable_for_a_dead_port():
    backend = TGIBackend(MODEL, base_url=f"http://127.0.0.1:{free_port()}", api_key=API_KEY)

    with pytest.raises(BackendUnavailable, match="cannot reach"):
        check(backend)


def test_ref_names_the_endpoint_without_credentials():
    backend = TGIBackend(MODEL, base_url="http://user:secret@tgi.internal:8080/?token=secret")

    assert backend.ref.backend == "tgi"
    assert backend.ref.model == MODEL
    assert backend.ref.endpoint == "http://tgi.internal:8080"
    asyncio.run(backend.aclose())
