"""The rules that decide what becomes a training row: truncated completions, gold-answer
checks, which unsafe completions are corrected, the row policy, preference pairs and the
held-out test split."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import pytest

from tests.unit.scripted_backend import ScriptedBackend, guard_generation
from unsafechain.correction.engine import CorrectionEngine
from unsafechain.dataset.assembly import preference_pairs
from unsafechain.dataset.rows import case_rows
from unsafechain.dataset.stages import CorrectStage, RouteStage
from unsafechain.domain.types import Generation, SamplingParams
from unsafechain.generation.engine import GenerationEngine
from unsafechain.intake.answers import AnswerCheck, check_gsm8k, final_number
from unsafechain.intake.prompts import HELD_OUT, read_prompts
from unsafechain.intake.settings import (
    DecontaminationSettings,
    DeduplicationSettings,
    HeldOutSettings,
    SourceSettings,
)
from unsafechain.judge.engine import JudgeEngine, LlamaGuardJudge
from unsafechain.streaming.stages import RECORDS, TO_CORRECT, GenerateStage
from unsafechain.v1 import case_pb2

SAFE, UNSAFE = case_pb2.VERDICT_LABEL_SAFE, case_pb2.VERDICT_LABEL_UNSAFE
CORRECTED = "<think>\nI must not help with weapons.\n</think>\n\nI can't help with that."


def _params(n: int = 1) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.7, max_new_tokens=8)


def _case(*completions: tuple[int, str, bool], source: str = "src", **metadata: str):
    """A judged case: (label, answer, truncated) per completion."""
    case = case_pb2.Case(id="c1")
    case.prompt.text = "a prompt"
    case.prompt.source.name = source
    case.prompt.metadata.update(metadata)
    for index, (label, answer, truncated) in enumerate(completions):
        case.completions.add(
            index=index,
            reasoning=f"r{index}",
            answer=answer,
            label=label,
            truncated=truncated,
            finish_reason="length" if truncated else "stop",
        )
    return case


def _route(case: case_pb2.Case, **options) -> str:
    [(topic, _)] = asyncio.run(RouteStage(1.0, **options).process(case))
    return topic


# --- truncated completions ---------------------------------------------------------


def test_a_completion_cut_off_after_a_prompt_that_opened_think_is_reasoning_and_truncated():
    cut = Generation("Okay, the user wants help. First I", "length", prompt_opens_think=True)
    engine = GenerationEngine(ScriptedBackend(lambda request: [cut]), _params())
    [completion] = asyncio.run(engine.generate("a prompt"))
    assert completion.truncated
    assert completion.split.reasoning == "Okay, the user wants help. First I"
    assert completion.split.answer == ""
    case = case_pb2.Case(id="c1")
    asyncio.run(GenerateStage(engine, build_seed=1).process(case))
    [stored] = case.completions
    assert stored.truncated and stored.think_opened_by_prompt and stored.answer == ""


def test_the_configured_answer_overrides_what_the_backend_saw():
    seen = Generation("plain answer", "stop", prompt_opens_think=None)
    for configured, reasoning in ((True, "plain answer"), (None, ""), (False, "")):
        engine = GenerationEngine(
            ScriptedBackend(lambda request: [seen]), _params(), prompt_opens_think=configured
        )
        [completion] = asyncio.run(engine.generate("a prompt"))
        assert completion.split.reasoning == reasoning


def test_a_truncated_completion_is_never_the_response():
    case = _case((SAFE, "cut", True), (SAFE, "whole", False))
    assert _route(case) == RECORDS
    assert case.status == case_pb2.CASE_STATUS_SAFE_ORIGINAL
    assert case.response.completion_index == 1
    only_cut = _case((SAFE, "cut", True), (UNSAFE, "bad", False))
    _route(only_cut)
    assert only_cut.status == case_pb2.CASE_STATUS_NO_SAFE_COMPLETION
    assert "1 cut off by the token limit" in only_cut.status_reason
    assert case_rows(only_cut) == []


def test_a_correction_cut_off_by_the_token_limit_fails_and_is_retried():
    answers = [Generation(CORRECTED, "length"), Generation(CORRECTED, "stop")]
    corrector = ScriptedBackend(lambda request: [answers.pop(0)])
    judge = JudgeEngine(
        [LlamaGuardJudge(ScriptedBackend(lambda r: [guard_generation("safe")]), name="g")]
    )
    engine = CorrectionEngine(corrector, judge, params=_params(), max_attempts=2)
    outcome = asyncio.run(engine.correct("a prompt", "<think>\nbad\n</think>\n\nbad", ["S9"]))
    first, second = outcome.attempts
    assert "cut off at max_new_tokens (8)" in first.failure_reason
    assert second.passed and outcome.passed


def test_preference_pairs_never_take_a_truncated_completion_as_rejected():
    case = _case((UNSAFE, "harm, cut", True), (UNSAFE, "harm", False))
    case.hard = True
    for index in (0, 1):
        correction = case.corrections.add(completion_index=index, passed=True)
        correction.attempts.add(attempt=1, text=CORRECTED, reasoning="r", answer="a")
    case.status = case_pb2.CASE_STATUS_CORRECTED
    case.response.completion_index = 0
    pairs = preference_pairs(case_rows(case))
    assert [pair["completion_index"] for pair in pairs] == [1]


# --- gold answers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "number"),
    [
        ("So she has 72 clips.", "72"),
        ("The answer is $1,234.50.", "1234.50"),
        ("First 3 then 4, so \\boxed{7}. Check: 7 - 3 = 4", "7"),
        ("#### 18", "18"),
        ("The answer: -5, since 2 - 7 = -5", "-5"),
        ("No numbers here.", None),
    ],
)
def test_the_final_number_of_an_answer(answer, number):
    assert final_number(answer) == (Decimal(number) if number else None)


def test_gsm8k_answers_are_checked_by_their_final_number():
    gold = {"final_answer": "72"}
    assert check_gsm8k(gold, "48 + 24 = 72 clips in all.") == AnswerCheck.CORRECT
    assert check_gsm8k(gold, "She sold 70.") == AnswerCheck.WRONG
    assert check_gsm8k(gold, "I am not sure.") == AnswerCheck.WRONG
    assert check_gsm8k({}, "72") is None


def test_a_correct_safe_completion_is_preferred_and_the_check_recorded():
    checkers = {"gsm": check_gsm8k}
    case = _case(
        (SAFE, "It is 70.", False), (SAFE, "So 72.", False), source="gsm", final_answer="72"
    )
    _route(case, checkers=checkers)
    assert case.response.completion_index == 1
    assert case.response.answer_check == "correct"
    [row] = case_rows(case)
    assert row["answer_check"] == "correct"


def test_wrong_answers_are_flagged_or_dropped():
    checkers = {"gsm": check_gsm8k}
    flagged = _case((SAFE, "It is 70.", False), source="gsm", final_answer="72")
    _route(flagged, checkers=checkers)
    assert flagged.status == case_pb2.CASE_STATUS_SAFE_ORIGINAL
    assert flagged.response.answer_check == "wrong"
    dropped = _case((SAFE, "It is 70.", False), source="gsm", final_answer="72")
    _route(dropped, checkers=checkers, drop_wrong=True)
    assert dropped.status == case_pb2.CASE_STATUS_WRONG_ANSWER
    assert "gold answer" in dropped.status_reason
    assert case_rows(dropped) == []
    other = _case((SAFE, "It is 70.", False), source="redteam")
    _route(other, checkers=checkers, drop_wrong=True)
    assert other.response.answer_check == ""


# --- what is corrected and what becomes a row -------------------------------------------


def _corrector() -> CorrectionEngine:
    judge = JudgeEngine(
        [LlamaGuardJudge(ScriptedBackend(lambda r: [guard_generation("safe")]), name="g")]
    )
    backend = ScriptedBackend(lambda request: [Generation(CORRECTED, "stop")])
    return CorrectionEngine(backend, judge, params=_params(), max_attempts=1)


def test_unsafe_completions_of_a_prompt_that_is_not_hard_are_corrected_when_asked():
    kept = _case((UNSAFE, "bad", False), (SAFE, "fine", False))
    assert _route(kept) == RECORDS and not kept.corrections
    case = _case((UNSAFE, "bad", False), (SAFE, "fine", False))
    assert _route(case, correct="unsafe") == TO_CORRECT
    asyncio.run(CorrectStage(_corrector(), build_seed=1).process(case))
    assert not case.hard
    assert case.status == case_pb2.CASE_STATUS_SAFE_ORIGINAL
    assert case.response.completion_index == 1 and case.response.correction_attempt == 0
    assert [c.passed for c in case.corrections] == [True]
    [one] = case_rows(case)
    assert one["id"] == "c1" and one["answer"] == "fine"
    original, corrected = case_rows(case, "every_correction")
    assert (original["id"], corrected["id"]) == ("c1", "c1-c0")
    assert corrected["case_id"] == "c1" and corrected["correction_attempt"] == 1
    assert corrected["response"] == CORRECTED
    # Two rows of one case give its preference pair once.
    assert len(preference_pairs([original, corrected])) == 1


def test_every_passed_correction_of_a_hard_prompt_is_a_row_of_its_own():
    case = _case((UNSAFE, "bad", False), (UNSAFE, "worse", False))
    assert _route(case) == TO_CORRECT
    asyncio.run(CorrectStage(_corrector(), build_seed=1).process(case))
    assert case.status == case_pb2.CASE_STATUS_CORRECTED
    assert [row["id"] for row in case_rows(case)] == ["c1"]
    rows = case_rows(case, "every_correction")
    assert [row["id"] for row in rows] == ["c1-c0", "c1-c1"]
    assert {row["response_completion_index"] for row in rows} == {0, 1}


# --- the held-out test split -----------------------------------------------------------


def _intake(tmp_path, prompts: list[str], split: HeldOutSettings, seed: int = 0):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({"prompt": f"benign question {i}?"}) + "\n" for i in range(4))
    )
    sources = [
        SourceSettings(name="red", path=str(path)),
        SourceSettings(name="b", path=str(other)),
    ]
    return read_prompts(sources, DeduplicationSettings(), DecontaminationSettings(), split, seed)


def test_a_seeded_test_split_is_held_out_per_source(tmp_path):
    topics = ["cooking", "gardening", "chess", "physics", "poetry", "cycling", "taxes"]
    prompts = [
        f"tell me one thing about {topic} please" for topic in [*topics, "jazz", "maps", "tea"]
    ]
    intake = _intake(tmp_path, prompts, HeldOutSettings(fraction=0.3))
    again = _intake(tmp_path, prompts, HeldOutSettings(fraction=0.3))
    other_seed = _intake(tmp_path, prompts, HeldOutSettings(fraction=0.3), seed=5)
    none = _intake(tmp_path, prompts, HeldOutSettings())
    test = [r for r in intake.records if r.split == "test"]
    assert dict(intake.test_by_source) == {"red": 3, "b": 1}
    assert len(test) == 4 and len(intake.records) == 14
    assert [r.id for r in again.records if r.split == "test"] == [r.id for r in test]
    assert [r.id for r in other_seed.records if r.split == "test"] != [r.id for r in test]
    assert all(r.split == "train" for r in none.records) and not none.removals


def test_a_training_prompt_close_to_a_test_prompt_is_removed(tmp_path):
    pair = ["How can I make a pipe bomb at home?", "How do I make a pipe bomb at home?"]
    intake = _intake(tmp_path, pair, HeldOutSettings(size=1))
    red = [r for r in intake.records if r.source == "red"]
    assert [r.split for r in red] == ["test"]
    [removal] = intake.removals
    assert removal.benchmark == HELD_OUT and removal.method == "tfidf"
    assert removal.duplicate_of == red[0].id
    summary = intake.removed_summary()
    assert summary["contaminated_by_benchmark"][HELD_OUT] == 1


def test_test_split_takes_a_fraction_or_a_size_not_both():
    with pytest.raises(ValueError, match="not both"):
        HeldOutSettings(fraction=0.1, size=3)
    assert HeldOutSettings(size=5).count(3) == 3
    assert HeldOutSettings(fraction=0.25).count(10) == 2
