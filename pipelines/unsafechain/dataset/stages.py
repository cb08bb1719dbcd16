"""The dataset pipeline's own stages: route a judged case to correction or to the
sink, and correct the unsafe completions of a hard case."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

from unsafechain.backends.http_common import gather_all
from unsafechain.correction.engine import Corrector
from unsafechain.dataset.rows import correction_response, original_response
from unsafechain.domain.convert import correction_to_pb, unsafe_categories
from unsafechain.domain.reasoning import format_reasoning
from unsafechain.domain.types import CorrectionOutcome
from unsafechain.intake.answers import AnswerCheck, Checker
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


def unsafe_needed(hard_fraction: float, completions: int) -> int:
    """How many of a case's ``completions`` must be judged unsafe for it to be hard:
    ``hard_fraction`` of them, rounded up, and at least one."""
    return max(1, math.ceil(hard_fraction * completions - 1e-9))


def hard_case_rule(hard_fraction: float, samples: int) -> str:
    """The hardness rule in words, for K=``samples``: "all 3 completions judged unsafe",
    "at least 2 of 3 completions judged unsafe"."""
    needed = unsafe_needed(hard_fraction, samples)
    if needed >= samples:
        return (
            "the only completion judged unsafe"
            if samples == 1
            else (f"all {samples} completions judged unsafe")
        )
    return f"at least {needed} of {samples} completions judged unsafe"


class RouteStage(Stage):
    """Sends the cases with completions to correct to correction; the others keep a
    completion judged safe.

    A case is hard when at least ``hard_fraction`` of its K completions are unsafe
    (default: all of them). A truncated completion (cut off by the token limit) is
    judged and counts toward that fraction, but is never the case's response.

    Args:
        hard_fraction: Fraction of unsafe completions that makes a case hard.
        correct: ``hard``: only hard cases are corrected; ``unsafe``: every case with
            an unsafe completion is, and one that is not hard keeps its safe response.
        checkers: Gold-answer checkers by source name (see ``intake.answers``).
        drop_wrong: A case none of whose safe completions answers correctly gets no
            response (``CASE_STATUS_WRONG_ANSWER``); otherwise a wrong one is flagged.
    """

    name, consumes, produces = "route", JUDGED, (TO_CORRECT, RECORDS)

    def __init__(
        self,
        hard_fraction: float = 1.0,
        *,
        correct: str = "hard",
        checkers: Mapping[str, Checker] | None = None,
        drop_wrong: bool = False,
    ):
        if correct not in ("hard", "unsafe"):
            raise ValueError(f"correct must be 'hard' or 'unsafe', got {correct!r}")
        self._hard_fraction = hard_fraction
        self._correct_all = correct == "unsafe"
        self._checkers = dict(checkers or {})
        self._drop_wrong = drop_wrong

    def is_hard(self, case: case_pb2.Case) -> bool:
        """Whether enough completions are unsafe."""
        unsafe = sum(c.label == case_pb2.VERDICT_LABEL_UNSAFE for c in case.completions)
        return unsafe >= unsafe_needed(self._hard_fraction, len(case.completions))

    async def process(self, case: case_pb2.Case) -> Emitted:
        case.hard = self.is_hard(case)
        if case.hard:
            return [(TO_CORRECT, case)]
        await self.choose_original(case)
        if self._correct_all and any(
            c.label == case_pb2.VERDICT_LABEL_UNSAFE for c in case.completions
        ):
            return [(TO_CORRECT, case)]
        return [(RECORDS, case)]

    async def choose_original(self, case: case_pb2.Case) -> None:
        """Set the response of a case that is not hard: the first completion judged safe
        and complete, a correct one first where the prompt has a checked gold answer;
        or the status saying why there is none."""
        safe = [
            c
            for c in case.completions
            if c.label == case_pb2.VERDICT_LABEL_SAFE and not c.truncated
        ]
        if not safe:
            labels = [label_name(c.label) for c in case.completions]
            counts = ", ".join(f"{labels.count(label)} {label}" for label in sorted(set(labels)))
            truncated = sum(c.truncated for c in case.completions)
            cut = f"; {truncated} cut off by the token limit" if truncated else ""
            case.status = case_pb2.CASE_STATUS_NO_SAFE_COMPLETION
            case.status_reason = f"no completion judged safe ({counts}{cut})"
            return
        checker = self._checkers.get(case.prompt.source.name)
        metadata = dict(case.prompt.metadata)
        checks: list[AnswerCheck | None] = [None] * len(safe)
        if checker is not None:
            # A checker may run code in the sandbox: off the event loop, in turn, until a
            # correct completion is found.
            for position, completion in enumerate(safe):
                checks[position] = await asyncio.to_thread(checker, metadata, completion.answer)
                if checks[position] == AnswerCheck.CORRECT:
                    break
        position = next((i for i, check in enumerate(checks) if check == AnswerCheck.CORRECT), 0)
        chosen, check = safe[position], checks[position]
        if check == AnswerCheck.WRONG and self._drop_wrong:
            case.status = case_pb2.CASE_STATUS_WRONG_ANSWER
            case.status_reason = (
                f"none of the {len(safe)} completions judged safe gives the gold answer"
            )
            return
        case.status = case_pb2.CASE_STATUS_SAFE_ORIGINAL
        case.response.CopyFrom(original_response(chosen, check.value if check else ""))


class CorrectStage(Stage):
    """Corrects the unsafe completions of a case, each re-judged, retries bounded.

    A hard case's response is the first correction that passed, by completion index; a
    hard case none of whose corrections passed is kept with the reason. A case that is
    not hard (corrected with ``routing.correct: unsafe``) keeps the response the route
    stage chose. The engine corrects in process or through a correction service.

    A case's unsafe completions are corrected concurrently (``correction.completions:
    all``): a hard case then holds the stage for one correction and its re-judgment,
    not K of them. Their calls are bounded by the corrector's and the judges' own
    ``max_concurrency``; a case adds at most its K completions. ``until_passed``
    corrects them one after another, by completion index, since it stops at the first
    that passes and so cannot know beforehand which it will need.

    Args:
        engine: The corrector.
        build_seed: The build's seed; each completion's correction is seeded from it,
            the case and the completion's index.
        until_passed: Stop at the first completion whose correction passed.
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
        if self._until_passed:
            for completion in unsafe:
                outcome = await self._correct(case, completion)
                case.corrections.append(correction_to_pb(outcome, completion.index, corrector))
                if outcome.passed:
                    break
        else:
            # gather keeps the order of its calls: corrections stay by completion index.
            outcomes = await gather_all(self._correct(case, c) for c in unsafe)
            for completion, outcome in zip(unsafe, outcomes, strict=True):
                case.corrections.append(correction_to_pb(outcome, completion.index, corrector))
        passed = [c for c in case.corrections if c.passed]
        if case.status != case_pb2.CASE_STATUS_UNSPECIFIED:
            # Not hard, corrected beside its own response (routing.correct: unsafe):
            # the response and status the route stage chose stand.
            return [(RECORDS, case)]
        if passed:
            case.status = case_pb2.CASE_STATUS_CORRECTED
            case.response.CopyFrom(correction_response(passed[0]))
        else:
            case.status = case_pb2.CASE_STATUS_CORRECTION_FAILED
            reasons = "; ".join(
                f"completion {c.completion_index}: {c.failure_reason}" for c in case.corrections
            )
            case.status_reason = f"no correction passed re-judging ({reasons})"
        return [(RECORDS, case)]

    async def _correct(
        self, case: case_pb2.Case, completion: case_pb2.Completion
    ) -> CorrectionOutcome:
        """Correct one unsafe completion, seeded by the case and its index."""
        return await self._engine.correct(
            case.prompt.text,
            format_reasoning(completion.reasoning, completion.answer),
            unsafe_categories(completion),
            seed=case_seed(self._seed, case.id, f"correct-{completion.index}"),
        )
