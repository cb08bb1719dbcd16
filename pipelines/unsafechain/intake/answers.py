"""Checking a model's answer to a benign prompt against the gold answer its source keeps.

Benign prompts are never hard, so their training rows are the model's own answers;
where the source's loader keeps a gold answer and a checker exists, a wrong answer can
be flagged or dropped instead of trained on.

- ``gsm8k``: the final number of the answer (``\\boxed{…}``, ``#### …``, "the answer
  is …", else the last number written) equals the reference's ``#### …`` number.
- ``mbpp``: the answer's code (its last fenced Python block, else the whole answer)
  runs with the task's ``test_list`` asserts in the sandbox (:mod:`unsafechain.sandbox`);
  it is correct when every assert passes in time.
- ``truthfulqa``: the gold is a free-text best answer, which no string rule matches
  reliably; not checked.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation

from unsafechain.sandbox.runner import Limits, Sandbox


class AnswerCheck(enum.StrEnum):
    """What checking an answer found."""

    CORRECT = "correct"
    WRONG = "wrong"


Checker = Callable[[Mapping[str, str], str], AnswerCheck | None]
"""Checks an answer against a prompt's metadata; None when the prompt has no gold."""

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(rf"####\s*({_NUMBER})")
_STATED = re.compile(rf"answer(?: is|:)\s*\**\s*({_NUMBER})", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def _as_number(text: str) -> Decimal | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def final_number(answer: str) -> Decimal | None:
    """The number an answer gives as final: boxed, after ``####``, stated as "the
    answer is", else the last number written; None when it writes none."""
    for pattern in (_BOXED, _HASHES, _STATED):
        found = pattern.findall(answer)
        if found:
            numbers = _ANY_NUMBER.findall(found[-1])
            if numbers:
                return _as_number(numbers[-1])
    numbers = _ANY_NUMBER.findall(answer)
    return _as_number(numbers[-1]) if numbers else None


def check_gsm8k(metadata: Mapping[str, str], answer: str) -> AnswerCheck | None:
    """Final-number match against GSM8K's ``#### <answer>``."""
    gold = _as_number(metadata.get("final_answer", ""))
    if gold is None:
        return None
    given = final_number(answer)
    return AnswerCheck.CORRECT if given is not None and given == gold else AnswerCheck.WRONG


_FENCED = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def code_blocks(answer: str) -> list[str]:
    """The fenced (```` ```python ````, ```` ```py ```` or bare) code blocks of an
    answer, in order."""
    return _FENCED.findall(answer)


def answer_code(answer: str) -> str:
    """The code an answer gives: its last fenced block, else the whole answer."""
    blocks = code_blocks(answer)
    return blocks[-1] if blocks else answer


@functools.cache
def code_sandbox() -> Sandbox:
    """The sandbox MBPP answers run in (made once; raises ``SandboxError`` where
    bubblewrap cannot run)."""
    return Sandbox(Limits(wall_seconds=10, cpu_seconds=10, memory_bytes=1 << 30))


def mbpp_program(answer: str, tests: Sequence[str], setup: str = "") -> str:
    """The program that checks an answer to an MBPP task: the answer's code, the task's
    ``test_setup_code`` and its asserts; it exits 0 when every assert passes."""
    parts = [answer_code(answer), setup, "\n".join(tests)]
    return "\n\n".join(part for part in parts if part.strip()) + "\n"


def check_mbpp(metadata: Mapping[str, str], answer: str) -> AnswerCheck | None:
    """The answer's code against the task's asserts, run in the sandbox. Blocks for
    as long as the run takes (at most the sandbox's wall-clock limit)."""
    try:
        tests = json.loads(metadata.get("test_list", ""))
    except ValueError:
        return None
    if not isinstance(tests, list) or not tests:
        return None
    program = mbpp_program(answer, [str(test) for test in tests])
    return AnswerCheck.CORRECT if code_sandbox().run_python(program).ok else AnswerCheck.WRONG


CHECKERS: dict[str, Checker] = {"gsm8k": check_gsm8k, "mbpp": check_mbpp}
"""The answer checker of each loader that has one, by loader name."""
