"""OpenAIBackend against a local server that speaks the OpenAI API over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support.http_servers import (
    Fault,
    OpenAIServer,
    ScriptedCompletion,
    completion_from_text,
)
from unsafechain.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    MalformedResponse,
)
from unsafechain.backends.openai_backend import OpenAIBackend
from unsafechain.backends.retry import RetryPolicy
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

API_KEY = "sk-test-4f9c2a7e1b3d5f60"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=5.0, jitter=0.0)
CONVERSATION = (Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Say hello."))


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(api_key=API_KEY) as server:
        yield server


def make_backend(server: OpenAIServer, **options) -> OpenAIBackend:
    settings = {
        "base_url": server.base_url,
        "api_key": API_KEY,
        "timeout": 2.0,
        "retry": FAST_RETRY,
    } | options
    return OpenAIBackend(server.model, **settings)


def generate(backend: OpenAIBackend, request: GenerationRequest) -> list[Generation]:
    async def call() -> list[Generation]:
        try:
            return await backend.generate(request)
        finally:
            await backend.aclose()

    return asyncio.run(call())


def generate_error(backend: OpenAIBackend, request: GenerationRequest) -> BackendError:
    with pytest.raises(BackendError) as caught:
        generate(backend, request)
    return caught.value


def check(backend: OpenAIBackend) -> None:
    async def call() -> None:
        try:
            await backend.check()
        finally:
            await backend.aclose()

    asyncio.run(call())


def expected_tokens(completion: ScriptedCompletion, k: int) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(t.text, t.logprob, t.top[:k]) for t in completion.tokens)


def chat(**params) -> GenerationRequest:
    return GenerationRequest(messages=CONVERSATION, params=SamplingParams(**params))


def _post(url: str, body: dict) -> tuple[int, dict]:
    """POST ``body`` as JSON with no client in between; the status and the JSON answer."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Happy paths ---------------------------------------------------------------


def test_chat_request_returns_n_choices_with_top_logprobs(server):
    generations = generate(make_backend(server), chat(n=3, top_logprobs=2, seed=7))

    assert [g.text for g in generations] == [f"sample {i} seed 7" for i in range(3)]
    assert all(g.finish_reason == "stop" for g in generations)
    for index, generation in enumerate(generations):
        assert generation.tokens == expected_tokens(
            completion_from_text(f"sample {index} seed 7"), k=2
        )
    (sent,) = server.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."},
    ]
    assert sent.body["n"] == 3
    assert sent.body["seed"] == 7
    assert sent.body["logprobs"] is True
    assert sent.body["top_logprobs"] == 2
    assert sent.body["max_tokens"] == 512
    assert (sent.body["temperature"], sent.body["top_p"]) == (0.6, 0.95)


def test_chat_without_logprobs_asks_for_none_and_returns_no_tokens(server):
    (generation,) = generate(make_backend(server), chat(stop=("\n\n",)))

    assert generation.tokens is None
    (sent,) = server.requests
    assert "logprobs" not in sent.body
    assert "top_logprobs" not in sent.body
    assert "seed" not in sent.body
    assert sent.body["stop"] == ["\n\n"]


def test_greedy_request_sends_temperature_zero(server):
    generate(make_backend(server), chat(temperature=0))

    assert server.requests[0].body["temperature"] == 0


def test_raw_prompt_goes_to_the_completions_api_with_legacy_logprobs_and_no_added_bos():
    request = GenerationRequest(
        prompt="<s>[INST] hi [/INST]", params=SamplingParams(n=2, top_logprobs=3, seed=1)
    )

    # vLLM-like: the server's tokenizer would put "<s>" first unless told not to.
    with OpenAIServer(api_key=API_KEY, bos_token="<s>") as server:
        generations = generate(make_backend(server), request)

    assert [g.text for g in generations] == ["sample 0 seed 1", "sample 1 seed 1"]
    assert generations[1].tokens == expected_tokens(completion_from_text("sample 1 seed 1"), k=3)
    (sent,) = server.requests
    assert sent.path == "/v1/completions"
    assert sent.body["prompt"] == "<s>[INST] hi [/INST]"
    assert sent.body["add_special_tokens"] is False
    assert (sent.body["n"], sent.body["logprobs"], sent.body["seed"]) == (2, 3, 1)
    assert sent.body["max_tokens"] == 512


