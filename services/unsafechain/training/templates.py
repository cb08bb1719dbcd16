"""Training chat templates: the model's own conversation format, keeping the reasoning
and marking the tokens the loss covers.

Rows are rendered as conversations through the model's chat template, and the loss
covers the assistant turn only: its reasoning, ``</think>``, the answer and the
end-of-turn token. Three things can go wrong silently, and each is checked on a probe
conversation before a run starts:

- **The template drops the reasoning.** DeepSeek-R1-Distill's template removes
  everything up to ``</think>`` from assistant turns, the last one included: trained
  as it is, the model would learn answers without reasoning. R1-distill models (the
  tokenizer has their ``<｜User｜>``, ``<｜Assistant｜>`` and ``<｜end▁of▁sentence｜>``
  tokens) get :func:`r1_training_template` instead, whatever their own template does
  (the stand-in generator's keeps the reasoning but has no markers: same treatment).
- **Nothing marks the assistant span.** ``assistant_only_loss`` needs ``{% generation
  %}`` markers. A template without them that is not an R1-distill one is replaced by
  TRL's training variant when TRL knows the template, and refused otherwise: markers
  cannot be inserted into arbitrary Jinja reliably, and a wrong guess would train on
  the wrong tokens without a sign. ``model.chat_template`` then names a Jinja file
  with a training template (checked the same way).
- **Training and inference disagree on the prompt.** The tokens before the trained
  span must equal, token for token, the generation prompt the model's own template
  renders at inference. R1 templates end that prompt with ``<think>\\n``: the opening
  tag is then part of the prompt, not of the trained span, exactly as the model sees
  it when it generates. (A template whose prompt does not open the think section
  trains the opening tag as the first tokens of the span.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from unsafechain.domain.reasoning import THINK_CLOSE, THINK_OPEN
from unsafechain.domain.settings import SetupError

logger = logging.getLogger(__name__)

R1_BOS = "<｜begin▁of▁sentence｜>"
R1_USER = "<｜User｜>"
R1_ASSISTANT = "<｜Assistant｜>"
R1_EOS = "<｜end▁of▁sentence｜>"

OPENED_THINK = f"{THINK_OPEN}\n"
"""What an R1 generation prompt ends with, and every canonical response starts with."""

_PROBE_REASONING = "The probe reasons here first."
_PROBE_ANSWER = "The probe answers here."
PROBE_MESSAGES = (
    {"role": "user", "content": "What does the probe ask?"},
    {
        "role": "assistant",
        "content": f"{OPENED_THINK}{_PROBE_REASONING}\n{THINK_CLOSE}\n\n{_PROBE_ANSWER}",
    },
)
"""A conversation whose assistant turn holds a think section: a training template must
keep it, and mark it."""

SPAN_START, SPAN_END = "⟦", "⟧"
"""How :func:`mark_trained_span` shows the trained tokens."""


class TemplateError(SetupError):
    """The chat template cannot be trained with; the message says why and what to do."""


def r1_training_template(*, prompt_opens_think: bool) -> str:
    """The DeepSeek-R1-Distill chat template for training.

    As the published template: the BOS, the system prompt, then ``<｜User｜>`` turns
    and ``<｜Assistant｜>`` turns ending in ``<｜end▁of▁sentence｜>``, and a generation
    prompt ``<｜Assistant｜><think>\\n``. Unlike it, an assistant turn keeps its
    reasoning, and its trained tokens sit inside ``{% generation %}`` markers.

    Args:
        prompt_opens_think: Whether the model's generation prompt ends with
            ``<think>\\n``. Then each assistant turn renders that opening before the
            trained span, so that the context trained on is the one the model gets at
            inference; otherwise the opening is the span's first tokens.
    """
    if prompt_opens_think:
        turn = (
            f"{{{{- '{R1_ASSISTANT}{OPENED_THINK}' }}}}"
            f"{{%- if content.startswith('{OPENED_THINK}') %}}"
            f"{{%- set content = content[{len(OPENED_THINK)}:] %}}"
            "{%- endif %}"
        )
        prompt = f"{R1_ASSISTANT}{OPENED_THINK}"
    else:
        turn = f"{{{{- '{R1_ASSISTANT}' }}}}"
        prompt = R1_ASSISTANT
    return (
        "{{- bos_token }}"
        "{%- for message in messages if message['role'] == 'system' %}"
        "{{- message['content'] }}"
        "{%- endfor %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        f"{{{{- '{R1_USER}' + message['content'] }}}}"
        "{%- elif message['role'] == 'assistant' %}"
        "{%- set content = message['content'] %}"
        f"{turn}"
        "{%- generation %}"
        f"{{{{- content + '{R1_EOS}' }}}}"
        "{%- endgeneration %}"
        "{%- elif message['role'] != 'system' %}"
        "{{- raise_exception('the training template renders system, user and assistant "
        "turns only') }}"
        "{%- endif %}"
        "{%- endfor %}"
        f"{{%- if add_generation_prompt %}}{{{{- '{prompt}' }}}}{{%- endif %}}"
    )


@dataclass(frozen=True, slots=True)
class TrainingTemplate:
    """The chat template a run trains with, and how it was chosen.

    Attributes:
        template: The Jinja source.
        origin: ``r1-distill`` (built in), ``model`` (the model's own), ``trl``
            (TRL's training variant of the model's own) or ``file`` (configured).
        model_template_keeps_reasoning: Whether the model's own template keeps the
            think section of assistant turns.
        prompt_opens_think: Whether the inference generation prompt ends with
            ``<think>\\n`` (so the opening tag is prompt, not trained span).
        span_tokens: The probe's trained tokens as text, for the run record.
    """

    template: str
    origin: str
    model_template_keeps_reasoning: bool
    prompt_opens_think: bool
    span_tokens: str

    def describe(self) -> str:
        """One paragraph for the run record and the model card."""
        chosen = {
            "r1-distill": "the built-in DeepSeek-R1-Distill training template",
            "model": "the model's own chat template (it has generation markers)",
            "trl": "TRL's training variant of the model's chat template",
            "file": "the configured training template (model.chat_template)",
        }[self.origin]
        kept = (
            "keeps the reasoning"
            if self.model_template_keeps_reasoning
            else "drops the reasoning of assistant turns (everything before </think>)"
        )
        opening = (
            "the opening <think>\\n ends the generation prompt, as at inference, and is not trained"
            if self.prompt_opens_think
            else "the opening <think> is the first trained token"
        )
        return (
            f"Rendered with {chosen}. The model's own template {kept}; the training "
            "template keeps it and marks the assistant turn with {% generation %}. The "
            "loss covers the assistant turn only: reasoning, </think>, answer and the "
            f"end-of-turn token; {opening}."
        )

    def record(self) -> dict[str, Any]:
        """The run record's entry."""
        return {
            "origin": self.origin,
            "model_template_keeps_reasoning": self.model_template_keeps_reasoning,
            "prompt_opens_think": self.prompt_opens_think,
            "probe_trained_text": self.span_tokens,
            "summary": self.describe(),
        }


def is_r1_distill(tokenizer: Any) -> bool:
    """Whether the tokenizer is a DeepSeek-R1-Distill one (by its turn tokens)."""
    vocabulary = tokenizer.get_vocab()
    return all(token in vocabulary for token in (R1_USER, R1_ASSISTANT, R1_EOS))


def keeps_reasoning(tokenizer: Any, template: str) -> bool:
    """Whether ``template`` renders the think section of an assistant turn."""
    rendered = tokenizer.apply_chat_template(
        list(PROBE_MESSAGES), tokenize=False, chat_template=template
    )
    return _PROBE_REASONING in rendered


def generation_prompt(tokenizer: Any, template: str) -> str:
    """What ``template`` renders for the probe's user turn and a generation prompt."""
    return tokenizer.apply_chat_template(
        list(PROBE_MESSAGES[:1]), tokenize=False, add_generation_prompt=True, chat_template=template
    )


def choose_training_template(
    tokenizer: Any, *, configured: Path | None = None, model_name: str = "the model"
) -> TrainingTemplate:
    """The training template for a tokenizer whose ``chat_template`` is the model's own.

    Raises:
        TemplateError: The model has no chat template, or no template that keeps the
            reasoning and marks the span can be had for it, or the chosen one fails
            the checks on the probe conversation.
    """
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        raise TemplateError(f"model.base: {model_name} has no chat template")
    own_keeps = keeps_reasoning(tokenizer, own)
    opens_think = generation_prompt(tokenizer, own).endswith(OPENED_THINK)
    if configured is not None:
        try:
            template = configured.read_text(encoding="utf-8")
        except OSError as error:
            raise TemplateError(
                f"model.chat_template: cannot read {configured}: {error.strerror}"
            ) from None
        origin = "file"
    elif is_r1_distill(tokenizer):
        template, origin = r1_training_template(prompt_opens_think=opens_think), "r1-distill"
    elif not own_keeps:
        raise TemplateError(
            f"model.base: the chat template of {model_name} drops the <think> reasoning of "
            "assistant turns, so training with it would train on answers without reasoning; "
            "give model.chat_template: a Jinja file that keeps the reasoning and wraps each "
            "assistant turn in {% generation %}…{% endgeneration %}"
        )
    elif has_generation_markers(own):
        template, origin = own, "model"
    else:
        template, origin = _trl_variant(tokenizer, model_name), "trl"
    span = verify_training_template(tokenizer, template, inference_template=own)
    chosen = TrainingTemplate(template, origin, own_keeps, opens_think, span)
    logger.info("chat template: %s", chosen.describe())
    return chosen


def _trl_variant(tokenizer: Any, model_name: str) -> str:
    try:
        variant = get_training_chat_template(tokenizer)
    except ValueError:
        variant = None
    if variant is None:
        raise TemplateError(
            f"model.base: the chat template of {model_name} has no {{% generation %}} markers, "
            "which the assistant-only loss needs, and no known training variant; give "
            "model.chat_template: a Jinja file that wraps each assistant turn (reasoning, "
            "answer and end-of-turn token) in {% generation %}…{% endgeneration %}"
        )
    return variant


def trained_tokens(
    tokenizer: Any, messages: list[dict[str, str]], template: str | None = None
) -> tuple[list[int], list[int]]:
    """The token ids of a rendered conversation and its assistant mask (1: trained)."""
    encoded = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        chat_template=template,
    )
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def verify_training_template(tokenizer: Any, template: str, *, inference_template: str) -> str:
    """Check ``template`` on the probe conversation; returns the probe's trained text.

    The checks: the reasoning is rendered; generation markers mark a span; the tokens
    before it are, token for token, the generation prompt of ``inference_template``;
    the span holds the reasoning, ``</think>`` and the answer, and ends with a special
    (end-of-turn) token.

    Raises:
        TemplateError: A check fails; the message names it.
    """
    where = "the training chat template"
    if not keeps_reasoning(tokenizer, template):
        raise TemplateError(f"{where} drops the <think> reasoning of assistant turns")
    if not has_generation_markers(template):
        raise TemplateError(
            f"{where} has no {{% generation %}} markers, which the assistant-only loss needs"
        )
    ids, mask = trained_tokens(tokenizer, list(PROBE_MESSAGES), template)
    if 1 not in mask:
        raise TemplateError(f"{where} marks no assistant tokens")
    start = mask.index(1)
    end = start + mask[start:].index(0) if 0 in mask[start:] else len(mask)
    if 1 in mask[end:]:
        raise TemplateError(f"{where} marks more than the assistant turn of a single-turn chat")
    prompt = tokenizer.apply_chat_template(
        list(PROBE_MESSAGES[:1]),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        chat_template=inference_template,
    )["input_ids"]
    if ids[:start] != list(prompt):
        raise TemplateError(
            f"{where} renders the prompt before the trained span as "
            f"{tokenizer.decode(ids[:start])!r}, but the model's template prompts inference "
            f"with {tokenizer.decode(prompt)!r}: training and inference would disagree"
        )
    span = tokenizer.decode(ids[start:end])
    for part in (_PROBE_REASONING, THINK_CLOSE, _PROBE_ANSWER):
        if part not in span:
            raise TemplateError(f"{where}: the trained span {span!r} lacks {part!r}")
    specials = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    if ids[end - 1] not in specials:
        raise TemplateError(
            f"{where}: the trained span {span!r} does not end with the end-of-turn token, so "
            "the model would not learn to stop"
        )
    return span


def mark_trained_span(
    tokenizer: Any, messages: list[dict[str, str]], *, max_length: int | None = None
) -> str:
    """The conversation as the model reads it, trained tokens between ⟦ and ⟧, cut at
    ``max_length`` tokens as training cuts it."""
    ids, mask = trained_tokens(tokenizer, messages)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    parts, start = [], 0
    for index in range(1, len(ids) + 1):
        if index == len(ids) or mask[index] != mask[start]:
            text = tokenizer.decode(ids[start:index])
            parts.append(f"{SPAN_START}{text}{SPAN_END}" if mask[start] else text)
            start = index
    return "".join(parts)
