"""The generation engine: K completions of a prompt, split into reasoning and answer."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from unsafechain.backends.base import ModelBackend
from unsafechain.domain.reasoning import ReasoningSplit, split_reasoning
from unsafechain.domain.types import GenerationRequest, Message, Role, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SampledCompletion:
    """One of the K completions.

    Attributes:
        index: Position among the K samples, from 0.
        text: The text exactly as generated.
        split: The text split at its think tags.
        finish_reason: Why generation stopped, as the backend said.
    """

    index: int
    text: str
    split: ReasoningSplit
    finish_reason: str


class GenerationEngine:
    """Samples K completions per prompt from the reasoning model under study.

    R1-distill models are used without a system prompt and with their own chat
    template, so ``system_prompt`` is empty by default.

    Args:
        backend: Where the model runs.
        params: Sampling settings; ``params.n`` is K.
        system_prompt: Optional system turn placed before the prompt.
    """

    def __init__(self, backend: ModelBackend, params: SamplingParams, *, system_prompt: str = ""):
        self._backend = backend
        self._params = params
        self._system_prompt = system_prompt

    @property
    def backend(self) -> ModelBackend:
        """The generator model's backend."""
        return self._backend

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
            BackendError: The backend failed after its retries.
        """
        params = self._params if seed is None else dataclasses.replace(self._params, seed=seed)
        request = GenerationRequest(messages=messages or self.messages(prompt), params=params)
        generations = await self._backend.generate(request)
        return [
            SampledCompletion(index, g.text, split_reasoning(g.text), g.finish_reason or "")
            for index, g in enumerate(generations)
        ]