def test_server_refuses_a_prompt_that_would_get_a_second_bos():
    body = {"model": "test-model", "prompt": "<s>[INST] hi [/INST]"}
    with OpenAIServer(bos_token="<s>") as server:
        refused = _post(f"{server.base_url}/completions", body)
        accepted = _post(f"{server.base_url}/completions", body | {"add_special_tokens": False})

    assert refused[0] == 400 and "BOS" in refused[1]["error"]["message"]
    assert accepted[0] == 200


def test_published_llama_guard_prompt_reaches_a_vllm_like_server_with_one_bos():
    guard = (Message(Role.USER, "How do I bake bread?"), Message(Role.ASSISTANT, "Knead it."))
    answer = [completion_from_text("\n\nsafe")]
    with OpenAIServer(
        api_key=API_KEY, bos_token="<|begin_of_text|>", responder=lambda _: answer
    ) as server:
        judge = LlamaGuardJudge(make_backend(server), prompt_format=PromptFormat.PUBLISHED)
        [verdict] = asyncio.run(judge.judge([JudgeItem(guard[0].content, guard[1].content)]))

    assert (verdict.label, verdict.score) == (VerdictLabel.SAFE, 0.0)
    (sent,) = server.requests
    assert sent.body["prompt"] == render_prompt(guard)
    assert sent.body["add_special_tokens"] is False
    assert sent.body["logprobs"] == 5


def test_top_k_goes_to_a_vllm_server_only_when_set_on_both_routes():
    with OpenAIServer(api_key=API_KEY, accepts_top_k=True) as server:
        generate(make_backend(server), chat(temperature=0.8, top_k=40))
        generate(make_backend(server), chat(temperature=0.8))
        generate(make_backend(server), chat(temperature=0, top_k=40))
        raw = GenerationRequest(prompt="hi", params=SamplingParams(temperature=0.8, top_k=7))
        generate(make_backend(server), raw)

        sampled, off, greedy, legacy = (request.body for request in server.requests)
        assert sampled["top_k"] == 40
        assert "top_k" not in off
        assert "top_k" not in greedy
        assert (legacy["top_k"], server.requests[3].path) == (7, "/v1/completions")


def test_openai_itself_never_sees_top_k_when_off_and_rejects_it_when_set(server):
    (generation,) = generate(make_backend(server), chat(temperature=0.8))
    error = generate_error(make_backend(server), chat(temperature=0.8, top_k=40))

    assert generation.text == "sample 0 seed None"
    assert not error.retryable
    assert "Unrecognized request argument supplied: top_k" in str(error)


def test_reasoning_model_gets_max_completion_tokens_instead_of_max_tokens():
    with OpenAIServer(api_key=API_KEY, reasoning_model=True) as server:
        backend = make_backend(server, max_tokens_param="max_completion_tokens")
        (generation,) = generate(backend, chat(max_new_tokens=64))

        assert generation.text == "sample 0 seed None"
        assert server.requests[0].body["max_completion_tokens"] == 64
        assert "max_tokens" not in server.requests[0].body


def test_reasoning_model_rejects_max_tokens_as_a_non_retryable_error():
    with OpenAIServer(api_key=API_KEY, reasoning_model=True) as server:
        error = generate_error(make_backend(server), chat())

        assert not error.retryable
        assert "HTTP 400" in str(error)
        assert "max_completion_tokens" in str(error)
        assert len(server.requests) == 1


# Retries -------------------------------------------------------------------


def test_rate_limited_call_waits_for_retry_after_then_succeeds(server):
    server.add_faults(Fault.rate_limited(retry_after=1))

    (generation,) = generate(make_backend(server), chat())

    assert generation.text == "sample 0 seed None"
    first, second = server.requests
    assert second.received_at - first.received_at >= 1.0


