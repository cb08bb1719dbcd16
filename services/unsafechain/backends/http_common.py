"""What the HTTP backends share: bounded concurrent calls with retries, the mapping of
HTTP failures to backend errors, and the parsing of chat completion bodies, which
OpenAI-compatible servers and TGI's Messages API answer in the same shape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pydantic

from unsafechain.backends.base import (
    BackendError,
    BackendUnavailable,
    MalformedResponse,
)
from unsafechain.backends.retry import (
    RetryPolicy,
    call_with_retries,
    parse_retry_after,
)
from unsafechain.domain.reasoning import format_reasoning
from unsafechain.domain.types import (
    Generation,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
SchemaT = TypeVar("SchemaT", bound=pydantic.BaseModel)

# Request timeout, conflict and rate limiting are worth retrying, as are server errors.
_RETRYABLE_STATUSES = frozenset({408, 409, 429})

_DETAIL_LIMIT = 500


def public_endpoint(url: str) -> str:
    """``url`` without user info, query and fragment: safe to log and record."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` masked."""
    return text.replace(secret, "[redacted]") if secret else text


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait an HTTP response asks for, from ``retry-after-ms`` or ``Retry-After``.

    OpenAI sends the millisecond header next to the standard one; it is the more
    precise of the two, so it wins when both are present.
    """
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    detail: str,
    *,
    where: str,
    secret: str | None = None,
    retryable: bool | None = None,
) -> BackendError:
    """The backend error for an HTTP error response.

    408, 409, 429 and 5xx become :class:`BackendUnavailable` carrying the response's
    ``Retry-After``; other statuses are not retryable.

    Args:
        status: The HTTP status code.
        headers: The response headers (case-insensitive mapping).
        detail: The server's error message.
        where: Which model and endpoint failed, for the message.
        secret: The API key, masked wherever the server echoed it.
        retryable: Overrides the decision by status, for protocols whose error body
            says more than the status does.
    """
    detail = redact(detail.strip(), secret)[:_DETAIL_LIMIT] or "(no error message)"
    message = f"HTTP {status} from {where}: {detail}"
    if retryable is None:
        retryable = status in _RETRYABLE_STATUSES or status >= 500
    if retryable:
        return BackendUnavailable(message, retry_after=retry_after_seconds(headers))
    return BackendError(message)


class BoundedCalls:
    """Runs backend calls with a bound on those in flight, retrying within a policy.

    Args:
        max_concurrency: Most calls in flight at once.
        retry: How failed calls are retried.
    """

    def __init__(self, max_concurrency: int, retry: RetryPolicy):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._retry = retry

    async def run(self, call: Callable[[], Awaitable[T]], *, description: str) -> T:
        """Await ``call()`` within the concurrency bound, retried by the policy.

        Raises:
            BackendError: The last error once it is not retryable or tries ran out.
        """

        async def limited() -> T:
            # The slot is held per attempt, not across backoff sleeps, so a call that
            # waits out a Retry-After does not keep other calls from running.
            async with self._semaphore:
                return await call()

        return await call_with_retries(limited, self._retry, description=description)


async def gather_all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await ``calls`` concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def validate_body(schema: type[SchemaT], body: object, *, where: str, api: str) -> SchemaT:
    """Validate a response body (JSON bytes, or an object the client parsed) against ``schema``.

    Raises:
        MalformedResponse: The body is not JSON or does not have the fields we use.
    """
    try:
        if isinstance(body, bytes | str):
            return schema.model_validate_json(body)
        return schema.model_validate(body, from_attributes=True)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc'])) or 'body'}: {problem['msg']}"
            for problem in error.errors(include_url=False, include_input=False)[:3]
        )
        raise MalformedResponse(
            f"{where} answered a body that does not follow the {api}: {problems}"
        ) from error


class _TopLogprob(pydantic.BaseModel):
    token: str
    logprob: float


class _ChatTokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob] | None = None


class _ChatLogprobs(pydantic.BaseModel):
    content: list[_ChatTokenLogprob] | None = None


class _ChatMessage(pydantic.BaseModel):
    content: str | None = None
    # vLLM and SGLang started with a reasoning parser return the think section apart
    # from the answer, under either name depending on the version.
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        """The completion as the model wrote it: think section first, when split off."""
        # Content is null only where the model called a tool, which we never offer.
        answer = self.content or ""
        reasoning = self.reasoning_content or self.reasoning
        return format_reasoning(reasoning.strip(), answer.strip()) if reasoning else answer


class _ChatChoice(pydantic.BaseModel):
    index: int = 0
    message: _ChatMessage
    finish_reason: str | None = None
    logprobs: _ChatLogprobs | None = None


class _ChatCompletion(pydantic.BaseModel):
    """The parts of a chat completion body we use; other fields may be anything."""

    choices: list[_ChatChoice]


def parse_chat_completion(body: object, *, n: int, logprobs: bool, where: str) -> list[Generation]:
    """Turn a chat completion body (OpenAI's shape) into ``n`` generations.

    Args:
        body: The JSON bytes, or the object a client parsed them into.
        n: The number of choices asked for.
        logprobs: Whether log-probabilities were asked for; they must then be present.
        where: Which model and endpoint answered, for error messages.

    Raises:
        MalformedResponse: The body breaks the API or has the wrong number of choices.
    """
    completion = validate_body(_ChatCompletion, body, where=where, api="chat completions API")
    choices = sorted_choices(completion.choices, n, where)
    return [
        Generation(
            text=choice.message.text(),
            finish_reason=choice.finish_reason,
            tokens=_chat_tokens(choice, where) if logprobs else None,
        )
        for choice in choices
    ]


def sorted_choices(choices: list[Any], n: int, where: str) -> list[Any]:
    """The ``n`` choices in index order.

    Raises:
        MalformedResponse: The server answered a different number of choices.
    """
    if len(choices) != n:
        raise MalformedResponse(f"{where} answered {len(choices)} choices where {n} were asked for")
    return sorted(choices, key=lambda choice: choice.index)


def _chat_tokens(choice: _ChatChoice, where: str) -> tuple[TokenLogprob, ...]:
    if choice.logprobs is None or choice.logprobs.content is None:
        raise MalformedResponse(f"{where} answered no logprobs although they were asked for")
    return tuple(
        TokenLogprob(
            token=entry.token,
            logprob=entry.logprob,
            top=tuple((top.token, top.logprob) for top in entry.top_logprobs or ()),
        )
        for entry in choice.logprobs.content
    )


# ---------------------------------------------------------------------------
# The legacy completions API (raw prompts) and the model list
# ---------------------------------------------------------------------------
