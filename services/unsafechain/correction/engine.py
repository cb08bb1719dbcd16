"""The correction engine: rewrite an unsafe completion into a safe one in the same
``<think>`` format, re-judge it, retry within a bound."""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2

from unsafechain.backends.base import BackendError, ModelBackend
from unsafechain.correction.refusal_check import RefusalChecker
from unsafechain.domain.reasoning import (
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningSplit,
    split_reasoning,
)
from unsafechain.domain.settings import SetupError
from unsafechain.domain.templates import bundled_templates, load_template, read_template
from unsafechain.domain.types import (
    TRUNCATED,
    Attempt,
    CorrectionOutcome,
    CorrectorInfo,
    GenerationRequest,
    JudgeTarget,
    Message,
    ModelRef,
    RefusalCheckMode,
    Role,
    SamplingParams,
    VerdictLabel,
)
from unsafechain.judge.engine import CompletionJudge
from unsafechain.judge.llama_guard import CATEGORY_BY_CODE

logger = logging.getLogger(__name__)

# How an attempt whose corrector call failed is reported (a transient failure).
CORRECTOR_CALL_FAILED = "corrector call failed"


@dataclass(frozen=True, slots=True)
class CorrectionTemplates:
    """The correction prompt: a system text and a Jinja user template.

    The user template receives ``prompt``, ``response``, ``categories`` (codes with
    their names) and ``feedback`` (why the previous attempt was rejected, or empty).
    """

    system: str
    user: jinja2.Template

    @classmethod
    def load(cls, folder: Path | None = None) -> CorrectionTemplates:
        """Read ``system.md`` and ``user.md.j2`` from ``folder`` (default: bundled)."""
        root = folder or bundled_templates("unsafechain.correction")
        try:
            return cls(
                read_template(root / "system.md").strip(), load_template(root / "user.md.j2")
            )
        except SetupError as error:
            raise SetupError(f"correction.templates: {error}") from error

    def messages(
        self, prompt: str, response: str, categories: Sequence[str], feedback: str = ""
    ) -> tuple[Message, ...]:
        """The conversation sent to the corrector."""
        named = [
            f"{code} ({CATEGORY_BY_CODE[code].name})" if code in CATEGORY_BY_CODE else code
            for code in categories
        ]
        user = self.user.render(
            prompt=prompt, response=response, categories=named, feedback=feedback
        )
        return (Message(Role.SYSTEM, self.system), Message(Role.USER, user.strip()))


class Corrector(abc.ABC):
    """Corrects unsafe completions, every attempt re-judged: in process
    (:class:`CorrectionEngine`) or through a correction service
    (:class:`~unsafechain.correction.client.RemoteCorrectionEngine`)."""

    @abc.abstractmethod
    async def correct(
        self,
        prompt: str,
        completion: str,
        categories: Sequence[str],
        *,
        seed: int | None = None,
        targets: Sequence[JudgeTarget] | None = None,
    ) -> CorrectionOutcome:
        """Correct one unsafe ``completion`` of ``prompt``; attempt n is seeded
        ``seed + n - 1``; every attempt is re-judged on ``targets`` (None: the
        re-judging judges' own)."""

    @abc.abstractmethod
    async def describe(self) -> CorrectorInfo:
        """The corrector, its sampling, its bound and its re-judging judges."""

    async def check(self) -> None:
        """Raise when the corrector or its judges cannot serve requests."""

    async def aclose(self) -> None:
        """Release what the engine holds of its own (not shared backends)."""


