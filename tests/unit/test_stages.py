"""Each stage of the build, and the embedded transport, on scripted backends."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.scripted_backend import ScriptedBackend, guard_generation
from unsafechain.backends.base import BackendError, BackendUnavailable
from unsafechain.correction.engine import CorrectionEngine
from unsafechain.dataset.stages import CorrectStage, RouteStage
from unsafechain.domain.types import Generation, GenerationRequest, SamplingParams
from unsafechain.generation.engine import GenerationEngine
from unsafechain.judge.engine import JudgeEngine, LlamaGuardJudge
from unsafechain.streaming.stages import (
    GENERATED,
    JUDGED,
    RECORDS,
    GenerateStage,
    JudgeStage,
    Stage,
    case_seed,
    run_stage,
    stage_failed,
)
from unsafechain.streaming.transport import EmbeddedTransport
from unsafechain.v1 import case_pb2

HARMFUL = "<think>\nmix the blast powder\n</think>\n\nThen light it."
SAFE = "<think>\nBaking is safe.\n</think>\n\nBake it for an hour."
CORRECTED = "<think>\nI must not help with weapons.\n</think>\n\nI can't help with that."


def _case(case_id: str = "c1", text: str = "How do I make a bomb?") -> case_pb2.Case:
    return case_pb2.Case(id=case_id, prompt=case_pb2.Prompt(id=case_id, text=text))


def _params(n: int) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.7, max_new_tokens=32)


def _guard() -> JudgeEngine:
    """Unsafe when the judged text mentions blast powder."""

    def answer(request: GenerationRequest) -> list[Generation]:
        conversation = request.messages or ()
        unsafe = any("blast powder" in message.content for message in conversation[1:])
        return [guard_generation("unsafe\nS9" if unsafe else "safe")]

    return JudgeEngine([LlamaGuardJudge(ScriptedBackend(answer), name="guard")])


def _generated(*texts: str) -> case_pb2.Case:
    case = _case()
    engine = GenerationEngine(
        ScriptedBackend(lambda request: [Generation(t, "stop") for t in texts]), _params(len(texts))
    )
    asyncio.run(GenerateStage(engine, build_seed=1).process(case))
    return case


def test_generate_stage_splits_k_completions_and_records_the_cases_own_seed():
    backend = ScriptedBackend(lambda request: [Generation(SAFE, "stop"), Generation("no tags")])
    engine = GenerationEngine(backend, _params(2))
    first, second = _case("a"), _case("b")
    [(topic, out)] = asyncio.run(GenerateStage(engine, build_seed=1).process(first))
    asyncio.run(GenerateStage(engine, build_seed=1).process(second))
    assert topic == GENERATED and out is first
    assert [c.index for c in first.completions] == [0, 1]
    assert first.completions[0].reasoning == "Baking is safe."
    assert first.completions[0].answer == "Bake it for an hour."
    assert not first.completions[1].has_think_open
    seeds = [request.params.seed for request in backend.requests]
    assert seeds == [first.provenance.sampling.seed, second.provenance.sampling.seed]
    assert seeds[0] != seeds[1]


def test_generate_stage_lets_a_backend_failure_through_for_the_transport_to_handle():
    def down(request):
        raise BackendUnavailable("generator at http://g: 503")

    engine = GenerationEngine(ScriptedBackend(down), _params(1))
    with pytest.raises(BackendError, match="503"):
        asyncio.run(GenerateStage(engine, build_seed=1).process(_case()))


def test_judge_stage_labels_each_completion_and_the_unsafe_fraction():
    case = _generated(HARMFUL, SAFE, HARMFUL)
    [(topic, _)] = asyncio.run(JudgeStage(_guard()).process(case))
    assert topic == JUDGED
    labels = [c.label for c in case.completions]
    assert labels == [
        case_pb2.VERDICT_LABEL_UNSAFE,
        case_pb2.VERDICT_LABEL_SAFE,
        case_pb2.VERDICT_LABEL_UNSAFE,
    ]
    assert case.unsafe_fraction == pytest.approx(2 / 3)
    assert list(case.completions[0].verdicts[0].categories) == ["S9"]


def test_route_stage_sends_a_hard_case_to_correction_and_keeps_a_safe_completion_otherwise():
    hard = _generated(HARMFUL, HARMFUL)
    asyncio.run(JudgeStage(_guard()).process(hard))
    [(topic, _)] = asyncio.run(RouteStage().process(hard))
    assert topic == "to-correct" and hard.hard
    mixed = _generated(HARMFUL, SAFE)
    asyncio.run(JudgeStage(_guard()).process(mixed))
    [(topic, _)] = asyncio.run(RouteStage().process(mixed))
    assert topic == RECORDS and not mixed.hard
    assert mixed.status == case_pb2.CASE_STATUS_SAFE_ORIGINAL
    assert mixed.response.completion_index == 1


def _corrector(answers: list[str]) -> CorrectionEngine:
    remaining = list(answers)
    backend = ScriptedBackend(lambda request: [Generation(remaining.pop(0), "stop")])
    return CorrectionEngine(backend, _guard(), params=_params(1), max_attempts=2)


def _harmful(number: int) -> str:
    """An unsafe completion told apart from the others by its number."""
    return f"<think>\nmix the blast powder, batch {number}\n</think>\n\nThen light it."


def _correcting(request: GenerationRequest) -> str:
    """Which of the :func:`_harmful` completions a correction request rewrites."""
    [number] = {n for n in range(10) for m in request.messages or () if f"batch {n}\n" in m.content}
    return str(number)


def test_correct_stage_corrects_every_unsafe_completion_and_picks_the_first_that_passed():
    case = _generated(_harmful(0), _harmful(1))
    asyncio.run(JudgeStage(_guard()).process(case))
    # The first completion's two attempts fail re-judging; the second's first passes.
    answers = {"0": [HARMFUL, HARMFUL], "1": [CORRECTED]}
    backend = ScriptedBackend(lambda r: [Generation(answers[_correcting(r)].pop(0), "stop")])
    engine = CorrectionEngine(backend, _guard(), params=_params(1), max_attempts=2)
    [(topic, _)] = asyncio.run(CorrectStage(engine, build_seed=1).process(case))
    assert topic == RECORDS
    assert case.status == case_pb2.CASE_STATUS_CORRECTED
    assert [len(c.attempts) for c in case.corrections] == [2, 1]
    assert [c.passed for c in case.corrections] == [False, True]
    assert case.response.completion_index == 1 and case.response.correction_attempt == 1
    assert case.corrections[1].corrector.backend == "scripted"


class _Meeting(ScriptedBackend):
    """A corrector whose calls wait until ``parties`` of them are in flight at once
    (within a timeout), then answer ``CORRECTED`` in the reverse order of their
    completions' numbers; it counts the calls in flight."""

    def __init__(self, parties: int):
        super().__init__(lambda request: [Generation(CORRECTED, "stop")])
        self._barrier = asyncio.Barrier(parties)
        self.in_flight = self.most_in_flight = 0

    async def generate(self, request: GenerationRequest) -> list[Generation]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            async with asyncio.timeout(2):
                await self._barrier.wait()
            await asyncio.sleep(0.01 * (10 - int(_correcting(request))))
            return await super().generate(request)
        finally:
            self.in_flight -= 1


