"""The dataset pipeline's own stages: route a judged case to correction or to the
sink, and correct the unsafe completions of a hard case."""

from __future__ import annotations

import math

from unsafechain.correction.engine import Corrector
from unsafechain.domain.convert import correction_to_pb, unsafe_categories
from unsafechain.domain.reasoning import format_reasoning
from unsafechain.streaming.stages import (
    JUDGED,
    RECORDS,
    TO_CORRECT,
    Emitted,
    Stage,
    case_seed,
    label_name,
)
from unsafechain.v1 import case_pb2


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
    case none of whose corrections passed is kept with the reason. The engine corrects
    in process or through a correction service.
    """

    name, consumes, produces = "correct", TO_CORRECT, (RECORDS,)

    def __init__(self, engine: Corrector, build_seed: int, *, until_passed: bool = False):
        self._engine = engine
        self._seed = build_seed
        self._until_passed = until_passed

    async def process(self, case: case_pb2.Case) -> Emitted:
        del case.corrections[:]
        corrector = (await self._engine.describe()).model
        unsafe = [c for c in case.completions if c.label == case_pb2.VERDICT_LABEL_UNSAFE]
        for completion in unsafe:
            outcome = await self._engine.correct(
                case.prompt.text,
                format_reasoning(completion.reasoning, completion.answer),
                unsafe_categories(completion),
                seed=case_seed(self._seed, case.id, f"correct-{completion.index}"),
            )
            case.corrections.append(correction_to_pb(outcome, completion.index, corrector))
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
