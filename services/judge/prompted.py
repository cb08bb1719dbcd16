"""Judges that ask a general model a question from a prompt template and parse its
answer: the shared request and error handling of the rubric and refusal judges."""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path

from unsafechain.services.core.backends.base import BackendError, ModelBackend
from unsafechain.services.core.templates import bundled_templates, load_template
from unsafechain.services.core.types import (
    GenerationRequest,
    JudgeIdentity,
    Message,
    Role,
    SamplingParams,
    Verdict,
    VerdictLabel,
)
from unsafechain.services.judge.engine import Judge, JudgeItem

logger = logging.getLogger(__name__)


def bundled_judge_template(name: str) -> Traversable:
    """A prompt template shipped with the judge package."""
    return bundled_templates("unsafechain.services.judge") / name


class PromptedJudge(Judge):
    """A judge that renders ``prompt`` and ``response`` into a template, sends it as one
    user message with greedy decoding and parses the model's answer.

    Args:
        backend: The judging model, usually an OpenAI-compatible API.
        name: Configured name, recorded on verdicts.
        template: Jinja template file receiving ``prompt`` and ``response``.
        max_new_tokens: Room for the model's reasoning and its answer.
    """

    kind: str

    def __init__(
        self,
        backend: ModelBackend,
        *,
        name: str,
        template: Path | Traversable,
        max_new_tokens: int,
    ):
        self._backend = backend
        self._template = load_template(template)
        self._params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
        self._identity = JudgeIdentity(name=name, kind=self.kind, model=backend.ref)

    @property
    def identity(self) -> JudgeIdentity:
        return self._identity

    def request(self, item: JudgeItem) -> GenerationRequest:
        """The model request that judges ``item``."""
        text = self._template.render(prompt=item.prompt, response=item.text).strip()
        return GenerationRequest(messages=(Message(Role.USER, text),), params=self._params)

    async def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        if not items:
            return []
        try:
            outputs = await self._backend.generate_many([self.request(item) for item in items])
        except BackendError as error:
            logger.warning("judge %s unreachable: %s", self._identity.name, error)
            return [self.error(item, f"judge backend failed: {error}") for item in items]
        return [
            self.verdict(item, generations[0].text)
            for item, generations in zip(items, outputs, strict=True)
        ]

    @abc.abstractmethod
    def verdict(self, item: JudgeItem, raw: str) -> Verdict:
        """The verdict the model's answer ``raw`` on ``item`` gives."""

    def error(self, item: JudgeItem, reason: str, raw: str = "") -> Verdict:
        """An ``ERROR`` verdict on ``item`` saying why."""
        return Verdict(
            self._identity, item.target, VerdictLabel.ERROR, raw_output=raw, error=reason
        )

    async def check(self) -> None:
        await self._backend.check()
