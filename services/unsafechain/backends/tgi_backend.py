"""Model backend for Hugging Face text-generation-inference (TGI), through its native API.

Raw prompts go to TGI's ``/generate`` route, conversations to its Messages API (which
applies the model's chat template), both through
:class:`huggingface_hub.AsyncInferenceClient`. TGI samples one completion per request,
so ``n`` completions are ``n`` concurrent requests with consecutive seeds.

TGI encodes the generate route's ``inputs`` with the tokenizer's special tokens, so a
Llama model gets its BOS from the server: raw prompts sent here leave it out
(:attr:`TGIBackend.adds_bos`). Both routes give at most ``--max-top-n-tokens``
alternatives per token (5 unless the server is started with more) and refuse a request
for more with HTTP 422. The Messages API has no ``top_k``: a conversation sampled with
one is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterator

import httpx2
import pydantic
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import (
    GenerationError,
    HfHubHTTPError,
    IncompleteGenerationError,
    OfflineModeIsEnabled,
    OverloadedError,
    TextGenerationError,
)

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
    gather_all,
    parse_chat_completion,
    public_endpoint,
    redact,
    validate_body,
)
from unsafechain.backends.retry import RetryPolicy
from unsafechain.domain.types import (
    Generation,
    GenerationRequest,
    Message,
    ModelRef,
    SamplingParams,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

# TGI reports these as failures of the generation itself (a shard ran out of memory,
# a stream broke off), which a second try may well get past, whatever the status.
_TRANSIENT_GENERATION_ERRORS = (GenerationError, IncompleteGenerationError, OverloadedError)


class _Token(pydantic.BaseModel):
    text: str
    logprob: float


class _Details(pydantic.BaseModel):
    finish_reason: str
    tokens: list[_Token]
    top_tokens: list[list[_Token]] | None = None


class _GenerateOutput(pydantic.BaseModel):
    """The parts of TGI's generate answer we use."""

    generated_text: str
    details: _Details


