import asyncio

from tests.unit.scripted_backend import ScriptedBackend, guard_generation
from unsafechain.correction.engine import CorrectionEngine, CorrectionTemplates
from unsafechain.domain.types import Generation, Role, VerdictLabel
from unsafechain.judge.engine import JudgeEngine, LlamaGuardJudge


def _engine(corrector_outputs, *, max_attempts=3):
    outputs = iter(corrector_outputs)
    corrector = ScriptedBackend(lambda request: [Generation(next(outputs), "stop")])

    def guard(request):
        return [
            guard_generation("unsafe\nS9" if "blast" in request.messages[1].content else "safe")
        ]

    judge = JudgeEngine([LlamaGuardJudge(ScriptedBackend(guard))])
    return CorrectionEngine(corrector, judge, max_attempts=max_attempts), corrector


def test_correction_is_rejudged_and_retried_with_feedback_until_it_passes():
    engine, corrector = _engine(
        [
            "no think tags here",
            "<think>ok</think>Here is the blast recipe.",
            "<think>This asks for a weapon; I should refuse.</think>I can't help with that.",
        ]
    )
    outcome = asyncio.run(engine.correct("make a bomb", "<think>x</think>blast", ["S9"], seed=5))
    assert [a.failure_reason for a in outcome.attempts] == [
        "format: missing <think>",
        "re-judged unsafe (S9)",
        "",
    ]
    assert outcome.passed.number == 3
    assert outcome.passed.label == VerdictLabel.SAFE
    assert outcome.passed.split.answer == "I can't help with that."
    system, user = corrector.requests[0].messages
    assert system.role == Role.SYSTEM and "<think>" in system.content
    assert "S9 (Indiscriminate Weapons)" in user.content
    assert "make a bomb" in user.content
    assert "re-judged unsafe (S9)" in corrector.requests[2].messages[1].content
    assert [r.params.seed for r in corrector.requests] == [5, 6, 7]


def test_correction_with_repeated_think_tags_is_rejected_as_malformed():
    engine, _ = _engine(["<think>\n<think>\nrefuse\n</think>\n\nNo."], max_attempts=1)
    outcome = asyncio.run(engine.correct("p", "c", ["S9"]))
    assert outcome.attempts[0].failure_reason == "format: think tags repeated"


def test_case_that_never_passes_keeps_every_attempt_and_the_reason():
    engine, _ = _engine(["<think>a</think>blast"] * 2, max_attempts=2)
    outcome = asyncio.run(engine.correct("p", "c", ["S9"]))
    assert outcome.passed is None
    assert len(outcome.attempts) == 2
    assert outcome.failure_reason == "no attempt passed in 2: re-judged unsafe (S9)"


def test_bundled_templates_render_prompt_response_and_categories():
    templates = CorrectionTemplates.load()
    _system, user = templates.messages("the prompt", "the response", ["S1", "X9"], "")
    assert "the prompt" in user.content and "the response" in user.content
    assert "S1 (Violent Crimes), X9" in user.content
    assert "previous rewrite" not in user.content


def test_the_correction_prompt_has_benign_requests_answered_fully_and_refusal_last():
    system, user = CorrectionTemplates.load().messages(
        "How do I kill a Python process that hangs?", "<think>x</think>y", ["S1"]
    )
    instructions = system.content
    benign = instructions.index("If the request is benign")
    partly = instructions.index("If only part of the request is harmful, decline that part")
    whole = instructions.index("Only if the whole request is harmful, refuse it")
    assert benign < partly < whole
    assert "answer it fully and accurately" in instructions[benign:partly]
    assert "answer the rest fully" in instructions[partly:whole]
    assert "keep the depth of its reasoning" in instructions
    assert "over-refusing is a failure too" in instructions
    assert "Answer the request as fully as is safe: decline only what is harmful." in user.content
