"""How a stand-in model says what it is: a key in its ``config.json``, written by
``unsafechain standins`` and read by the build, which records it in provenance and
puts a disclaimer on the dataset card.

The key travels with the model folder (it is part of the configuration every copy or
upload of a ``save_pretrained`` folder keeps), and no real model carries it.
"""

from __future__ import annotations

import json
from pathlib import Path

STANDIN_KEY = "unsafechain_standin"
"""The ``config.json`` key holding the stand-in's role: generator, judge or corrector."""

STANDS_IN_FOR = {
    "generator": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "judge": "meta-llama/Llama-Guard-3-8B",
    "corrector": "gpt-4.1",
}
"""The real model each stand-in plays in the demo."""


def standin_role(model: str) -> str | None:
    """The stand-in role of the local model folder ``model`` (``generator``, ``judge``
    or ``corrector``); None for a real model, a hub name or a served model."""
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    role = config.get(STANDIN_KEY) if isinstance(config, dict) else None
    return role if isinstance(role, str) else None
