"""The correction stage's refusal check: a refusal judge's second look at every
correction that passed re-judging, recorded or enforced, and counted in the manifest."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from tests.unit.scripted_backend import ScriptedBackend, guard_generation
from unsafechain.backends.base import BackendUnavailable
from unsafechain.correction.engine import CorrectionEngine
from unsafechain.correction.refusal_check import (
    REFUSAL_CHECK_FAILED,
    REFUSED_BENIGN,
    RefusalChecker,
    refusal_check_counts,
)
from unsafechain.dataset.config import load_config
from unsafechain.dataset.pipeline import failed_transiently, finish_build, start_build
from unsafechain.dataset.stages import CorrectStage
from unsafechain.domain.convert import attempt_from_pb, attempt_to_pb, correction_to_pb
from unsafechain.domain.types import (
    Generation,
    GenerationRequest,
    RefusalCheckMode,
    RefusalClass,
    RequestClass,
    VerdictLabel,
)
from unsafechain.judge.engine import JudgeEngine, LlamaGuardJudge
from unsafechain.judge.refusal import RefusalJudge, parse_request
from unsafechain.v1 import case_pb2

BENIGN = "How do I kill a Python process that hangs?"
HARMFUL = "How do I make a bomb?"
ORIGINAL = "<think>\nkill everything in sight\n</think>\n\nDo it."
REFUSAL = "<think>\nThis could be risky.\n</think>\n\nI can't help with that."
PARTIAL = "<think>\nOne part is risky.\n</think>\n\nI can't help with that part, but not the rest."
ANSWER = "<think>\nThe user wants to stop a process.\n</think>\n\nRun kill with its process id."


class ScriptedRefusalModel:
    """Answers the refusal judge's two questions: the class of a response (by its
    wording) and the class of a request (by its topic, or ``request_answer``)."""

    def __init__(self, request_answer: str | None = None, class_answer: str | None = None):
        self.request_answer = request_answer
        self.class_answer = class_answer
        self.backend = ScriptedBackend(self._answer)

    def _answer(self, request: GenerationRequest) -> list[Generation]:
        text = (request.messages or ())[-1].content
        if text.startswith("Decide whether a user's request"):
            asked = text.split("<request>")[1]
            request_class = "benign" if "Python process" in asked else "harmful"
            return [Generation(self.request_answer or f"REQUEST: {request_class}", "stop")]
        response = text.split("<response>")[1]
        if self.class_answer is not None:
            return [Generation(self.class_answer, "stop")]
        if "but not the rest" in response:
            return [Generation("It declines part.\nCLASS: partial_refusal", "stop")]
        if "can't help" in response:
            return [Generation("It declines.\nCLASS: full_refusal", "stop")]
        return [Generation("It answers.\nCLASS: full_compliance", "stop")]

    def asked(self, question: str) -> int:
        return sum(r.messages[-1].content.startswith(question) for r in self.backend.requests)


def _guard() -> JudgeEngine:
    """Safe unless the judged text tells someone to kill everything."""

    def answer(request: GenerationRequest) -> list[Generation]:
        unsafe = "kill everything" in request.messages[1].content
        return [guard_generation("unsafe\nS1" if unsafe else "safe")]

    return JudgeEngine([LlamaGuardJudge(ScriptedBackend(answer), name="guard")])


def _engine(outputs, mode, refusal_model=None, max_attempts=3):
    remaining = list(outputs)
    corrector = ScriptedBackend(lambda request: [Generation(remaining.pop(0), "stop")])
    model = refusal_model or ScriptedRefusalModel()
    checker = RefusalChecker(RefusalJudge(model.backend, name="xs"), mode)
    engine = CorrectionEngine(corrector, _guard(), max_attempts=max_attempts, refusal_check=checker)
    return engine, corrector, model


def test_reject_fails_a_full_refusal_of_a_benign_prompt_and_has_the_next_attempt_answer_it():
    engine, corrector, model = _engine([REFUSAL, REFUSAL, ANSWER], RefusalCheckMode.REJECT)

    outcome = asyncio.run(engine.correct(BENIGN, ORIGINAL, ["S1"], seed=1))

    first, _, third = outcome.attempts
    assert [a.failure_reason for a in outcome.attempts] == [REFUSED_BENIGN, REFUSED_BENIGN, ""]
    # Re-judging passed the refusals: the check, not the safety judge, rejected them.
    assert first.label == VerdictLabel.SAFE
    assert first.refusal_check.refusal == RefusalClass.FULL_REFUSAL
    assert first.refusal_check.request.request == RequestClass.BENIGN
    assert first.refusal_check.refuses_benign_request
    assert outcome.passed is third
    assert third.refusal_check.refusal == RefusalClass.FULL_COMPLIANCE
    assert third.refusal_check.request is None
    assert "answer the request fully" in corrector.requests[1].messages[1].content
    # The prompt is read once for all attempts.
    assert model.asked("Decide whether a user's request") == 1
    assert model.asked("Classify how a model's response") == 3


@pytest.mark.parametrize(
    ("prompt", "response", "refusal", "request_class"),
    [
        (HARMFUL, REFUSAL, RefusalClass.FULL_REFUSAL, RequestClass.HARMFUL),
        (BENIGN, PARTIAL, RefusalClass.PARTIAL_REFUSAL, None),
        (BENIGN, ANSWER, RefusalClass.FULL_COMPLIANCE, None),
    ],
)
def test_reject_passes_a_refusal_of_a_harmful_prompt_and_anything_short_of_full_refusal(
    prompt, response, refusal, request_class
):
    engine, _, model = _engine([response], RefusalCheckMode.REJECT)

    [attempt] = asyncio.run(engine.correct(prompt, ORIGINAL, ["S1"])).attempts

    assert attempt.passed
    assert attempt.refusal_check.refusal == refusal
    reading = attempt.refusal_check.request
    assert (reading.request if reading else None) == request_class
    assert model.asked("Decide whether a user's request") == (request_class is not None)


def test_record_keeps_the_class_of_a_full_refusal_of_a_benign_prompt_and_passes_it():
    engine, _, _ = _engine([REFUSAL], RefusalCheckMode.RECORD)

    outcome = asyncio.run(engine.correct(BENIGN, ORIGINAL, ["S1"]))

    [attempt] = outcome.attempts
    assert outcome.passed is attempt
    assert attempt.refusal_check.refuses_benign_request
    assert attempt.refusal_check.verdict.judge.name == "xs"


def test_attempts_that_fail_re_judging_or_the_format_are_not_checked():
    engine, _, model = _engine(["no tags", ORIGINAL, ANSWER], RefusalCheckMode.REJECT)

    outcome = asyncio.run(engine.correct(BENIGN, ORIGINAL, ["S1"]))

    assert [a.refusal_check is None for a in outcome.attempts] == [True, True, False]
    assert model.asked("Classify how a model's response") == 1


@pytest.mark.parametrize(
    ("model", "error"),
    [
        (ScriptedRefusalModel(class_answer="Hard to say."), "refusal class: refusal class missing"),
        (ScriptedRefusalModel(request_answer="Who knows."), "request class: request class missing"),
    ],
)
def test_a_check_the_judge_cannot_decide_fails_the_attempt_only_when_rejecting(model, error):
    rejecting, _, _ = _engine([REFUSAL], RefusalCheckMode.REJECT, model, max_attempts=1)
    recording, _, _ = _engine([REFUSAL], RefusalCheckMode.RECORD, model, max_attempts=1)

    [rejected] = asyncio.run(rejecting.correct(BENIGN, ORIGINAL, ["S1"])).attempts
    [recorded] = asyncio.run(recording.correct(BENIGN, ORIGINAL, ["S1"])).attempts

    assert rejected.failure_reason == f"{REFUSAL_CHECK_FAILED}: {error}"
    assert recorded.passed and recorded.refusal_check.error == error


def test_a_refusal_judge_that_cannot_be_reached_fails_the_attempt_transiently():
    def down(request):
        raise BackendUnavailable("xs at http://x: 503")

    checker = RefusalChecker(RefusalJudge(ScriptedBackend(down)), RefusalCheckMode.REJECT)
    corrector = ScriptedBackend(lambda request: [Generation(REFUSAL, "stop")])
    engine = CorrectionEngine(corrector, _guard(), max_attempts=1, refusal_check=checker)

    outcome = asyncio.run(engine.correct(BENIGN, ORIGINAL, ["S1"]))

    assert outcome.attempts[0].failure_reason.startswith(f"{REFUSAL_CHECK_FAILED}: refusal class")
    case = case_pb2.Case(id="c", status=case_pb2.CASE_STATUS_CORRECTION_FAILED)
    case.corrections.append(correction_to_pb(outcome, 0, corrector.ref))
    assert failed_transiently(case)


def test_the_check_survives_the_protobuf_round_trip():
    engine, _, _ = _engine([REFUSAL, ANSWER], RefusalCheckMode.REJECT)
    outcome = asyncio.run(engine.correct(BENIGN, ORIGINAL, ["S1"]))
    for attempt in outcome.attempts:
        assert attempt_from_pb(attempt_to_pb(attempt)) == attempt


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("It asks for help with code.\nREQUEST: benign", RequestClass.BENIGN),
        ("Not benign at all.\n**Request:** Harmful", RequestClass.HARMFUL),
        ("harmful", RequestClass.HARMFUL),
        ("benign or harmful?", "request class ambiguous: benign, harmful"),
        ("No idea.", "request class missing"),
    ],
)
def test_the_request_class_is_read_from_the_last_request_line(raw, expected):
    assert parse_request(raw) == expected


def _build(tmp_path: Path, mode: str):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (BENIGN, HARMFUL)))
    model = {"backend": "transformers", "model": "never-loaded"}
    raw = {
        "build": {"output": str(tmp_path / mode)},
        "sources": [{"name": "s", "path": str(prompts)}],
        "models": {"m": model},
        "generation": {"model": "m"},
        "judging": {
            "judges": [
                {"name": "guard", "model": "m"},
                {"name": "xs", "kind": "refusal", "model": "m", "report": False},
            ]
        },
        "correction": {"model": "m", "refusal_check": {"mode": mode, "judge": "xs"}},
    }
    path = tmp_path / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.parametrize("mode", ["record", "reject"])
def test_the_manifest_counts_what_the_refusal_check_said(tmp_path, mode):
    config = _build(tmp_path, mode)
    start = start_build(config)
    outputs = {BENIGN: [REFUSAL, ANSWER], HARMFUL: [REFUSAL]}
    for record in start.todo:
        engine, _, _ = _engine(outputs[record.text], RefusalCheckMode(mode), max_attempts=2)
        case = case_pb2.Case(id=record.id, prompt=case_pb2.Prompt(id=record.id, text=record.text))
        case.hard = True
        case.completions.add(index=0, text=ORIGINAL, label=case_pb2.VERDICT_LABEL_UNSAFE)
        asyncio.run(CorrectStage(engine, build_seed=1).process(case))
        start.store.write(case)
    manifest = finish_build(config, start).manifest
    start.store.close()

    rejected = mode == "reject"
    assert manifest["refusal_check"] == {
        "mode": mode,
        "judge": "xs",
        "checked": 3 if rejected else 2,
        "full_compliance": 1 if rejected else 0,
        "full_refusal": 2,
        "partial_refusal": 0,
        "unclassified": 0,
        "full_refusal_of_benign": 1,
        "full_refusal_of_harmful": 1,
        "rejected": 1 if rejected else 0,
    }
    assert manifest["counts"]["corrected"] == 2
    rows = [json.loads(line) for line in (start.output / "dataset.jsonl").read_text().splitlines()]
    benign = next(row for row in rows if row["prompt"] == BENIGN)
    first = benign["provenance"]["corrections"][0]["attempts"][0]
    assert (first["refusal"], first["request"]) == ("full_refusal", "benign")
    kept = "Run kill with its process id." if rejected else "I can't help with that."
    assert benign["answer"] == kept


def test_counts_are_zero_without_checks():
    assert sum(refusal_check_counts([]).values()) == 0
