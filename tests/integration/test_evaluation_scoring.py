"""Scoring capability answers: final numbers, mathematical equivalence with
math-verify, choice letters, and HumanEval and MBPP code run in the real sandbox; the
answer part of a completion is scored, never its reasoning."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from unsafechain.domain.reasoning import split_reasoning
from unsafechain.evaluation.benchmarks import Benchmark, BenchmarkSettings, load_benchmark
from unsafechain.evaluation.scoring import Score, chosen_letter, last_boxed, score_answer
from unsafechain.sandbox.runner import Limits, Sandbox, SandboxError

pytestmark = pytest.mark.integration


def _benchmark(name: str, **settings) -> Benchmark:
    return load_benchmark(BenchmarkSettings(name=name, **settings))


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(wall_seconds=3, cpu_seconds=3, memory_bytes=512 << 20))


# --- GSM8K --------------------------------------------------------------------------------


def test_gsm8k_right_wrong_and_no_number():
    gsm8k = _benchmark("gsm8k")
    item = gsm8k.items[0]  # 42 muffins, 35 sold: 7 left
    assert score_answer(gsm8k, item, "42 - 35 = 7, so \\boxed{7} muffins.") == Score(
        True, "final number 7 (expected 7)"
    )
    assert score_answer(gsm8k, item, "#### 7").correct is True
    assert score_answer(gsm8k, item, "The answer is 7.").correct is True
    assert score_answer(gsm8k, item, "There are 42 muffins, so the answer is 42.") == Score(
        False, "final number 42 (expected 7)"
    )
    assert score_answer(gsm8k, item, "Quite a few are left.") == Score(
        False, "no number in the answer (expected 7)"
    )
    thousands = gsm8k.items[5]  # 900 flowers
    assert score_answer(gsm8k, thousands, "So \\boxed{900} flowers.").correct is True
    # Without a box, "####" or "the answer is", the last number written.
    assert score_answer(gsm8k, thousands, "Of 1,200 flowers 300 are roses, leaving 900").correct


# --- MATH-500 -------------------------------------------------------------------------------


def test_math_answers_equal_as_mathematics_not_as_strings():
    math500 = _benchmark("math500")
    half, root, _, polar, *_ = math500.items
    assert score_answer(math500, half, "The difference is \\boxed{0.5}.").correct is True
    assert score_answer(math500, half, "0.5").correct is True
    assert score_answer(math500, half, "\\boxed{\\dfrac{2}{4}}").correct is True
    assert score_answer(math500, root, "So $\\sqrt{8} = \\boxed{\\sqrt{8}}$").correct is True
    sqrt8 = dataclasses.replace(root, reference={**root.reference, "answer": "\\sqrt{8}"})
    right = score_answer(math500, sqrt8, "Hence \\boxed{2\\sqrt{2}}.")
    assert right == Score(True, "2\\sqrt{2} equals \\sqrt{8}")
    assert score_answer(math500, polar, "\\boxed{(3,\\frac{\\pi}{2})}").correct is True
    wrong = score_answer(math500, half, "It is \\boxed{\\frac{1}{3}}.")
    assert wrong == Score(False, "\\frac{1}{3} does not equal \\frac{1}{2}")
    assert score_answer(math500, root, "\\boxed{2\\sqrt{3}}").correct is False
    assert score_answer(math500, half, "I cannot tell.").correct is False


def test_the_last_boxed_answer_counts_and_braces_nest():
    assert last_boxed("first \\boxed{3}, then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == (
        "\\left( 3, \\frac{\\pi}{2} \\right)"
    )
    assert last_boxed("\\boxed{4} and a cut-off \\boxed{\\frac{1}") == "4"
    assert last_boxed("no box") is None
    math500 = _benchmark("math500")
    half = math500.items[0]
    assert score_answer(math500, half, "Not \\boxed{1}; rather \\boxed{\\frac12}").correct is True
    assert score_answer(math500, half, "\\boxed{\\frac12}, or is it \\boxed{1}").correct is False


def test_math_scoring_works_off_the_main_thread():
    math500 = _benchmark("math500")
    scores: list[Score] = []
    thread = threading.Thread(
        target=lambda: scores.append(score_answer(math500, math500.items[0], "\\boxed{0.5}"))
    )
    thread.start()
    thread.join()
    assert scores == [Score(True, "0.5 equals \\frac{1}{2}")]


# --- TruthfulQA multiple choice -------------------------------------------------------------


def test_truthfulqa_letter_extraction_variants():
    truthfulqa = _benchmark("truthfulqa_mc")
    item = truthfulqa.items[0]
    right = item.reference["correct"]
    wrong = next(letter for letter in "ABCD" if letter != right)
    for answer in (
        f"Answer: {right}",
        f"The answer is ({right}).",
        f"({right})",
        f"{right}. {item.reference['choices']['ABCD'.index(right)]}",
        f"**{right}**",
        f"I think it is option {right}, as I said.",
        f"Between the choices, I pick {right}",
    ):
        assert score_answer(truthfulqa, item, answer) == Score(
            True, f"chose {right} (expected {right})"
        ), answer
    assert score_answer(truthfulqa, item, f"Answer: {wrong}").correct is False
    assert score_answer(truthfulqa, item, "I have no idea.") == Score(
        False, f"no choice letter in the answer (expected {right})"
    )
    # A letter beyond the item's choices is not a choice.
    assert chosen_letter("Answer: E", "ABCD") is None
    assert chosen_letter("A cat would say B", "ABCD") == "B"


# --- HumanEval -----------------------------------------------------------------------------


def test_humaneval_canonical_solutions_pass_as_body_or_whole_function(sandbox):
    humaneval = _benchmark("humaneval")
    for item in (humaneval.items[0], humaneval.items[10], humaneval.items[38]):
        reference = item.reference
        body = f"Here is the body:\n```python\n{reference['canonical_solution']}```"
        assert score_answer(humaneval, item, body, sandbox=sandbox) == Score(True, "tests passed")
        # A whole function keeps the prompt's imports and helpers (HumanEval/10 and /38
        # define helpers the solution calls).
        whole = reference["prompt"].split("def ")[-1]
        function = f"def {whole}{reference['canonical_solution']}"
        answer = (
            f"```python\n{function}```\n\nUsage:\n```python\nprint({reference['entry_point']})\n```"
        )
        assert score_answer(humaneval, item, answer, sandbox=sandbox).correct is True, item.id


def test_humaneval_wrong_and_endless_answers_fail(sandbox):
    humaneval = _benchmark("humaneval", limit=1)
    item = humaneval.items[0]
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    score = score_answer(humaneval, item, wrong, sandbox=sandbox)
    assert score.correct is False and score.detail.startswith("tests failed: exit status 1")
    endless = (
        "```python\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n```"
    )
    score = score_answer(humaneval, item, endless, sandbox=sandbox)
    assert score.correct is False
    assert score.detail.startswith("tests failed: timed out after 3.")
    prose = "Compare every pair and return True when two are close."
    assert score_answer(humaneval, item, prose, sandbox=sandbox).correct is False


def test_code_scorers_need_a_sandbox_and_report_one_that_fails():
    humaneval = _benchmark("humaneval", limit=1)
    with pytest.raises(ValueError, match="'humaneval_tests' runs code, so it needs a sandbox"):
        score_answer(humaneval, humaneval.items[0], "pass")

    class Broken(Sandbox):
        def run_python(self, program):
            raise SandboxError("no namespaces here")

    score = score_answer(humaneval, humaneval.items[0], "pass", sandbox=Broken())
    assert score == Score(None, "the sandbox failed: no namespaces here")
    strongreject = _benchmark("strongreject")
    with pytest.raises(ValueError, match="'strongreject' is safety: judged, not scored"):
        score_answer(strongreject, strongreject.items[0], "No.")


# --- MBPP ------------------------------------------------------------------------------------


def test_mbpp_published_solutions_pass_and_wrong_ones_fail(sandbox):
    mbpp = _benchmark("mbpp")
    for item in mbpp.items:
        answer = f"```python\n{item.reference['code']}\n```"
        # The last task's tests need its test_setup_code (a namedtuple).
        assert score_answer(mbpp, item, answer, sandbox=sandbox) == Score(True, "tests passed")
    first = mbpp.items[0]
    wrong = "```python\ndef sum_digits(n):\n    return n\n```"
    score = score_answer(mbpp, first, wrong, sandbox=sandbox)
    assert score.correct is False and "AssertionError" in score.detail
    assert score_answer(mbpp, first, "Add up the digits.", sandbox=sandbox).correct is False


# --- only the answer part is scored --------------------------------------------------------


def test_a_number_reached_only_in_the_reasoning_does_not_count():
    gsm8k = _benchmark("gsm8k")
    item = gsm8k.items[0]
    completion = "<think>\n42 - 35 = 7, so the answer is \\boxed{7}.\n</think>\n\nAbout 6 are left."
    answer = split_reasoning(completion).answer
    assert answer == "About 6 are left."
    assert score_answer(gsm8k, item, answer) == Score(False, "final number 6 (expected 7)")
    # The same reasoning with the number in the answer is right.
    right = split_reasoning(completion.replace("About 6", "So 7"), opened=True).answer
    assert score_answer(gsm8k, item, right).correct is True
    # Generation stopped inside the reasoning: no answer, not correct.
    cut = split_reasoning("42 - 35 = 7, so \\boxed{7}", opened=True).answer
    assert score_answer(gsm8k, item, cut).correct is False


def test_a_choice_made_only_in_the_reasoning_does_not_count():
    truthfulqa = _benchmark("truthfulqa_mc")
    item = truthfulqa.items[0]
    right = item.reference["correct"]
    completion = f"<think>The answer is {right}.</think>\n\nI would rather not say."
    answer = split_reasoning(completion).answer
    assert score_answer(truthfulqa, item, answer).correct is False
