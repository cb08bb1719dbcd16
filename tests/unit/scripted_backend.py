"""A backend that answers from a script, for unit tests of engine logic that must see
exact model outputs (an unparseable answer, a given log-probability). Integration
tests run the same engines on real tiny models."""

from __future__ import annotations

import math
from collections.abc import Callable

from unsafechain.backends.base import ModelBackend
from unsafechain.domain.types import Generation, GenerationRequest, ModelRef, TokenLogprob


def guard_generation(text: str, unsafe_probability: float | None = None) -> Generation:
    """A guard answer, with first-token log-probabilities when a probability is given."""
    if unsafe_probability is None:
        return Generation(text, "stop")
    first = text.split()[0]
    top = (
        ("unsafe", math.log(max(unsafe_probability, 1e-12))),
        ("safe", math.log(max(1 - unsafe_probability, 1e-12))),
    )
    return Generation(text, "stop", (TokenLogprob(first, dict(top)[first], top),))


class ScriptedBackend(ModelBackend):
    """Answers each request with ``respond(request)``; records every request."""

    def __init__(
        self,
        respond: Callable[[GenerationRequest], list[Generation]],
        *,
        chat_template: bool = True,
        adds_bos: bool = False,
        prefers_rendered_prompts: bool = False,
    ):
        self._respond = respond
        self._chat_template = chat_template
        self._adds_bos = adds_bos
        self._prefers_rendered_prompts = prefers_rendered_prompts
        self.requests: list[GenerationRequest] = []

    @property
    def ref(self) -> ModelRef:
        return ModelRef(backend="scripted", model="script")

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template

    @property
    def adds_bos(self) -> bool:
        return self._adds_bos

    @property
    def prefers_rendered_prompts(self) -> bool:
        return self._prefers_rendered_prompts

    async def generate(self, request: GenerationRequest) -> list[Generation]:
        self.requests.append(request)
        return self._respond(request)
