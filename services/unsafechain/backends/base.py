"""The interface every model backend implements, and the errors it raises."""

from __future__ import annotations

import abc

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


class MalformedResponse(BackendError):
    """The backend answered with a body that does not follow its API."""


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

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> list[Generation]:
        """Sample ``request.params.n`` completions.

        Raises:
            BackendError: The call failed after the backend's own retries.
        """

    async def generate_many(self, requests: list[GenerationRequest]) -> list[list[Generation]]:
        """Run several requests; backends that can batch them override this."""
        return [await self.generate(request) for request in requests]

    async def check(self) -> None:
        """Raise :class:`BackendError` when the backend cannot serve requests."""

    async def aclose(self) -> None:
        """Release connections, threads and memory."""