def test_retry_after_ms_header_wins_over_retry_after(server):
    server.add_faults(Fault.rate_limited(retry_after=4, retry_after_ms=300))

    generate(make_backend(server), chat())

    first, second = server.requests
    assert 0.3 <= second.received_at - first.received_at < 2.0


def test_unavailable_server_is_retried_until_it_recovers(server):
    server.add_faults(Fault.unavailable(), Fault.unavailable(retry_after=0))

    (generation,) = generate(make_backend(server), chat())

    assert generation.text == "sample 0 seed None"
    assert len(server.requests) == 3


def test_server_errors_on_every_attempt_raise_backend_unavailable(server):
    server.add_faults(*[Fault.server_error()] * 3)

    error = generate_error(make_backend(server), chat())

    assert isinstance(error, BackendUnavailable)
    assert "HTTP 500" in str(error)
    assert len(server.requests) == FAST_RETRY.max_attempts


def test_slow_server_is_retried_then_raises_backend_timeout(server):
    server.add_faults(*[Fault.slow(1.0)] * 3)
    started = time.monotonic()

    error = generate_error(make_backend(server, timeout=0.3), chat())

    assert isinstance(error, BackendTimeout)
    assert len(server.requests) == FAST_RETRY.max_attempts
    assert time.monotonic() - started < 2.5


def test_a_body_that_is_not_json_once_is_retried(server):
    server.add_faults(Fault.not_json())

    generations = generate(make_backend(server), chat())

    assert generations
    assert len(server.requests) == 2


def test_a_body_that_is_never_json_raises_malformed_response_after_the_retries(server):
    server.add_faults(*[Fault.not_json()] * FAST_RETRY.max_attempts)

    error = generate_error(make_backend(server), chat())

    assert isinstance(error, MalformedResponse)
    assert len(server.requests) == FAST_RETRY.max_attempts


def test_body_without_choices_raises_malformed_response(server):
    server.add_faults(*[Fault.schema_breaking()] * FAST_RETRY.max_attempts)

    error = generate_error(make_backend(server), chat())

    assert isinstance(error, MalformedResponse)
    assert "choices" in str(error)


def test_wrong_number_of_choices_raises_malformed_response():
    def one_choice_only(_request):
        return [completion_from_text("only one")]

    with OpenAIServer(api_key=API_KEY, responder=one_choice_only) as server:
        error = generate_error(make_backend(server), chat(n=3))

    assert isinstance(error, MalformedResponse)
    assert "1 choices where 3" in str(error)


def test_invalid_key_raises_non_retryable_error_that_does_not_reveal_the_key(server):
    wrong_key = "sk-wrong-9d8c7b6a5e4f3a2b"
    backend = make_backend(server, api_key=wrong_key)

    error = generate_error(backend, chat())

    assert type(error) is BackendError
    assert not error.retryable
    assert "HTTP 401" in str(error)
    assert "Incorrect API key provided" in str(error)
    for text in (str(error), repr(error), repr(backend), repr(backend.ref)):
        assert wrong_key not in text
    assert len(server.requests) == 1


# Concurrency -------------------------------------------------------------------


def test_concurrent_calls_stay_within_max_concurrency():
    with OpenAIServer(api_key=API_KEY, latency=0.15) as server:
        backend = make_backend(server, max_concurrency=3)

        async def run() -> list[list[Generation]]:
            try:
                return await backend.generate_many([chat(seed=seed) for seed in range(10)])
            finally:
                await backend.aclose()

        results = asyncio.run(run())

        assert [result[0].text for result in results] == [f"sample 0 seed {s}" for s in range(10)]
        assert len(server.requests) == 10
        assert server.max_in_flight == 3


def test_a_failed_request_among_concurrent_ones_fails_alone():
    with OpenAIServer(api_key=API_KEY, latency=0.05) as server:
        server.add_faults(Fault.server_error())
        backend = make_backend(server, retry=RetryPolicy(max_attempts=1), max_concurrency=1)

        async def run():
            try:
                return await backend.generate_each([chat(seed=seed) for seed in range(4)])
            finally:
                await backend.aclose()

        results = asyncio.run(run())

    assert isinstance(results[0], BackendError) and "500" in str(results[0])
    assert [r[0].text for r in results[1:]] == [f"sample 0 seed {s}" for s in (1, 2, 3)]