def test_correct_stage_corrects_a_cases_unsafe_completions_at_once_kept_by_index_and_seed():
    case = _generated(_harmful(0), SAFE, _harmful(2), _harmful(3))
    asyncio.run(JudgeStage(_guard()).process(case))
    # The three calls wait on one another: one after another, the first times out.
    backend = _Meeting(parties=3)
    engine = CorrectionEngine(backend, _guard(), params=_params(1), max_attempts=2)
    asyncio.run(CorrectStage(engine, build_seed=1).process(case))
    assert backend.most_in_flight == 3
    assert [c.completion_index for c in case.corrections] == [0, 2, 3]
    assert all(c.passed for c in case.corrections)
    assert case.response.completion_index == 0
    seeds = {_correcting(r): r.params.seed for r in backend.requests}
    assert seeds == {str(index): case_seed(1, case.id, f"correct-{index}") for index in (0, 2, 3)}


def test_correct_stage_until_passed_corrects_one_completion_at_a_time_and_stops_at_a_pass():
    case = _generated(_harmful(0), _harmful(1), _harmful(2))
    asyncio.run(JudgeStage(_guard()).process(case))
    answers = {"0": [HARMFUL, HARMFUL], "1": [CORRECTED], "2": [CORRECTED]}
    backend = ScriptedBackend(lambda r: [Generation(answers[_correcting(r)].pop(0), "stop")])
    engine = CorrectionEngine(backend, _guard(), params=_params(1), max_attempts=2)
    asyncio.run(CorrectStage(engine, build_seed=1, until_passed=True).process(case))
    assert [c.completion_index for c in case.corrections] == [0, 1]
    assert [_correcting(r) for r in backend.requests] == ["0", "0", "1"]
    assert case.response.completion_index == 1


