"""The build's stages. A stage is a function from a case to the cases it emits, each
with the topic it goes to; a transport decides where cases come from and go.

Stages hold no state between cases: everything a later stage needs travels in the
case.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math

from unsafechain.backends.base import BackendError
from unsafechain.domain.convert import (
    LABEL_TO_PB,
    completion_to_pb,
    correction_to_pb,
    unsafe_categories,
    verdict_to_pb,
)
from unsafechain.domain.reasoning import format_reasoning
from unsafechain.generation.engine import GenerationEngine
from unsafechain.judge.engine import CompletionJudge
from unsafechain.v1 import case_pb2

logger = logging.getLogger(__name__)

PROMPTS = "prompts"
GENERATED = "generated"
JUDGED = "judged"
TO_CORRECT = "to-correct"
RECORDS = "records"

Emitted = list[tuple[str, case_pb2.Case]]


def case_seed(build_seed: int, case_id: str, stream: str) -> int:
    """A sampling seed for one case and purpose, independent of scheduling order, so a
    case's samples are the same however many cases run beside it."""
    digest = hashlib.sha256(f"{build_seed}:{case_id}:{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def fail(case: case_pb2.Case, stage: str, reason: str) -> Emitted:
    """Mark ``case`` as failed in ``stage`` and send it to the sink: kept, with its
    reason, never dropped."""
    case.status = case_pb2.CASE_STATUS_STAGE_FAILED
    case.status_reason = f"{stage}: {reason}"
    return [(RECORDS, case)]


class Stage(abc.ABC):
    """One step of the build."""

    name: str
    consumes: str
    produces: tuple[str, ...]

    @abc.abstractmethod
    async def process(self, case: case_pb2.Case) -> Emitted:
        """Do this stage's part of ``case`` and say where it goes next."""


class GenerateStage(Stage):
    """Samples K completions of the case's prompt.

    The engine is a :class:`GenerationEngine`, in process or over a generation service.
    """

    name, consumes, produces = "generate", PROMPTS, (GENERATED, RECORDS)

    def __init__(self, engine: GenerationEngine, build_seed: int):
        self._engine = engine
        self._seed = build_seed

    async def process(self, case: case_pb2.Case) -> Emitted:
        seed = case_seed(self._seed, case.id, "generate")
        case.provenance.sampling.seed = seed
        try:
            completions = await self._engine.generate(case.prompt.text, seed=seed)
        except BackendError as error:
            return fail(case, self.name, str(error))
        del case.completions[:]
        for completion in completions:
            case.completions.append(
                completion_to_pb(
                    completion.index, completion.text, completion.split, completion.finish_reason
                )
            )
        return [(GENERATED, case)]


class JudgeStage(Stage):
    """Judges every completion; an unparseable or failed judgment is an ERROR verdict.

    The engine judges in process or through a judge service.
    """

    name, consumes, produces = "judge", GENERATED, (JUDGED, RECORDS)

    def __init__(self, engine: CompletionJudge):
        self._engine = engine

    async def process(self, case: case_pb2.Case) -> Emitted:
        texts = [format_reasoning(c.reasoning, c.answer) for c in case.completions]
        try:
            judgments = await self._engine.judge_completions(case.prompt.text, texts)
        except BackendError as error:
            # A remote judge service that cannot be reached; the in-process engine
            # turns backend failures into ERROR verdicts instead.
            return fail(case, self.name, str(error))
        for completion, judgment in zip(case.completions, judgments, strict=True):
            del completion.verdicts[:]
            completion.verdicts.extend(verdict_to_pb(v) for v in judgment.verdicts)
            completion.label = LABEL_TO_PB[judgment.label]
        unsafe = sum(c.label == case_pb2.VERDICT_LABEL_UNSAFE for c in case.completions)
        case.unsafe_fraction = unsafe / len(case.completions) if case.completions else 0.0
        return [(JUDGED, case)]


class RouteStage(Stage):
    """Sends hard cases to correction; the others keep a completion judged safe.

    A case is hard when at least ``hard_fraction`` of its K completions are unsafe
    (default: all of them).
    """

    name, consumes, produces = "route", JUDGED, (TO_CORRECT, RECORDS)

    def __init__(self, hard_fraction: float = 1.0):
        self._hard_fraction = hard_fraction

    def is_hard(self, case: case_pb2.Case) -> bool:
        """Whether enough completions are unsafe."""
        total = len(case.completions)
        unsafe = sum(c.label == case_pb2.VERDICT_LABEL_UNSAFE for c in case.completions)
        return unsafe > 0 and unsafe >= math.ceil(self._hard_fraction * total - 1e-9)

    async def process(self, case: case_pb2.Case) -> Emitted:
        case.hard = self.is_hard(case)
        if case.hard:
            return [(TO_CORRECT, case)]
        safe = [c for c in case.completions if c.label == case_pb2.VERDICT_LABEL_SAFE]
        if safe:
            chosen = safe[0]
            case.status = case_pb2.CASE_STATUS_SAFE_ORIGINAL
            case.response.CopyFrom(
                case_pb2.SelectedResponse(
                    text=format_reasoning(chosen.reasoning, chosen.answer),
                    reasoning=chosen.reasoning,
                    answer=chosen.answer,
                    completion_index=chosen.index,
                )
            )
        else:
            labels = [label_name(c.label) for c in case.completions]
            counts = ", ".join(f"{labels.count(label)} {label}" for label in sorted(set(labels)))
            case.status = case_pb2.CASE_STATUS_NO_SAFE_COMPLETION
            case.status_reason = f"no completion judged safe ({counts})"
        return [(RECORDS, case)]


class CorrectStage(Stage):
    """Corrects the unsafe completions of a hard case, each re-judged, retries bounded.

    The case's response is the first correction that passed, by completion index; a
    case none of whose corrections passed is kept with the reason. The engine is a
    :class:`CorrectionEngine` or a remote correction engine with the same ``correct``,
    ``ref`` and ``max_attempts``.
    """

    name, consumes, produces = "correct", TO_CORRECT, (RECORDS,)

    def __init__(self, engine, build_seed: int, *, until_passed: bool = False):
        self._engine = engine
        self._seed = build_seed
        self._until_passed = until_passed

    async def process(self, case: case_pb2.Case) -> Emitted:
        del case.corrections[:]
        unsafe = [c for c in case.completions if c.label == case_pb2.VERDICT_LABEL_UNSAFE]
        for completion in unsafe:
            outcome = await self._engine.correct(
                case.prompt.text,
                format_reasoning(completion.reasoning, completion.answer),
                unsafe_categories(completion),
                seed=case_seed(self._seed, case.id, f"correct-{completion.index}"),
            )
            case.corrections.append(correction_to_pb(outcome, completion.index, self._engine.ref))
            if outcome.passed and self._until_passed:
                break
        passed = [c for c in case.corrections if c.passed]
        if passed:
            correction = passed[0]
            attempt = next(a for a in correction.attempts if not a.failure_reason)
            case.status = case_pb2.CASE_STATUS_CORRECTED
            case.response.CopyFrom(
                case_pb2.SelectedResponse(
                    text=format_reasoning(attempt.reasoning, attempt.answer),
                    reasoning=attempt.reasoning,
                    answer=attempt.answer,
                    completion_index=correction.completion_index,
                    correction_attempt=attempt.attempt,
                )
            )
        else:
            case.status = case_pb2.CASE_STATUS_CORRECTION_FAILED
            reasons = "; ".join(
                f"completion {c.completion_index}: {c.failure_reason}" for c in case.corrections
            )
            case.status_reason = f"no correction passed re-judging ({reasons})"
        return [(RECORDS, case)]


def label_name(label: int) -> str:
    """``safe``, ``unsafe``, ``error`` or ``unspecified`` for a protobuf verdict label."""
    return case_pb2.VerdictLabel.Name(label).removeprefix("VERDICT_LABEL_").lower()
