"""Splitting a reasoning model's output into its think section and its answer."""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningSplit:
    """A completion split at its think tags.

    Attributes:
        reasoning: Text inside the think section, stripped.
        answer: Text after the think section, stripped.
        has_open: Whether the text starts with the opening tag.
        has_close: Whether the closing tag was in the text.
        opened_by_prompt: Whether the prompt ended inside an open think section (R1
            chat templates end the generation prompt with ``<think>\\n``), so the
            text starts in the reasoning.
    """

    reasoning: str
    answer: str
    has_open: bool
    has_close: bool
    opened_by_prompt: bool = False

    @property
    def in_reasoning(self) -> bool:
        """Whether the text started inside the think section."""
        return self.has_open or self.opened_by_prompt

    def render(self) -> str:
        """The completion in the canonical ``<think>`` format, both tags present."""
        return format_reasoning(self.reasoning, self.answer)


def format_reasoning(reasoning: str, answer: str) -> str:
    """Join reasoning and answer in the format R1-style models are trained on."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"


def split_reasoning(text: str, *, opened: bool = False) -> ReasoningSplit:
    """Split ``text`` into reasoning and answer, tolerating missing tags.

    The opening tag counts only at the start of the text (after whitespace): a
    ``<think>`` an answer mentions is part of the answer.

    - ``<think>r</think>a``: both parts.
    - ``r</think>a``: the opening tag was part of the prompt (R1 chat templates add
      it), so everything before the closing tag is reasoning.
    - ``r`` with ``opened`` (the prompt ended inside the think section), or ``<think>r``,
      with no closing tag: generation stopped inside the reasoning; all of it is
      reasoning and the answer is empty.
    - no tags and not ``opened``: no reasoning; the whole text is the answer.

    Args:
        text: The completion as generated.
        opened: Whether the prompt ended inside an open think section.
    """
    body = text.lstrip()
    has_open = body.startswith(THINK_OPEN)
    if has_open:
        body = body[len(THINK_OPEN) :]
    close_at = body.find(THINK_CLOSE)
    has_close = close_at >= 0
    if has_close:
        reasoning, answer = body[:close_at], body[close_at + len(THINK_CLOSE) :]
    elif has_open or opened:
        reasoning, answer = body, ""
    else:
        reasoning, answer = "", text
    return ReasoningSplit(reasoning.strip(), answer.strip(), has_open, has_close, opened)
