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


def test_an_opening_tag_counts_only_at_the_start_of_the_text():
    text = "To mark reasoning, use the <think> tag in your template."
    split = split_reasoning(text)
    assert (split.reasoning, split.answer, split.has_open) == ("", text, False)
    split = split_reasoning("  \n<think>plan</think>answer")
    assert (split.reasoning, split.answer, split.has_open) == ("plan", "answer", True)


def test_text_after_a_prompt_that_opened_the_think_section_is_reasoning_until_closed():
    cut = split_reasoning("Okay, the user wants a plan. First I", opened=True)
    assert (cut.reasoning, cut.answer) == ("Okay, the user wants a plan. First I", "")
    assert cut.opened_by_prompt and cut.in_reasoning and not cut.has_open
    whole = split_reasoning("plan\n</think>\n\nanswer", opened=True)
    assert (whole.reasoning, whole.answer) == ("plan", "answer")
    # A model that writes the tag again after the template's.
    again = split_reasoning("<think>\nplan\n</think>\n\nanswer", opened=True)
    assert (again.reasoning, again.answer, again.has_open) == ("plan", "answer", True)
