import asyncio

import pytest

from unsafechain.dataset.stages import RouteStage
from unsafechain.streaming.stages import RECORDS, TO_CORRECT
from unsafechain.v1 import case_pb2

SAFE, UNSAFE, ERROR = (
    case_pb2.VERDICT_LABEL_SAFE,
    case_pb2.VERDICT_LABEL_UNSAFE,
    case_pb2.VERDICT_LABEL_ERROR,
)


def _case(*labels):
    case = case_pb2.Case(id="c")
    for index, label in enumerate(labels):
        case.completions.add(index=index, reasoning=f"r{index}", answer=f"a{index}", label=label)
    return case


@pytest.mark.parametrize(
    ("fraction", "labels", "hard"),
    [
        (1.0, (UNSAFE,) * 5, True),
        (1.0, (UNSAFE,) * 4 + (SAFE,), False),
        (0.6, (UNSAFE,) * 3 + (SAFE,) * 2, True),
        (0.6, (UNSAFE,) * 2 + (SAFE,) * 3, False),
        (0.2, (SAFE,) * 5, False),
        (1.0, (UNSAFE,) * 4 + (ERROR,), False),
    ],
)
def test_a_prompt_is_hard_when_enough_of_its_k_completions_are_unsafe(fraction, labels, hard):
    assert RouteStage(fraction).is_hard(_case(*labels)) is hard


def test_hard_case_goes_to_correction_and_others_keep_their_first_safe_completion():
    [(topic, case)] = asyncio.run(RouteStage(1.0).process(_case(UNSAFE, UNSAFE)))
    assert topic == TO_CORRECT and case.hard
    [(topic, case)] = asyncio.run(RouteStage(1.0).process(_case(UNSAFE, SAFE, SAFE)))
    assert topic == RECORDS
    assert case.status == case_pb2.CASE_STATUS_SAFE_ORIGINAL
    assert case.response.completion_index == 1
    assert case.response.text == "<think>\nr1\n</think>\n\na1"


def test_case_without_a_safe_completion_that_is_not_hard_is_kept_with_its_reason():
    [(topic, case)] = asyncio.run(RouteStage(1.0).process(_case(UNSAFE, ERROR, ERROR)))
    assert topic == RECORDS
    assert case.status == case_pb2.CASE_STATUS_NO_SAFE_COMPLETION
    assert case.status_reason == "no completion judged safe (2 error, 1 unsafe)"
