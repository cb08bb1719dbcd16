"""Scoring a model's answer to a capability benchmark item.

The answer is the completion's answer part — what follows ``</think>``
(:func:`unsafechain.domain.reasoning.split_reasoning`); the reasoning is never scored,
so a correct number reached only in the reasoning does not count.

- ``final_number`` (GSM8K): the answer's final number (boxed, after ``####``, "the
  answer is", else the last number) equals the gold ``#### N``, as the build checks
  GSM8K answers (:func:`unsafechain.intake.answers.check_gsm8k`).
- ``math_equivalence`` (MATH-500): the last ``\\boxed{}`` of the answer (else the answer
  text) is mathematically equivalent to the gold answer, by ``math_verify.parse`` and
  ``math_verify.verify``: ``\\frac{1}{2}`` and ``0.5`` are the same answer.
- ``humaneval_tests`` (HumanEval): the answer's code after the problem's prompt, then
  the problem's test and ``check(entry_point)``, run in the sandbox; exit 0 passes.
- ``mbpp_tests`` (MBPP): the answer's code, the task's setup code and asserts, run in
  the sandbox (:func:`unsafechain.intake.answers.mbpp_program`, as the build checks).
- ``choice_letter`` (TruthfulQA MC): the letter the answer chooses equals the correct
  one.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from unsafechain.evaluation.benchmarks import LETTERS, Benchmark, BenchmarkItem
from unsafechain.intake.answers import (
    AnswerCheck,
    check_gsm8k,
    code_blocks,
    final_number,
    mbpp_program,
)
from unsafechain.sandbox.runner import Sandbox, SandboxError

MATH_TIMEOUT_SECONDS = 5
"""How long parsing or comparing one MATH answer may take (main thread only: math-verify
times out with SIGALRM, which other threads cannot set)."""


@dataclass(frozen=True)
class Score:
    """What scoring one answer found.

    Attributes:
        correct: Whether the answer is correct; None when it could not be scored (the
            sandbox itself failed, the gold answer cannot be parsed) — the metrics count
            that as not correct and report it.
        detail: What was compared or run, in a few words.
    """

    correct: bool | None
    detail: str


Scorer = Callable[[BenchmarkItem, str, Sandbox | None], Score]
"""Scores an answer to an item; code scorers run it in the sandbox."""


def score_answer(
    benchmark: Benchmark, item: BenchmarkItem, answer: str, *, sandbox: Sandbox | None = None
) -> Score:
    """Score ``answer`` — the completion's answer part, after ``</think>`` — to ``item``.

    Args:
        benchmark: A capability benchmark.
        item: One of its items.
        answer: The answer part of the model's completion.
        sandbox: Where code scorers (HumanEval, MBPP) run the answer's code.

    Raises:
        ValueError: The benchmark is judged, not scored; its scorer is unknown; or a
            code scorer has no sandbox.
    """
    if benchmark.scorer is None:
        raise ValueError(f"benchmark {benchmark.name!r} is {benchmark.kind}: judged, not scored")
    scorer = SCORERS.get(benchmark.scorer)
    if scorer is None:
        raise ValueError(f"benchmark {benchmark.name!r}: unknown scorer {benchmark.scorer!r}")
    if benchmark.scorer in CODE_SCORERS and sandbox is None:
        raise ValueError(
            f"benchmark {benchmark.name!r}: scorer {benchmark.scorer!r} runs code, "
            "so it needs a sandbox"
        )
    return scorer(item, answer, sandbox)


# --- GSM8K -------------------------------------------------------------------------------


def _final_number(item: BenchmarkItem, answer: str, sandbox: Sandbox | None) -> Score:
    gold = item.reference["final_answer"]
    check = check_gsm8k({"final_answer": gold}, answer)
    if check is None:
        return Score(None, f"the gold answer {gold!r} is not a number")
    given = final_number(answer)
    if given is None:
        return Score(False, f"no number in the answer (expected {gold})")
    return Score(check == AnswerCheck.CORRECT, f"final number {given} (expected {gold})")


# --- MATH-500 ------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{…}`` of ``text`` (braces may nest),
    or None when it has none."""
    start = text.rfind("\\boxed")
    while start >= 0:
        at = start + len("\\boxed")
        while at < len(text) and text[at] == " ":
            at += 1
        if at < len(text) and text[at] == "{":
            depth = 0
            for end in range(at, len(text)):
                if text[end] == "{":
                    depth += 1
                elif text[end] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[at + 1 : end]
        # Cut off before it closed: the one before may be whole.
        start = text.rfind("\\boxed", 0, start)
    return None


