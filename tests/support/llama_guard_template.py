"""A renderer of the published Llama Guard 3 chat template that works as transformers',
the reference the Python prompt renderer and the stand-in judge are tested against.

The template (:data:`unsafechain.judge.llama_guard.PUBLISHED_CHAT_TEMPLATE`) is the
``chat_template`` of meta-llama/Llama-Guard-3-8B's tokenizer_config.json, verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from unsafechain.judge.llama_guard import PUBLISHED_CHAT_TEMPLATE

PUBLISHED_TEMPLATE = PUBLISHED_CHAT_TEMPLATE


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def render_published(messages: Sequence[dict[str, str]]) -> str:
    """``messages`` rendered with :data:`PUBLISHED_TEMPLATE` as
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)``
    renders them: a sandboxed, immutable Jinja environment with ``trim_blocks`` and
    ``lstrip_blocks``, and a ``raise_exception`` global.

    Raises:
        TemplateError: The roles do not alternate user / assistant.
    """
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_exception
    template = environment.from_string(PUBLISHED_TEMPLATE)
    return template.render(messages=list(messages), add_generation_prompt=True)
