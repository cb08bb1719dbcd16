"""Model backend for any OpenAI-compatible server: OpenAI, vLLM, SGLang, TGI's Messages API."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
import pydantic

from unsafechain.backends.base import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    MalformedResponse,
    ModelBackend,
)
from unsafechain.backends.http_common import (
    BoundedCalls,
    error_for_status,
    parse_chat_completion,
    public_endpoint,
    redact,
    sorted_choices,
    validate_body,
)
from unsafechain.backends.retry import (
    RetryPolicy,
)
from unsafechain.domain.types import (
    Generation,
    GenerationRequest,
    Message,
    ModelRef,
    SamplingParams,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
SchemaT = TypeVar("SchemaT", bound=pydantic.BaseModel)

OPENAI_BASE_URL = "https://api.openai.com/v1"

# Servers started without authentication (vLLM, SGLang, TGI) ignore the bearer token.
# Where there is no key this placeholder goes, as the openai SDK sent it when this
# backend used the SDK: such servers see the requests they saw then.
_NO_API_KEY = "EMPTY"

_ACCEPT_JSON = {"Accept": "application/json"}
_JSON_BODY = {"Content-Type": "application/json"}

# Request timeout, conflict and rate limiting are worth retrying, as are server errors.
_RETRYABLE_STATUSES = frozenset({408, 409, 429})

_DETAIL_LIMIT = 500


class _CompletionLogprobs(pydantic.BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float] | None] | None = None


class _CompletionChoice(pydantic.BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: _CompletionLogprobs | None = None


class _Completion(pydantic.BaseModel):
    choices: list[_CompletionChoice]


class _ModelEntry(pydantic.BaseModel):
    id: str


class _ModelList(pydantic.BaseModel):
    data: list[_ModelEntry]


def _completion_tokens(choice: _CompletionChoice, where: str) -> tuple[TokenLogprob, ...]:
    logprobs = choice.logprobs
    if logprobs is None:
        raise MalformedResponse(f"{where} answered no logprobs although they were asked for")
    tops = logprobs.top_logprobs or [None] * len(logprobs.tokens)
    if not len(logprobs.tokens) == len(logprobs.token_logprobs) == len(tops):
        raise MalformedResponse(f"{where} answered logprob lists of different lengths")
    return tuple(
        TokenLogprob(
            token=token,
            logprob=logprob,
            # The legacy API gives alternatives as an unordered mapping; order them
            # best first like the chat API does.
            top=tuple(sorted((top or {}).items(), key=lambda item: item[1], reverse=True)),
        )
        for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, tops, strict=True)
    )


def _top_k_body(params: SamplingParams) -> dict[str, int] | None:
    """``top_k`` as an extra body field, only when it is on: vLLM and SGLang take it,
    the OpenAI API itself has no such parameter and rejects it."""
    top_k = params.sampled_top_k
    return {"top_k": top_k} if top_k else None


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY`` / ``HTTP_PROXY``,
    unless ``NO_PROXY`` covers its host), or None.

    Read once per session: aiohttp's ``trust_env`` reads the environment on every
    request, which cost about 0.5 ms of CPU per call (3.5–4 ms per case in
    ``bench/build_throughput.py``), a third of the build's CPU."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class OpenAIBackend(ModelBackend):
    """A model served behind the OpenAI API, spoken over one :class:`aiohttp.ClientSession`.

    Conversations go to ``/chat/completions``, where the server applies the model's
    chat template; raw prompts go to the legacy ``/completions`` endpoint with
    ``add_special_tokens: false``, so that a server that would encode them with the
    tokenizer's special tokens (vLLM does by default) adds no second BOS to a prompt
    that holds its own. OpenAI's own API adds none and does not take the field, so it
    is not sent there. A ``top_k`` that is on is sent as an extra body field, which vLLM
    and SGLang read; OpenAI itself rejects it, and TGI's Messages API ignores it (use the
    ``tgi`` backend, which refuses it instead).

    The requests are the JSON bodies the ``openai`` SDK would send for these calls, and
    its error bodies are read as it reads them (``error.message``, ``error.code``); the
    SDK itself is not used: a call through it costs about 3 ms of CPU (its request
    transforms, then httpx), one through httpx alone 1.5 ms, one through aiohttp 0.5 ms,
    and that CPU bounded a build's throughput (issue 15). The connection pool keeps a
    connection alive per call in flight (``max_concurrency``), so that concurrent calls
    reuse connections rather than open and close them. The session is opened on the
    first call, in the event loop the backend then lives on.

    Args:
        model: The model name the server knows.
        base_url: The API root including ``/v1``; ``None`` selects OpenAI itself.
        api_key: The bearer token, ``None`` for servers without authentication. It is
            never logged nor put into errors or ``repr``.
        timeout: Seconds one HTTP call may take, from connecting to the last byte.
        max_concurrency: Most calls in flight at once.
        retry: How retryable failures are retried; ``None`` takes
            :class:`RetryPolicy`'s defaults.
        max_tokens_param: The request field bounding the output: ``"max_tokens"``, or
            ``"max_completion_tokens"`` for OpenAI's reasoning models, which reject
            the former.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_concurrency: int = 16,
        retry: RetryPolicy | None = None,
        max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise ValueError(f"unknown max_tokens_param {max_tokens_param!r}")
        base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
        self._ref = ModelRef(backend="openai", model=model, endpoint=public_endpoint(base_url))
        self._where = f"{model} at {self._ref.endpoint}"
        self._api_key = api_key
        self._timeout = timeout
        self._max_tokens_param = max_tokens_param
        self._raw_prompt_options = (
            {} if base_url == OPENAI_BASE_URL else {"add_special_tokens": False}
        )
        self._urls = {
            route: f"{base_url}/{route}" for route in ("chat/completions", "completions", "models")
        }
        self._calls = BoundedCalls(max_concurrency, retry or RetryPolicy())
        # Retries are ours (call_with_retries), so that Retry-After, backoff and the
        # attempt budget behave the same for every backend.
        self._max_concurrency = max_concurrency
        self._headers = {"Authorization": f"Bearer {api_key or _NO_API_KEY}", **_ACCEPT_JSON}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self._ref.model!r}, endpoint={self._ref.endpoint!r})"

    @property
    def ref(self) -> ModelRef:
        """The model and the endpoint without credentials."""
        return self._ref

    async def generate(self, request: GenerationRequest) -> list[Generation]:
        """Sample ``request.params.n`` completions in one API call.

        Raises:
            BackendTimeout: The server did not answer in time, on every attempt.
            BackendUnavailable: The server was unreachable, overloaded or rate
                limited, on every attempt.
            MalformedResponse: The answer does not follow the API.
            BackendError: The server rejected the request (bad key, bad parameters).
        """
        if request.messages is not None:
            messages = request.messages
            return await self._calls.run(
                lambda: self._chat(messages, request.params), description="chat completion"
            )
        prompt = request.prompt or ""
        return await self._calls.run(
            lambda: self._complete(prompt, request.params), description="completion"
        )

    async def check(self) -> None:
        """List the server's models and make sure ours is among them.

        Raises:
            BackendUnavailable: The server cannot be reached or is failing.
            BackendError: The server does not serve the model, or rejects the key.
        """
        content = await self._send("GET", "models")
        served = validate_body(_ModelList, content, where=self._where, api="models API")
        names = sorted(entry.id for entry in served.data)
        if self._ref.model not in names:
            shown = ", ".join(names[:10]) + (", …" if len(names) > 10 else "")
            raise BackendError(
                f"{self._where}: the server does not serve the model (it serves {shown})"
            )
        logger.debug("%s is up", self._where)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _open_session(self) -> aiohttp.ClientSession:
        """The session of this backend, opened on first use (aiohttp binds a session to
        the running event loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                # No cap per host: the one host is bounded by max_concurrency.
                connector=aiohttp.TCPConnector(limit=self._max_concurrency, limit_per_host=0),
                # HTTP(S)_PROXY and NO_PROXY apply, as they did through the SDK (httpx),
                # read once here: aiohttp's trust_env reads them on every request.
                proxy=env_proxy(self._urls["models"]),
            )
        return self._session

    async def _chat(
        self, messages: tuple[Message, ...], params: SamplingParams
    ) -> list[Generation]:
        k, tokens = params.top_logprobs, params.max_new_tokens
        body: dict[str, Any] = {
            "model": self._ref.model,
            "messages": [message.as_dict() for message in messages],
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            self._max_tokens_param: tokens,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if k:
            body["logprobs"], body["top_logprobs"] = True, k
        body.update(_top_k_body(params) or {})
        content = await self._send("POST", "chat/completions", body)
        return parse_chat_completion(content, n=params.n, logprobs=k > 0, where=self._where)

    async def _complete(self, prompt: str, params: SamplingParams) -> list[Generation]:
        k = params.top_logprobs
        body: dict[str, Any] = {
            "model": self._ref.model,
            "prompt": prompt,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if k:
            body["logprobs"] = k
        body.update(self._raw_prompt_options)
        body.update(_top_k_body(params) or {})
        content = await self._send("POST", "completions", body)
        completion = validate_body(_Completion, content, where=self._where, api="completions API")
        return [
            Generation(
                text=choice.text,
                finish_reason=choice.finish_reason,
                tokens=_completion_tokens(choice, self._where) if k else None,
            )
            for choice in sorted_choices(completion.choices, params.n, self._where)
        ]

    async def _send(self, method: str, route: str, body: dict[str, Any] | None = None) -> bytes:
        """One HTTP exchange with ``route``: the body of a successful answer.

        Raises:
            BackendTimeout: No answer within the timeout.
            BackendUnavailable: The server cannot be reached, or answered a retryable
                status (408, 409, 429, 5xx), with its ``Retry-After``.
            BackendError: The server answered another error status.
        """
        content = json.dumps(body).encode() if body is not None else None
        try:
            async with self._open_session().request(
                method, self._urls[route], data=content, headers=_JSON_BODY if body else None
            ) as response:
                answer = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError as error:
            raise BackendTimeout(
                f"no answer from {self._where} within {self._timeout:g}s"
            ) from error
        except aiohttp.ClientError as error:
            reason = redact(str(error) or type(error).__name__, self._api_key)
            raise BackendUnavailable(f"cannot reach {self._where}: {reason}") from error
        if not 200 <= status < 300:
            raise self._status_error(status, headers, answer)
        return answer

    def _status_error(self, status: int, headers: Mapping[str, str], answer: bytes) -> BackendError:
        """The error an error status stands for, its message the server's own: the
        ``error.message`` of an OpenAI error body, or the body as it came."""
        text = answer.decode("utf-8", "replace").strip()
        try:
            body: object = json.loads(text)
        except ValueError:
            body = text
        error = body.get("error", body) if isinstance(body, dict) else body
        detail = error.get("message") if isinstance(error, dict) else None
        if not isinstance(detail, str):
            detail = str(error) if error is not None else ""
        code = error.get("code") if isinstance(error, dict) else None
        # OpenAI answers 429 also when the account's quota is spent; waiting does not help.
        retryable = False if code == "insufficient_quota" else None
        return error_for_status(
            status,
            headers,
            detail,
            where=self._where,
            secret=self._api_key,
            retryable=retryable,
        )