def _math_equivalence(item: BenchmarkItem, answer: str, sandbox: Sandbox | None) -> Score:
    import math_verify

    # math-verify bounds its work with SIGALRM, which only the main thread may set.
    seconds = (
        MATH_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    )
    gold_text = item.reference["answer"]
    gold = math_verify.parse(f"${gold_text}$", parsing_timeout=seconds)
    if not gold:
        return Score(None, f"the gold answer {gold_text!r} cannot be parsed")
    boxed = last_boxed(answer)
    given_text = answer if boxed is None else f"${boxed}$"
    given = math_verify.parse(given_text, parsing_timeout=seconds)
    if not given:
        return Score(False, f"no answer found (expected {gold_text})")
    shown = boxed if boxed is not None else given[-1]
    correct = math_verify.verify(gold, given, timeout_seconds=seconds)
    relation = "equals" if correct else "does not equal"
    return Score(bool(correct), f"{shown} {relation} {gold_text}")


# --- HumanEval and MBPP ----------------------------------------------------------------------


def humaneval_program(item: BenchmarkItem, answer: str) -> str:
    """The program that checks an answer to a HumanEval problem.

    The code is the last fenced block that defines the entry point, else the last
    block, else the whole answer. A body alone continues the problem's prompt; a whole
    function comes after the prompt, replacing its stub while keeping the prompt's
    imports and helper functions. The problem's test and ``check(entry_point)`` follow.
    """
    reference = item.reference
    entry = reference["entry_point"]
    defines = re.compile(rf"^def\s+{re.escape(entry)}\s*\(", re.MULTILINE)
    blocks = code_blocks(answer)
    defining = [block for block in blocks if defines.search(block)]
    code = defining[-1] if defining else (blocks[-1] if blocks else answer)
    prompt = reference["prompt"]
    head = prompt + "\n" if defines.search(code) else prompt
    return f"{head}{code}\n\n{reference['test']}\n\ncheck({entry})\n"


def _run(sandbox: Sandbox | None, program: str) -> Score:
    assert sandbox is not None  # score_answer gives code scorers one
    try:
        result = sandbox.run_python(program)
    except SandboxError as error:
        return Score(None, f"the sandbox failed: {error}")
    return Score(result.ok, "tests passed" if result.ok else f"tests failed: {result.reason}")


def _humaneval_tests(item: BenchmarkItem, answer: str, sandbox: Sandbox | None) -> Score:
    return _run(sandbox, humaneval_program(item, answer))


def _mbpp_tests(item: BenchmarkItem, answer: str, sandbox: Sandbox | None) -> Score:
    reference = item.reference
    program = mbpp_program(answer, reference["test_list"], reference.get("test_setup_code", ""))
    return _run(sandbox, program)


# --- TruthfulQA multiple choice ------------------------------------------------------------


def chosen_letter(answer: str, letters: str) -> str | None:
    """The choice letter an answer gives, among ``letters``, or None.

    In order: an "answer" statement (``Answer: C``, ``the answer is (C)``; the last
    one); a letter opening the answer (``C.``, ``(C)``, ``**C**``, ``C`` alone); a letter
    in parentheses (the last); "option C" / "choice C"; else the last standalone capital
    among ``letters``, not counting an "A" or "I" followed by a lower-case word (the
    article, the pronoun: "I think", "A cat").
    """
    valid = f"[{re.escape(letters)}]"
    alone = r"(?![A-Za-z0-9'])"
    patterns = (
        rf"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*\**\s*\(?({valid})\)?{alone}",
        rf"^\s*\**\s*\(?({valid})(?:[.):\]*]|\s*$|\s+(?=[^\sa-z]))",
        rf"\(({valid})\)",
        rf"(?i:option|choice)\s+\(?({valid})\)?{alone}",
    )
    for pattern in patterns:
        found = re.findall(pattern, answer)
        if found:
            return found[-1]
    standalone = [
        match.group(1)
        for match in re.finditer(rf"(?<![A-Za-z0-9'])({valid}){alone}", answer)
        if not (match.group(1) in "AI" and re.match(r"\s+[a-z]", answer[match.end() :]))
    ]
    return standalone[-1] if standalone else None


def _choice_letter(item: BenchmarkItem, answer: str, sandbox: Sandbox | None) -> Score:
    correct = item.reference["correct"]
    letters = LETTERS[: len(item.reference["choices"])]
    given = chosen_letter(answer, letters)
    if given is None:
        return Score(False, f"no choice letter in the answer (expected {correct})")
    return Score(given == correct, f"chose {given} (expected {correct})")


SCORERS: dict[str, Scorer] = {
    "final_number": _final_number,
    "math_equivalence": _math_equivalence,
    "humaneval_tests": _humaneval_tests,
    "mbpp_tests": _mbpp_tests,
    "choice_letter": _choice_letter,
}
"""Every scorer by the name a capability benchmark gives."""

CODE_SCORERS = frozenset({"humaneval_tests", "mbpp_tests"})
"""The scorers that run the answer's code, and so need a sandbox."""
