"""Judges that ask a general model a question from a prompt template and parse its
answer: the shared request and error handling of the rubric and refusal judges."""

from __future__ import annotations

import abc
import logging
from importlib.resources.abc import Traversable
from pathlib import Path

from unsafechain.backends.base import ModelBackend
from unsafechain.domain.templates import bundled_templates, load_template
from unsafechain.domain.types import (
    Generation,
    GenerationRequest,
    Message,
    Role,
    SamplingParams,
    Verdict,
)
from unsafechain.judge.engine import JudgeItem, ModelJudge

logger = logging.getLogger(__name__)


def bundled_judge_template(name: str) -> Traversable:
    """A prompt template shipped with the judge package."""
    return bundled_templates("unsafechain.judge") / name


class PromptedJudge(ModelJudge):
    """A judge that renders ``prompt`` and ``response`` into a template, sends it as one
    user message with greedy decoding and parses the model's answer.

    Args:
        backend: The judging model, usually an OpenAI-compatible API.
        name: Configured name, recorded on verdicts.
        template: Jinja template file receiving ``prompt`` and ``response``.
        max_new_tokens: Room for the model's reasoning and its answer.
    """

    def __init__(
        self,
        backend: ModelBackend,
        *,
        name: str,
        template: Path | Traversable,
        max_new_tokens: int,
    ):
        super().__init__(backend, name=name)
        self._template = load_template(template)
        self._params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)

    def request(self, item: JudgeItem) -> GenerationRequest:
        """The model request that judges ``item``."""
        text = self._template.render(prompt=item.prompt, response=item.text).strip()
        return GenerationRequest(messages=(Message(Role.USER, text),), params=self._params)

    def verdict(self, item: JudgeItem, generation: Generation) -> Verdict:
        return self.read(item, generation.text)

    @abc.abstractmethod
    def read(self, item: JudgeItem, raw: str) -> Verdict:
        """The verdict the model's answer ``raw`` on ``item`` gives."""