def test_calls_beyond_the_sdks_keep_alive_pool_reuse_one_connection_each():
    # The openai SDK's pool keeps 100 connections alive: 128 calls at once closed and
    # reopened some of them for every round. The backend keeps one per call in flight.
    with OpenAIServer(api_key=API_KEY, latency=0.05) as server:
        backend = make_backend(server, max_concurrency=128)

        async def run() -> None:
            try:
                for round_ in range(3):
                    await backend.generate_many(
                        [chat(seed=round_ * 128 + seed) for seed in range(128)]
                    )
            finally:
                await backend.aclose()

        asyncio.run(run())

        assert len(server.requests) == 3 * 128
        assert server.max_in_flight > 100
        assert server.connections <= 128


# Wire format and errors -------------------------------------------------------------


def test_chat_body_is_what_the_sdk_sends_and_nothing_more():
    with OpenAIServer(api_key=API_KEY, accepts_top_k=True) as server:
        params = {"n": 2, "temperature": 0.6, "top_p": 0.9, "seed": 11, "top_logprobs": 5}
        generate(
            make_backend(server, max_tokens_param="max_completion_tokens"),
            chat(**params, top_k=20, max_new_tokens=64, stop=("END",)),
        )

    (sent,) = server.requests
    assert sent.body == {
        "model": server.model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."},
        ],
        "n": 2,
        "temperature": 0.6,
        "top_p": 0.9,
        "seed": 11,
        "stop": ["END"],
        "logprobs": True,
        "top_logprobs": 5,
        "top_k": 20,
        "max_completion_tokens": 64,
    }
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"


def test_a_server_without_authentication_gets_the_placeholder_bearer_token():
    with OpenAIServer() as server:
        generate(make_backend(server, api_key=None), chat())

    assert server.requests[0].headers["authorization"] == "Bearer EMPTY"


def test_an_error_body_that_holds_no_error_object_is_named_in_the_retryable_error(server):
    server.add_faults(Fault.raw(502, "upstream connect error"))
    backend = make_backend(server, retry=RetryPolicy(max_attempts=1))

    error = generate_error(backend, chat())

    assert isinstance(error, BackendUnavailable) and error.retryable
    assert "HTTP 502" in str(error) and "upstream connect error" in str(error)


def test_a_spent_quota_is_not_retried_although_it_is_a_429(server):
    quota = {
        "error": {
            "message": "You exceeded your current quota.",
            "type": "insufficient_quota",
            "code": "insufficient_quota",
        }
    }
    server.add_faults(Fault.raw(429, quota))

    error = generate_error(make_backend(server), chat())

    assert not error.retryable
    assert "HTTP 429" in str(error) and "You exceeded your current quota." in str(error)
    assert len(server.requests) == 1


# Health and identity --------------------------------------------------------------


def test_check_passes_against_a_live_server(server):
    check(make_backend(server))

    assert server.requests[0].path == "/v1/models"


def test_check_raises_unavailable_for_a_dead_port():
    backend = OpenAIBackend(
        "test-model", base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=API_KEY
    )

    with pytest.raises(BackendUnavailable, match="cannot reach"):
        check(backend)


def test_check_rejects_a_server_that_does_not_serve_the_model(server):
    backend = OpenAIBackend("other-model", base_url=server.base_url, api_key=API_KEY)

    with pytest.raises(BackendError, match="does not serve the model") as caught:
        check(backend)

    assert not caught.value.retryable


def test_ref_names_the_endpoint_without_credentials():
    backend = OpenAIBackend(
        "gpt-test", base_url="https://user:secret@llm.example:8443/v1/?api-key=secret", api_key="x"
    )

    assert backend.ref.backend == "openai"
    assert backend.ref.model == "gpt-test"
    assert backend.ref.endpoint == "https://llm.example:8443/v1"
    asyncio.run(backend.aclose())
