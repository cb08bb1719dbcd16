"""Stages: a stage is a function from a case to the cases it emits, each with the
topic it goes to; a transport decides where cases come from and go, and what happens
when a stage fails on a case.

Stages hold no state between cases: everything a later stage needs travels in the
case. The generate and judge stages here serve every pipeline; a pipeline adds its
own (the dataset build routes and corrects).
"""

from __future__ import annotations

import abc
import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from unsafechain.backends.base import BackendError
from unsafechain.domain.convert import LABEL_TO_PB, completion_to_pb, timestamp, verdict_to_pb
from unsafechain.domain.reasoning import format_reasoning
from unsafechain.generation.engine import Generator
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


def failure_reason(error: Exception) -> str:
    """How a stage's failure is recorded: a backend's own message, or the exception."""
    if isinstance(error, BackendError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def stage_failed(case: case_pb2.Case, stage: str, reason: str) -> Emitted:
    """The case a stage gave up on: the stage's pass recorded with its error, then
    marked failed for the sink."""
    now = timestamp(datetime.now(UTC))
    case.provenance.stages.add(stage=stage, started_at=now, finished_at=now, error=reason)
    return fail(case, stage, reason)


async def run_stage(stage: Stage, case: case_pb2.Case, *, keep_failures: bool = True) -> Emitted:
    """Run ``stage`` on ``case``, recording the pass in the case's provenance.

    Args:
        stage: The stage.
        case: The case; changed in place.
        keep_failures: On a failure, mark the case failed with its reason and send it
            on (the embedded transport: nothing accepted is lost). ``False`` raises
            instead, for a transport that retries (Kafka).
    """
    record = case.provenance.stages.add(stage=stage.name, started_at=timestamp(datetime.now(UTC)))
    try:
        emitted = await stage.process(case)
    except Exception as error:
        if not keep_failures:
            del case.provenance.stages[-1]
            raise
        if isinstance(error, BackendError):
            logger.warning("case %s: stage %s failed: %s", case.id, stage.name, error)
        else:
            logger.exception("case %s: stage %s failed", case.id, stage.name)
        record.error = failure_reason(error)
        emitted = fail(case, stage.name, record.error)
    record.finished_at.CopyFrom(timestamp(datetime.now(UTC)))
    for topic, _ in emitted:
        if topic not in stage.produces:
            raise RuntimeError(f"stage {stage.name} emitted to {topic}, not one of its topics")
    return emitted


class Stage(abc.ABC):
    """One step of the build."""

    name: str
    consumes: str
    produces: tuple[str, ...]

    @abc.abstractmethod
    async def process(self, case: case_pb2.Case) -> Emitted:
        """Do this stage's part of ``case`` and say where it goes next."""


class GenerateStage(Stage):
    """Samples K completions of the case's prompt, in process or through a generation
    service. A model that fails after its own retries fails the stage.

    Args:
        engine: The generator.
        build_seed: The seed every case's sampling seed derives from.
        seed_key: What a case's seed derives from (default: its id). The evaluation
            gives every model the same seed for the same prompt, so that a model and
            its base are compared on common random numbers.
    """

    name, consumes, produces = "generate", PROMPTS, (GENERATED, RECORDS)

    def __init__(
        self,
        engine: Generator,
        build_seed: int,
        *,
        seed_key: Callable[[case_pb2.Case], str] | None = None,
    ):
        self._engine = engine
        self._seed = build_seed
        self._seed_key = seed_key

    async def process(self, case: case_pb2.Case) -> Emitted:
        key = self._seed_key(case) if self._seed_key is not None else case.id
        seed = case_seed(self._seed, key, "generate")
        case.provenance.sampling.seed = seed
        completions = await self._engine.generate(case.prompt.text, seed=seed)
        del case.completions[:]
        case.completions.extend(completion_to_pb(completion) for completion in completions)
        return [(GENERATED, case)]


class JudgeStage(Stage):
    """Judges every completion, in process or through a judge service; an unparseable
    judgment is an ERROR verdict, and a judge service that cannot be reached fails
    the stage."""

    name, consumes, produces = "judge", GENERATED, (JUDGED, RECORDS)

    def __init__(self, engine: CompletionJudge):
        self._engine = engine

    async def process(self, case: case_pb2.Case) -> Emitted:
        texts = [format_reasoning(c.reasoning, c.answer) for c in case.completions]
        judgments = await self._engine.judge_completions(case.prompt.text, texts)
        for completion, judgment in zip(case.completions, judgments, strict=True):
            del completion.verdicts[:]
            completion.verdicts.extend(verdict_to_pb(v) for v in judgment.verdicts)
            completion.label = LABEL_TO_PB[judgment.label]
        unsafe = sum(c.label == case_pb2.VERDICT_LABEL_UNSAFE for c in case.completions)
        case.unsafe_fraction = unsafe / len(case.completions) if case.completions else 0.0
        return [(JUDGED, case)]


def label_name(label: int) -> str:
    """``safe``, ``unsafe``, ``error`` or ``unspecified`` for a protobuf verdict label."""
    return case_pb2.VerdictLabel.Name(label).removeprefix("VERDICT_LABEL_").lower()
