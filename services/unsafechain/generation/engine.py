"""The generation engine: K completions of a prompt, split into reasoning and answer.

:class:`Generator` is what the stages call; :class:`GenerationEngine` runs it in this
process over a model backend, and the generation service's client
(:class:`~unsafechain.generation.client.RemoteGenerationEngine`) runs it remotely.
"""

from __future__ import annotations

import abc
import dataclasses
import logging

from unsafechain.backends.base import ModelBackend
from unsafechain.domain.reasoning import split_reasoning
from unsafechain.domain.types import (
    Generation,
    GenerationRequest,
    Message,
    ModelRef,
    Role,
    SampledCompletion,
    SamplingParams,
)

logger = logging.getLogger(__name__)


class Generator(abc.ABC):
    """Samples K completions per prompt, in process or through a generation service.

    Args:
        params: Sampling settings; ``params.n`` is K.
        system_prompt: Optional system turn placed before the prompt.
        prompt_opens_think: Whether the chat template ends the prompt inside an open
            think section; None takes what the backend says of each rendered prompt
            (not opened when it cannot say).
    """

    def __init__(
        self,
        params: SamplingParams,
        *,
        system_prompt: str = "",
        prompt_opens_think: bool | None = None,
    ):
        self._params = params
        self._system_prompt = system_prompt
        self._prompt_opens_think = prompt_opens_think

    @property
    def params(self) -> SamplingParams:
        """Sampling settings; ``n`` is K."""
        return self._params

    def messages(self, prompt: str) -> tuple[Message, ...]:
        """The conversation the model is given for ``prompt``."""
        system = (Message(Role.SYSTEM, self._system_prompt),) if self._system_prompt else ()
        return (*system, Message(Role.USER, prompt))

    async def generate(
        self, prompt: str, *, seed: int | None = None, messages: tuple[Message, ...] | None = None
    ) -> list[SampledCompletion]:
        """Sample K completions of ``prompt`` (or of ``messages`` when given).

        Raises:
            BackendError: The model failed after its retries.
        """
        params = self._params if seed is None else dataclasses.replace(self._params, seed=seed)
        request = GenerationRequest(messages=messages or self.messages(prompt), params=params)
        generations = await self.sample(request)
        return [
            SampledCompletion(
                index,
                g.text,
                split_reasoning(g.text, opened=self.opens_think(g)),
                g.finish_reason or "",
            )
            for index, g in enumerate(generations)
        ]

    def opens_think(self, generation: Generation) -> bool:
        """Whether ``generation`` starts inside the think section: as configured, else
        as the backend saw the rendered prompt."""
        if self._prompt_opens_think is not None:
            return self._prompt_opens_think
        return bool(generation.prompt_opens_think)

    @abc.abstractmethod
    async def sample(self, request: GenerationRequest) -> list[Generation]:
        """The model's generations for one request."""

    @abc.abstractmethod
    async def describe(self) -> ModelRef:
        """The model that generates, as provenance records it."""

    async def check(self) -> None:
        """Raise when the model cannot serve requests."""

    async def aclose(self) -> None:
        """Release what the engine holds of its own (not a shared backend)."""


class GenerationEngine(Generator):
    """Samples K completions per prompt from the reasoning model, in this process.

    R1-distill models are used without a system prompt and with their own chat
    template, so ``system_prompt`` is empty by default.

    Args:
        backend: Where the model runs.
        params: Sampling settings; ``params.n`` is K.
        system_prompt: Optional system turn placed before the prompt.
        prompt_opens_think: See :class:`Generator`.
    """

    def __init__(
        self,
        backend: ModelBackend,
        params: SamplingParams,
        *,
        system_prompt: str = "",
        prompt_opens_think: bool | None = None,
    ):
        super().__init__(params, system_prompt=system_prompt, prompt_opens_think=prompt_opens_think)
        self._backend = backend

    @property
    def prompt_opens_think(self) -> bool | None:
        """The configured answer to whether prompts open a think section, if any."""
        return self._prompt_opens_think

    @property
    def backend(self) -> ModelBackend:
        """The generator model's backend."""
        return self._backend

    async def sample(self, request: GenerationRequest) -> list[Generation]:
        return await self._backend.generate(request)

    async def describe(self) -> ModelRef:
        return self._backend.ref

    async def check(self) -> None:
        await self._backend.check()