class CorrectionEngine(Corrector):
    """Corrects unsafe completions through a strong model, re-judging each attempt.

    Args:
        backend: The corrector model (an OpenAI-compatible API in the paper).
        judge: Re-judges every attempt; only a ``SAFE`` label passes.
        params: Sampling settings for the corrector (one sample per attempt).
        max_attempts: Bound on tries per unsafe completion.
        templates: The correction prompt.
        refusal_check: A refusal judge's second look at every attempt that passed
            re-judging; None takes none.
    """

    def __init__(
        self,
        backend: ModelBackend,
        judge: CompletionJudge,
        *,
        params: SamplingParams | None = None,
        max_attempts: int = 3,
        templates: CorrectionTemplates | None = None,
        refusal_check: RefusalChecker | None = None,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self._backend = backend
        self._judge = judge
        self._params = params or SamplingParams(n=1, temperature=0.7, max_new_tokens=1024)
        if self._params.n != 1:
            raise ValueError("the corrector samples one completion per attempt (n=1)")
        self._max_attempts = max_attempts
        self._templates = templates or CorrectionTemplates.load()
        self._refusal_check = refusal_check

    @property
    def backend(self) -> ModelBackend:
        """The corrector model's backend."""
        return self._backend

    @property
    def ref(self) -> ModelRef:
        """The corrector model, as provenance records it."""
        return self._backend.ref

    @property
    def max_attempts(self) -> int:
        """Bound on tries per unsafe completion."""
        return self._max_attempts

    async def describe(self) -> CorrectorInfo:
        check = self._refusal_check
        return CorrectorInfo(
            self._backend.ref,
            self._params,
            self._max_attempts,
            await self._judge.describe(),
            check.mode if check else RefusalCheckMode.OFF,
            check.judge if check else None,
        )

    async def check(self) -> None:
        await self._backend.check()
        await self._judge.check()
        if self._refusal_check is not None:
            await self._refusal_check.check_backend()

    async def correct(
        self,
        prompt: str,
        completion: str,
        categories: Sequence[str],
        *,
        seed: int | None = None,
        targets: Sequence[JudgeTarget] | None = None,
    ) -> CorrectionOutcome:
        """Correct one unsafe ``completion`` of ``prompt``.

        Stops at the first attempt that is well-formed, re-judged safe and not
        rejected by the refusal check, or after ``max_attempts``. Each retry tells the
        corrector why the last one failed.
        """
        attempts: list[Attempt] = []
        feedback = ""
        for number in range(1, self._max_attempts + 1):
            attempt = await self._attempt(
                prompt, completion, categories, feedback, number, seed, targets, attempts
            )
            attempts.append(attempt)
            if attempt.passed:
                break
            feedback = attempt.failure_reason
            logger.debug("correction attempt %d failed: %s", number, feedback)
        return CorrectionOutcome(tuple(attempts))

    async def _attempt(
        self,
        prompt: str,
        completion: str,
        categories: Sequence[str],
        feedback: str,
        number: int,
        seed: int | None,
        targets: Sequence[JudgeTarget] | None,
        earlier: Sequence[Attempt],
    ) -> Attempt:
        messages = self._templates.messages(prompt, completion, categories, feedback)
        params = self._params
        if seed is not None:
            params = dataclasses.replace(params, seed=seed + number - 1)
        try:
            [generation] = await self._backend.generate(
                GenerationRequest(messages=messages, params=params)
            )
        except BackendError as error:
            return _failed(number, "", f"{CORRECTOR_CALL_FAILED}: {error}")
        text = generation.text
        split = split_reasoning(text)
        # A rewrite cut off by the token limit may still hold both tags; it is never a
        # training row.
        problem = (
            f"format: cut off at max_new_tokens ({params.max_new_tokens})"
            if generation.finish_reason == TRUNCATED
            else _format_problem(split)
        )
        if problem:
            return _failed(number, text, problem)
        response = split.render()
        [judgment] = await self._judge.judge_completions(prompt, [response], targets=targets)
        refusal_check = None
        if judgment.label == VerdictLabel.SAFE:
            reason = ""
            if self._refusal_check is not None:
                # The prompt is the same for every attempt: it is read once.
                readings = (a.refusal_check.request for a in earlier if a.refusal_check)
                known = next((r for r in readings if r and r.request), None)
                refusal_check = await self._refusal_check.check(prompt, response, known)
                reason = self._refusal_check.failure(refusal_check)
        elif judgment.label == VerdictLabel.UNSAFE:
            reason = f"re-judged unsafe ({', '.join(judgment.categories) or 'no category'})"
        else:
            errors = "; ".join(v.error for v in judgment.verdicts if v.error)
            reason = f"re-judging failed: {errors}"
        return Attempt(
            number,
            text,
            split,
            judgment.verdicts,
            judgment.label,
            reason,
            datetime.now(UTC),
            refusal_check,
        )


def _format_problem(split: ReasoningSplit) -> str:
    if not split.has_open or not split.has_close:
        missing = "<think>" if not split.has_open else "</think>"
        return f"format: missing {missing}"
    if THINK_OPEN in split.reasoning or THINK_CLOSE in split.answer:
        return "format: think tags repeated"
    if not split.reasoning:
        return "format: empty reasoning"
    if not split.answer:
        return "format: empty answer after </think>"
    return ""


def _failed(number: int, text: str, reason: str) -> Attempt:
    return Attempt(
        number, text, split_reasoning(text), (), VerdictLabel.ERROR, reason, datetime.now(UTC)
    )
