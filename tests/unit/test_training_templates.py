"""The training chat template: reasoning kept, assistant span marked, prompt as at inference."""

from pathlib import Path

import pytest

from tests.support.tokenizers import (
    CHATML_TEMPLATE,
    R1_DROPPING_TEMPLATE,
    chatml_tokenizer,
    r1_tokenizer,
)
from unsafechain.demo.standins import R1_CHAT_TEMPLATE
from unsafechain.training.templates import (
    PROBE_MESSAGES,
    TemplateError,
    choose_training_template,
    keeps_reasoning,
    mark_trained_span,
    r1_training_template,
    trained_tokens,
)

CONVERSATION = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "<think>\nFlour and water.\n</think>\n\nUse an oven."},
]


def _trained_text(tokenizer, template):
    ids, mask = trained_tokens(tokenizer, CONVERSATION, template)
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_the_published_r1_template_drops_the_reasoning_and_is_replaced():
    tokenizer = r1_tokenizer(R1_DROPPING_TEMPLATE)
    assert not keeps_reasoning(tokenizer, R1_DROPPING_TEMPLATE)
    chosen = choose_training_template(tokenizer)
    assert chosen.origin == "r1-distill"
    assert not chosen.model_template_keeps_reasoning
    assert "drops the reasoning" in chosen.describe()
    assert _trained_text(tokenizer, chosen.template) == (
        "Flour and water.\n</think>\n\nUse an oven.<｜end▁of▁sentence｜>"
    )


def test_the_standin_generator_template_gets_the_same_treatment():
    tokenizer = r1_tokenizer(R1_CHAT_TEMPLATE)
    chosen = choose_training_template(tokenizer)
    assert chosen.origin == "r1-distill"
    assert chosen.model_template_keeps_reasoning
    assert chosen.template == r1_training_template(prompt_opens_think=True)


def test_the_opening_think_tag_is_prompt_when_the_generation_prompt_opens_it():
    tokenizer = r1_tokenizer(R1_CHAT_TEMPLATE)
    chosen = choose_training_template(tokenizer)
    assert chosen.prompt_opens_think
    ids, mask = trained_tokens(tokenizer, CONVERSATION, chosen.template)
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    start = mask.index(1)
    assert ids[:start] == prompt
    assert tokenizer.decode(ids[:start]).endswith("<｜Assistant｜><think>\n")


def test_the_opening_think_tag_is_trained_when_the_generation_prompt_lacks_it():
    older = R1_CHAT_TEMPLATE.replace("<think>\\n", "")
    tokenizer = r1_tokenizer(older)
    chosen = choose_training_template(tokenizer)
    assert not chosen.prompt_opens_think
    assert _trained_text(tokenizer, chosen.template).startswith("<think>\nFlour and water.")


def test_a_template_without_markers_that_trl_does_not_know_is_refused():
    with pytest.raises(TemplateError, match=r"no \{% generation %\} markers.*model\.chat_template"):
        choose_training_template(chatml_tokenizer())


def test_a_non_r1_template_that_drops_the_reasoning_is_refused():
    dropping = CHATML_TEMPLATE.replace(
        "message['content']", "message['content'].split('</think>')[-1]"
    )
    with pytest.raises(TemplateError, match="drops the <think> reasoning"):
        choose_training_template(chatml_tokenizer(dropping))


def _chatml_training(tmp_path: Path, turn: str, prompt: str = "<|im_start|>assistant\\n") -> Path:
    template = (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}"
        f"{turn}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endif %}{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{prompt}' }}}}{{% endif %}}"
    )
    path = tmp_path / "training.jinja"
    path.write_text(template)
    return path


def test_a_configured_template_that_keeps_reasoning_and_marks_the_turn_is_used(tmp_path):
    path = _chatml_training(
        tmp_path,
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\\n' }}",
    )
    tokenizer = chatml_tokenizer()
    chosen = choose_training_template(tokenizer, configured=path)
    assert chosen.origin == "file"
    assert _trained_text(tokenizer, chosen.template) == (
        "<think>\nFlour and water.\n</think>\n\nUse an oven.<|im_end|>"
    )


def test_a_configured_template_whose_span_misses_the_end_of_turn_is_refused(tmp_path):
    path = _chatml_training(
        tmp_path,
        "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] }}"
        "{% endgeneration %}{{ '<|im_end|>\\n' }}",
    )
    with pytest.raises(TemplateError, match="does not end with the end-of-turn token"):
        choose_training_template(chatml_tokenizer(), configured=path)


def test_a_configured_template_whose_prompt_differs_from_inference_is_refused(tmp_path):
    path = _chatml_training(
        tmp_path,
        "{{ '<|im_start|>assistant\\n\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}",
    )
    with pytest.raises(TemplateError, match="training and inference would disagree"):
        choose_training_template(chatml_tokenizer(), configured=path)


def test_a_configured_template_without_markers_is_refused(tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text(CHATML_TEMPLATE)
    with pytest.raises(TemplateError, match="no \\{% generation %\\} markers"):
        choose_training_template(chatml_tokenizer(), configured=path)


def test_a_model_without_a_chat_template_is_refused():
    tokenizer = chatml_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template"):
        choose_training_template(tokenizer)


def test_the_marked_rendering_shows_the_trained_span_and_is_cut_at_max_length():
    tokenizer = r1_tokenizer(R1_CHAT_TEMPLATE)
    tokenizer.chat_template = choose_training_template(tokenizer).template
    marked = mark_trained_span(tokenizer, list(PROBE_MESSAGES))
    assert marked.endswith(
        "<｜Assistant｜><think>\n⟦The probe reasons here first.\n</think>\n\n"
        "The probe answers here.<｜end▁of▁sentence｜>⟧"
    )
    ids, _ = trained_tokens(tokenizer, list(PROBE_MESSAGES))
    cut = mark_trained_span(tokenizer, list(PROBE_MESSAGES), max_length=len(ids) - 1)
    assert cut.endswith("answers here.⟧")
