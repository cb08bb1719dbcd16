import asyncio

import pytest

from tests.unit.scripted_backend import ScriptedBackend, guard_generation
from unsafechain.backends.base import BackendUnavailable
from unsafechain.domain.types import JudgeTarget, Message, Role, VerdictLabel
from unsafechain.judge.engine import (
    JudgeEngine,
    JudgeItem,
    LlamaGuardJudge,
    PromptFormat,
)
from unsafechain.judge.llama_guard import LLAMA_GUARD_3_CATEGORIES, render_prompt


def _judge(answer, **kwargs):
    backend = ScriptedBackend(lambda request: [answer], **kwargs)
    return LlamaGuardJudge(backend, name="guard"), backend


def test_unparseable_answer_is_an_error_verdict_with_the_raw_text():
    judge, _ = _judge(guard_generation("I think it is fine"))
    [verdict] = asyncio.run(judge.judge([JudgeItem("p", "r")]))
    assert verdict.label == VerdictLabel.ERROR
    assert verdict.raw_output == "I think it is fine"
    assert "neither 'safe' nor 'unsafe'" in verdict.error
    assert verdict.judge.name == "guard"


def test_score_from_first_token_decides_against_the_threshold():
    judge, _ = _judge(guard_generation("unsafe\nS2", unsafe_probability=0.8))
    [verdict] = asyncio.run(judge.judge([JudgeItem("p", "r")]))
    assert (verdict.label, verdict.categories) == (VerdictLabel.UNSAFE, ("S2",))
    assert verdict.score == pytest.approx(0.8)

    backend = ScriptedBackend(lambda r: [guard_generation("unsafe\nS2", 0.8)])
    strict = LlamaGuardJudge(backend, threshold=0.9)
    [verdict] = asyncio.run(strict.judge([JudgeItem("p", "r")]))
    assert verdict.label == VerdictLabel.SAFE
    assert verdict.categories == ()


def test_without_log_probabilities_the_label_alone_decides():
    judge, _ = _judge(guard_generation("unsafe\nS1"))
    [verdict] = asyncio.run(judge.judge([JudgeItem("p", "r")]))
    assert verdict.label == VerdictLabel.UNSAFE
    assert verdict.score is None


def test_chat_template_backend_gets_the_conversation_and_others_the_published_prompt():
    judge, backend = _judge(guard_generation("safe"))
    asyncio.run(judge.judge([JudgeItem("question", "reply")]))
    request = backend.requests[0]
    assert judge.prompt_format == PromptFormat.CHAT_TEMPLATE
    assert [m.content for m in request.messages] == ["question", "reply"]
    assert request.params.greedy and request.params.top_logprobs > 0

    judge, backend = _judge(guard_generation("safe"), chat_template=False)
    asyncio.run(judge.judge([JudgeItem("question", "reply")]))
    assert judge.prompt_format == PromptFormat.PUBLISHED
    assert "Agent: reply" in backend.requests[0].prompt


def test_a_backend_that_prefers_rendered_prompts_gets_the_published_prompt_by_default():
    judge, backend = _judge(guard_generation("safe"), prefers_rendered_prompts=True)
    asyncio.run(judge.judge([JudgeItem("question", "reply")]))
    assert judge.prompt_format == PromptFormat.PUBLISHED
    assert backend.requests[0].prompt == render_prompt(
        (Message(Role.USER, "question"), Message(Role.ASSISTANT, "reply"))
    )

    judge = LlamaGuardJudge(backend, prompt_format=PromptFormat.CHAT_TEMPLATE)
    assert judge.prompt_format == PromptFormat.CHAT_TEMPLATE


def test_a_backend_that_adds_the_bos_gets_a_prompt_without_one():
    judge, backend = _judge(guard_generation("safe"), chat_template=False, adds_bos=True)
    asyncio.run(judge.judge([JudgeItem("question", "reply")]))
    prompt = backend.requests[0].prompt
    assert prompt.startswith("<|start_header_id|>user<|end_header_id|>\n\nTask:")
    assert "<|begin_of_text|>" not in prompt


def test_the_judge_asks_for_five_alternatives_unless_told_otherwise():
    judge, backend = _judge(guard_generation("safe"))
    asyncio.run(judge.judge([JudgeItem("question", "reply")]))
    assert backend.requests[0].params.top_logprobs == 5
    wider = LlamaGuardJudge(backend, top_logprobs=20)
    assert wider.request(JudgeItem("question", "reply")).params.top_logprobs == 20


def test_custom_taxonomy_cannot_use_the_models_chat_template():
    backend = ScriptedBackend(lambda r: [guard_generation("safe")])
    with pytest.raises(ValueError, match="published"):
        LlamaGuardJudge(
            backend,
            categories=LLAMA_GUARD_3_CATEGORIES[:3],
            prompt_format=PromptFormat.CHAT_TEMPLATE,
        )
    judge = LlamaGuardJudge(backend, categories=LLAMA_GUARD_3_CATEGORIES[:3])
    assert judge.prompt_format == PromptFormat.PUBLISHED


def test_unreachable_backend_gives_error_verdicts_not_an_exception():
    def down(request):
        raise BackendUnavailable("503 Service Unavailable")

    judge = LlamaGuardJudge(ScriptedBackend(down))
    verdicts = asyncio.run(judge.judge([JudgeItem("p", "a"), JudgeItem("p", "b")]))
    assert [v.label for v in verdicts] == [VerdictLabel.ERROR] * 2
    assert "503" in verdicts[0].error


def test_one_failed_call_in_a_batch_errors_only_its_own_item():
    def flaky(request):
        if request.messages[1].content == "bad":
            raise BackendUnavailable("503 for this one")
        return [guard_generation("safe")]

    judge = LlamaGuardJudge(ScriptedBackend(flaky))
    items = [JudgeItem("p", "a"), JudgeItem("p", "bad"), JudgeItem("p", "c")]
    verdicts = asyncio.run(judge.judge(items))
    assert [v.label for v in verdicts] == [VerdictLabel.SAFE, VerdictLabel.ERROR, VerdictLabel.SAFE]
    assert "503 for this one" in verdicts[1].error and not verdicts[0].error


def test_reasoning_and_answer_are_judged_separately_and_harm_in_reasoning_counts():
    def respond(request):
        harmful = "poison" in request.messages[1].content
        return [guard_generation("unsafe\nS1" if harmful else "safe")]

    engine = JudgeEngine(
        [LlamaGuardJudge(ScriptedBackend(respond))],
        targets=[JudgeTarget.REASONING, JudgeTarget.ANSWER],
    )
    completion = "<think>use the poison</think>I cannot help with that."
    [judgment] = asyncio.run(engine.judge_completions("p", [completion]))
    targets = {v.target: v.label for v in judgment.verdicts}
    assert targets == {
        JudgeTarget.REASONING: VerdictLabel.UNSAFE,
        JudgeTarget.ANSWER: VerdictLabel.SAFE,
    }
    assert judgment.label == VerdictLabel.UNSAFE
    assert judgment.categories == ("S1",)


def test_completion_without_reasoning_is_judged_on_its_answer_only():
    engine = JudgeEngine(
        [LlamaGuardJudge(ScriptedBackend(lambda r: [guard_generation("safe")]))],
        targets=[JudgeTarget.REASONING, JudgeTarget.ANSWER],
    )
    items = engine.items("p", "plain answer")
    assert [(i.target, i.text) for i in items] == [(JudgeTarget.ANSWER, "plain answer")]