class TGIBackend(ModelBackend):
    """A model served by TGI.

    Args:
        model: The model id, recorded in provenance and sent as the Messages API's
            ``model`` field (TGI serves one model and ignores it).
        base_url: The TGI server root, e.g. ``http://tgi:8080``.
        api_key: The bearer token, ``None`` for a server without authentication. It is
            never logged nor put into errors or ``repr``.
        timeout: Seconds one HTTP call may take.
        max_concurrency: Most calls in flight at once (each call samples one completion).
        retry: How retryable failures are retried; ``None`` takes
            :class:`RetryPolicy`'s defaults.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_concurrency: int = 16,
        retry: RetryPolicy | None = None,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._ref = ModelRef(backend="tgi", model=model, endpoint=public_endpoint(base_url))
        self._where = f"{model} at {self._ref.endpoint}"
        self._api_key = api_key
        self._timeout = timeout
        self._calls = BoundedCalls(max_concurrency, retry or RetryPolicy())
        # The client would post raw prompts to the server root, TGI's compat route.
        self._generate_url = f"{base_url.rstrip('/')}/generate"
        # The "hf-inference" provider is what the client picks for a URL anyway; naming
        # it enables health_check(), which refuses to run for any other provider.
        self._client = AsyncInferenceClient(
            base_url=base_url.rstrip("/"), token=api_key, timeout=timeout, provider="hf-inference"
        )

    def __repr__(self) -> str:
        return f"TGIBackend(model={self._ref.model!r}, endpoint={self._ref.endpoint!r})"

    @property
    def ref(self) -> ModelRef:
        """The model and the endpoint without credentials."""
        return self._ref

    @property
    def adds_bos(self) -> bool:
        """True: TGI puts the model's BOS before the ``inputs`` of its generate route."""
        return True

    @property
    def prefers_rendered_prompts(self) -> bool:
        """True: the generate route is TGI's own; the Messages API renders the chat
        template on the server, with its own Jinja implementation."""
        return True

    async def generate(self, request: GenerationRequest) -> list[Generation]:
        """Sample ``request.params.n`` completions, one TGI request each.

        With a seed, completion ``i`` uses ``seed + i``, so the set is reproducible
        while its members differ.

        Raises:
            BackendTimeout: TGI did not answer in time, on every attempt.
            BackendUnavailable: TGI was unreachable or overloaded, on every attempt.
            MalformedResponse: The answer does not follow TGI's API.
            BackendError: TGI rejected the request (bad key, invalid parameters).
        """
        params = request.params
        seeds = [None if params.seed is None else params.seed + index for index in range(params.n)]
        if request.messages is not None:
            if params.sampled_top_k:
                # The Messages API has no top_k field and ignores one it is sent: the
                # completions would be sampled without the cut the settings ask for.
                raise BackendError(
                    f"{self._where}: TGI's Messages API takes no top_k; set top_k to 0 "
                    "(off), or reach TGI through a backend that renders the prompt"
                )
            messages = request.messages
            return await gather_all(
                self._calls.run(
                    functools.partial(self._chat, messages, params, seed),
                    description="TGI chat completion",
                )
                for seed in seeds
            )
        prompt = request.prompt or ""
        return await gather_all(
            self._calls.run(
                functools.partial(self._generate, prompt, params, seed),
                description="TGI generation",
            )
            for seed in seeds
        )

    async def check(self) -> None:
        """Ask TGI's ``/health`` route whether the model is loaded and serving.

        Raises:
            BackendUnavailable: TGI cannot be reached or reports itself unhealthy.
            BackendTimeout: ``/health`` did not answer in time.
        """
        with self._translate_errors():
            # health_check() sets no timeout of its own.
            async with asyncio.timeout(self._timeout):
                healthy = await self._client.health_check()
        if not healthy:
            raise BackendUnavailable(f"{self._where} reports that it is not healthy")
        logger.debug("%s is healthy", self._where)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()

    async def _generate(self, prompt: str, params: SamplingParams, seed: int | None) -> Generation:
        k = params.top_logprobs
        with self._translate_errors():
            output = await self._client.text_generation(
                prompt,
                model=self._generate_url,
                details=True,
                max_new_tokens=params.max_new_tokens,
                do_sample=not params.greedy,
                # TGI rejects temperature 0; greedy decoding is do_sample=False instead.
                temperature=None if params.greedy else params.temperature,
                top_p=_tgi_top_p(params),
                # TGI rejects top_k 0 and samples whenever one is sent: off is left out.
                top_k=params.sampled_top_k or None,
                top_n_tokens=k or None,
                seed=seed,
                stop=list(params.stop) or None,
            )
        generation = validate_body(
            _GenerateOutput, output, where=self._where, api="TGI generate API"
        )
        return Generation(
            text=generation.generated_text,
            finish_reason=generation.details.finish_reason,
            tokens=_tokens(generation.details, self._where) if k else None,
        )

    async def _chat(
        self, messages: tuple[Message, ...], params: SamplingParams, seed: int | None
    ) -> Generation:
        k = params.top_logprobs
        with self._translate_errors():
            output = await self._client.chat_completion(
                [message.as_dict() for message in messages],
                model=self._ref.model,
                max_tokens=params.max_new_tokens,
                # The Messages API reads temperature 0 as greedy, and an absent
                # temperature as "sample", so 0 has to be sent.
                temperature=params.temperature,
                top_p=_tgi_top_p(params),
                seed=seed,
                stop=list(params.stop) or None,
                logprobs=True if k else None,
                top_logprobs=k or None,
            )
        return parse_chat_completion(output, n=1, logprobs=k > 0, where=self._where)[0]

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        """Turn huggingface_hub's and httpx2's exceptions into backend errors."""
        try:
            yield
        # InferenceTimeoutError and asyncio's timeout both derive from TimeoutError.
        except TimeoutError as error:
            raise BackendTimeout(
                f"no answer from {self._where} within {self._timeout:g}s"
            ) from error
        except (HfHubHTTPError, TextGenerationError) as error:
            raise self._http_error(error) from error
        except httpx2.TransportError as error:
            reason = redact(str(error) or type(error).__name__, self._api_key)
            raise BackendUnavailable(f"cannot reach {self._where}: {reason}") from error
        except OfflineModeIsEnabled as error:
            raise BackendError(
                f"cannot reach {self._where}: huggingface_hub is in offline mode "
                "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set), which blocks every request "
                "its client makes, to local servers too"
            ) from error
        # The client parses the body inside the call: not JSON, or a JSON list where an
        # object belongs, surfaces as these.
        except (ValueError, LookupError) as error:
            raise MalformedResponse(
                f"{self._where} answered a body that does not follow TGI's API: {error}"
            ) from error

    def _http_error(self, error: HfHubHTTPError | TextGenerationError) -> BackendError:
        response = _failed_response(error)
        transient = True if isinstance(error, _TRANSIENT_GENERATION_ERRORS) else None
        if isinstance(error, TextGenerationError):
            # TGI's own error text, which huggingface_hub lifted out of the body.
            detail = str(error)
        else:
            detail = error.server_message or (response.text if response is not None else "")
        if response is None:
            message = f"{self._where} failed: {redact(detail, self._api_key)}"
            if transient:
                return BackendUnavailable(message)
            return BackendError(message)
        return error_for_status(
            response.status_code,
            response.headers,
            detail,
            where=self._where,
            secret=self._api_key,
            retryable=transient,
        )


def _failed_response(error: BaseException) -> httpx2.Response | None:
    """The HTTP response behind ``error``.

    huggingface_hub raises TGI's typed errors (overloaded, validation, …) *from* the
    HTTP error that holds the response, so the status and headers sit on the cause.
    """
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, HfHubHTTPError):
            return cause.response
        cause = cause.__cause__
    return None


def _tgi_top_p(params: SamplingParams) -> float | None:
    # TGI rejects top_p == 1.0 (it must be < 1); leaving it out means no nucleus cut.
    return None if params.greedy or params.top_p >= 1.0 else params.top_p


def _tokens(details: _Details, where: str) -> tuple[TokenLogprob, ...]:
    if details.top_tokens is None or len(details.top_tokens) != len(details.tokens):
        raise MalformedResponse(f"{where} answered no top tokens for every generated token")
    return tuple(
        TokenLogprob(
            token=token.text,
            logprob=token.logprob,
            top=tuple((alternative.text, alternative.logprob) for alternative in top),
        )
        for token, top in zip(details.tokens, details.top_tokens, strict=True)
    )
