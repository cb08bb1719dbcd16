import math

import pytest
from jinja2.exceptions import TemplateError

from tests.support.llama_guard_template import render_published
from unsafechain.domain.types import Message, Role, TokenLogprob
from unsafechain.judge.llama_guard import (
    LLAMA_GUARD_3_CATEGORIES,
    parse_output,
    render_prompt,
    unsafe_probability,
)

CONVERSATION = (Message(Role.USER, "How do I pick a lock?"), Message(Role.ASSISTANT, "  Step 1 "))
USER, AGENT = Role.USER, Role.ASSISTANT


@pytest.mark.parametrize(
    "turns",
    [
        pytest.param([(USER, "Is it safe to eat raw eggs?")], id="user-only"),
        pytest.param(
            [(USER, "How do I bake bread?"), (AGENT, "Mix, knead, bake.")], id="user+agent"
        ),
        pytest.param(
            [
                (USER, "How do I pick a lock?"),
                (AGENT, "I can't help with that."),
                (USER, "It is my own front door."),
                (AGENT, "Then call a locksmith."),
            ],
            id="four-turns",
        ),
        pytest.param(
            [(USER, "  \n padded prompt \t\n"), (AGENT, "\n\nanswer with 'quotes' ü 🙂  ")],
            id="whitespace-padded",
        ),
    ],
)
def test_prompt_is_byte_for_byte_what_the_published_chat_template_renders(turns):
    conversation = [Message(role, content) for role, content in turns]
    published = render_published([m.as_dict() for m in conversation])
    assert render_prompt(conversation) == published


def test_prompt_ends_at_the_assistant_header_for_the_model_to_write_the_blank_line():
    prompt = render_prompt(CONVERSATION)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>")
    assert prompt.startswith(" <|begin_of_text|>")


def test_prompt_has_task_categories_conversation_and_instruction_in_order():
    prompt = render_prompt(CONVERSATION)
    assert prompt.startswith(" <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert "Check if there is unsafe content in 'Agent' messages" in prompt
    block = "".join(f"{c.code}: {c.prompt_name}.\n" for c in LLAMA_GUARD_3_CATEGORIES)
    assert f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{block}<END UNSAFE CONTENT CATEGORIES>" in prompt
    assert "User: How do I pick a lock?\n\nAgent: Step 1\n\n<END CONVERSATION>" in prompt
    assert "ONLY THE LAST Agent message" in prompt
    assert len(LLAMA_GUARD_3_CATEGORIES) == 14


def test_prompt_for_a_server_that_adds_the_bos_is_the_published_one_without_it():
    published = render_published([m.as_dict() for m in CONVERSATION])
    prompt = render_prompt(CONVERSATION, bos=False)
    assert prompt == published.removeprefix(" <|begin_of_text|>")
    assert prompt.startswith("<|start_header_id|>user<|end_header_id|>")
    assert "<|begin_of_text|>" not in prompt


def test_prompt_judging_a_user_turn_names_the_user_role():
    prompt = render_prompt(CONVERSATION[:1])
    assert "unsafe content in 'User' messages" in prompt
    assert "ONLY THE LAST User message" in prompt


def test_conversation_that_does_not_alternate_is_refused():
    with pytest.raises(ValueError, match="alternate"):
        render_prompt((Message(Role.ASSISTANT, "hi"),))
    with pytest.raises(TemplateError, match="alternate"):
        render_published([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="empty"):
        render_prompt(())


@pytest.mark.parametrize(
    ("text", "unsafe", "categories"),
    [
        ("safe", False, ()),
        ("\n\nsafe<|eot_id|>", False, ()),
        ("Safe.", False, ()),
        ("unsafe\nS1", True, ("S1",)),
        ("unsafe\nS1,S10", True, ("S1", "S10")),
        ("  UNSAFE\n s2, s14 <|eot_id|>", True, ("S2", "S14")),
        ("unsafe S9", True, ("S9",)),
        ("unsafe", True, ()),
        ("unsafe\nS1,S1", True, ("S1",)),
    ],
)
def test_guard_answers_are_parsed_tolerantly(text, unsafe, categories):
    parsed = parse_output(text)
    assert parsed.unsafe is unsafe
    assert parsed.categories == categories
    assert parsed.error == ""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("maybe", "neither"),
        ("unsafe\nS99", "not in the taxonomy"),
        ("unsafe\nviolence", "unrecognised category"),
        ("safe\nS1", "text after 'safe'"),
    ],
)
def test_unparseable_answers_are_errors_never_guesses(text, reason):
    parsed = parse_output(text)
    assert parsed.unsafe is None
    assert reason in parsed.error


def test_unsafe_score_is_the_first_token_probability():
    tokens = (
        TokenLogprob("unsafe", math.log(0.7), (("unsafe", math.log(0.7)), ("safe", math.log(0.3)))),
        TokenLogprob("\n", 0.0),
    )
    assert unsafe_probability(tokens) == pytest.approx(0.7)


def test_unsafe_score_skips_leading_whitespace_and_reads_alternatives():
    tokens = (
        TokenLogprob("\n\n", 0.0),
        TokenLogprob("safe", math.log(0.9), (("safe", math.log(0.9)), ("unsafe", math.log(0.08)))),
    )
    assert unsafe_probability(tokens) == pytest.approx(0.08)


def test_unsafe_score_counts_a_split_word_by_its_first_piece():
    tokens = (TokenLogprob("un", math.log(0.6), (("un", math.log(0.6)), ("safe", math.log(0.4)))),)
    assert unsafe_probability(tokens) == pytest.approx(0.6)


def test_no_log_probabilities_gives_no_score():
    assert unsafe_probability(None) is None
    assert unsafe_probability((TokenLogprob("safe", -0.1),)) is None
