"""The interface every model backend implements, and the errors it raises."""

from __future__ import annotations

import abc
import asyncio

from unsafechain.domain.types import Generation, GenerationRequest, ModelRef


class BackendError(Exception):
    """A backend call failed.

    Attributes:
        retryable: Whether the same call may succeed if tried again.
        retry_after: Seconds the server asked us to wait before retrying, if it said.
    """

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class BackendTimeout(BackendError):
    """The backend did not answer within the timeout."""

    def __init__(self, message: str):
        super().__init__(message, retryable=True)


class BackendUnavailable(BackendError):
    """The backend is overloaded, rate limited or unreachable; retrying may help."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message, retryable=True, retry_after=retry_after)


class BackendRejected(BackendError):
    """The service refused the request as invalid (gRPC INVALID_ARGUMENT); the same
    request is refused again, so it is never retried."""


class MalformedResponse(BackendError):
    """The backend answered with a body that does not follow its API.

    Retryable: a truncated or garbled body from a proxy or an overloaded server is
    usually a one-off, and the retry policy bounds the tries.
    """

    def __init__(self, message: str):
        super().__init__(message, retryable=True)


class ModelBackend(abc.ABC):
    """A model that turns requests into completions.

    Generation, judging and correction all reach their models through this one
    interface, so any engine can run on local transformers, an OpenAI-compatible
    server or TGI.
    """

    @property
    @abc.abstractmethod
    def ref(self) -> ModelRef:
        """Which model this backend reaches; recorded in provenance."""

    @property
    def has_chat_template(self) -> bool:
        """Whether the backend renders conversations with the model's own chat template."""
        return True

    @property
    def adds_bos(self) -> bool:
        """Whether the model is given a BOS token that a raw prompt does not hold.

        A raw prompt (``GenerationRequest.prompt``) is the whole text the model sees,
        special tokens included, as the model's chat template writes them: a backend
        sends it so that nothing is added (the default). Where the server encodes raw
        text with the tokenizer's special tokens whatever it is sent (TGI's generate
        route), this is True, and a raw prompt must leave its BOS out, or the model
        sees two.
        """
        return False

    @property
    def prefers_rendered_prompts(self) -> bool:
        """Whether raw prompts are the backend's native input and conversations a
        second route (TGI: its generate route, and the Messages API). A caller that can
        render its model's published prompt itself (the Llama Guard judge) then sends
        that rather than a conversation."""
        return False

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> list[Generation]:
        """Sample ``request.params.n`` completions.

        Raises:
            BackendError: The call failed after the backend's own retries.
        """

    async def generate_each(
        self, requests: list[GenerationRequest]
    ) -> list[list[Generation] | BackendError]:
        """Run several requests concurrently, each on its own: a request that fails gets
        its error in its place and the others their generations (a backend bounds its
        own concurrency). Backends that batch requests override this."""
        tasks = [asyncio.ensure_future(self.generate(request)) for request in requests]
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        results: list[list[Generation] | BackendError] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, BackendError):
                raise outcome  # a bug, not a failed call
            results.append(outcome)
        return results

    async def generate_many(self, requests: list[GenerationRequest]) -> list[list[Generation]]:
        """Run several requests, all or nothing.

        Raises:
            BackendError: The first request that failed, after every one has ended.
        """
        results = await self.generate_each(requests)
        for result in results:
            if isinstance(result, BackendError):
                raise result
        return [result for result in results if not isinstance(result, BackendError)]

    async def check(self) -> None:
        """Raise :class:`BackendError` when the backend cannot serve requests."""

    async def aclose(self) -> None:
        """Release connections, threads and memory."""
