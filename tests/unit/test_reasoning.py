import pytest

from unsafechain.domain.reasoning import format_reasoning, split_reasoning


@pytest.mark.parametrize(
    ("text", "reasoning", "answer", "has_open", "has_close"),
    [
        ("<think>\nplan\n</think>\n\nDone.", "plan", "Done.", True, True),
        ("plan</think>Done.", "plan", "Done.", False, True),
        ("<think>plan, cut off", "plan, cut off", "", True, False),
        ("Just an answer.", "", "Just an answer.", False, False),
        ("<think></think>A", "", "A", True, True),
        ("", "", "", False, False),
    ],
)
def test_split_tolerates_missing_tags(text, reasoning, answer, has_open, has_close):
    split = split_reasoning(text)
    assert (split.reasoning, split.answer) == (reasoning, answer)
    assert (split.has_open, split.has_close) == (has_open, has_close)


def test_rendered_form_splits_back_to_the_same_parts():
    text = format_reasoning("think", "answer")
    assert text == "<think>\nthink\n</think>\n\nanswer"
    split = split_reasoning(text)
    assert (split.reasoning, split.answer, split.has_open, split.has_close) == (
        "think",
        "answer",
        True,
        True,
    )
