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
        has_open: Whether the opening tag was in the text.
        has_close: Whether the closing tag was in the text.
    """

    reasoning: str
    answer: str
    has_open: bool
    has_close: bool

    def render(self) -> str:
        """The completion in the canonical ``<think>`` format, both tags present."""
        return format_reasoning(self.reasoning, self.answer)


def format_reasoning(reasoning: str, answer: str) -> str:
    """Join reasoning and answer in the format R1-style models are trained on."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"


def split_reasoning(text: str) -> ReasoningSplit:
    """Split ``text`` into reasoning and answer, tolerating missing tags.

    - ``<think>r</think>a``: both parts.
    - ``r</think>a``: the opening tag was part of the prompt (R1 chat templates add
      it), so everything before the closing tag is reasoning.
    - ``<think>r`` with no closing tag: generation stopped inside the reasoning;
      all of it is reasoning and the answer is empty.
    - no tags: no reasoning; the whole text is the answer.
    """
    open_at = text.find(THINK_OPEN)
    close_at = text.find(THINK_CLOSE, open_at + len(THINK_OPEN) if open_at >= 0 else 0)
    has_open, has_close = open_at >= 0, close_at >= 0
    start = open_at + len(THINK_OPEN) if has_open else 0
    if has_close:
        reasoning = text[start:close_at]
        answer = text[close_at + len(THINK_CLOSE) :]
    elif has_open:
        reasoning, answer = text[start:], ""
    else:
        reasoning, answer = "", text
    return ReasoningSplit(reasoning.strip(), answer.strip(), has_open, has_close)