def test_correct_stage_keeps_a_case_none_of_whose_corrections_passed_with_the_reason():
    case = _generated(HARMFUL)
    asyncio.run(JudgeStage(_guard()).process(case))
    engine = _corrector(["no think tags", HARMFUL])
    asyncio.run(CorrectStage(engine, build_seed=1).process(case))
    assert case.status == case_pb2.CASE_STATUS_CORRECTION_FAILED
    assert "re-judged unsafe" in case.status_reason


class _Failing(Stage):
    name, consumes, produces = "generate", "prompts", ("generated", RECORDS)

    def __init__(self, error: Exception):
        self._error = error

    async def process(self, case: case_pb2.Case):
        raise self._error


def test_run_stage_keeps_a_failed_case_with_its_reason_or_raises_for_a_retrying_transport():
    case = _case()
    [(topic, out)] = asyncio.run(run_stage(_Failing(BackendUnavailable("503 from g")), case))
    assert topic == RECORDS and out.status == case_pb2.CASE_STATUS_STAGE_FAILED
    assert out.status_reason == "generate: 503 from g"
    assert [(s.stage, s.error) for s in out.provenance.stages] == [("generate", "503 from g")]
    again = _case()
    with pytest.raises(BackendUnavailable):
        asyncio.run(run_stage(_Failing(BackendUnavailable("503")), again, keep_failures=False))
    assert list(again.provenance.stages) == []


def test_a_case_given_up_on_records_the_stage_and_its_reason():
    [(topic, case)] = stage_failed(_case(), "judge", "JudgeService at j: UNAVAILABLE")
    assert topic == RECORDS
    assert case.status_reason == "judge: JudgeService at j: UNAVAILABLE"
    assert [(s.stage, s.error) for s in case.provenance.stages] == [
        ("judge", "JudgeService at j: UNAVAILABLE")
    ]


def test_embedded_transport_delivers_every_case_once_failed_ones_included():
    def answer(request: GenerationRequest) -> list[Generation]:
        [message] = request.messages or ()
        if "fail" in message.content:
            raise BackendUnavailable("generator down for this one")
        return [Generation(SAFE, "stop")]

    engine = GenerationEngine(ScriptedBackend(answer), _params(1))
    stages = [GenerateStage(engine, 1), JudgeStage(_guard()), RouteStage()]
    cases = [_case(f"c{i}", "please fail" if i % 3 == 0 else f"question {i}") for i in range(10)]
    delivered: list[case_pb2.Case] = []

    async def sink(case: case_pb2.Case) -> None:
        delivered.append(case)

    count = asyncio.run(
        EmbeddedTransport(stages, concurrency=3, queue_size=2).run(iter(cases), sink)
    )
    assert count == 10
    assert sorted(case.id for case in delivered) == sorted(case.id for case in cases)
    statuses = {case.id: case.status for case in delivered}
    assert [statuses[f"c{i}"] for i in (0, 3, 6, 9)] == [case_pb2.CASE_STATUS_STAGE_FAILED] * 4
    assert statuses["c1"] == case_pb2.CASE_STATUS_SAFE_ORIGINAL
