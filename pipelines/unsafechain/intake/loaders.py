"""Loaders: how each published prompt dataset lays out its records.

A loader maps one raw record to the prompt text and the metadata worth keeping, or
raises :class:`RecordError` with the reason the record cannot be used. ``generic``
reads the column ``prompt_field`` names; the others read the published columns of
their dataset, so a local copy and the hub dataset read the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unsafechain.intake.settings import SourceSettings


class RecordError(ValueError):
    """One record cannot be used; the message is the reason."""


@dataclass(frozen=True, slots=True)
class LoadedPrompt:
    """What a loader took from one record."""

    text: str
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class Loader:
    """One dataset's record layout.

    Attributes:
        extract: Maps a record (a dict) and the source's settings to the prompt.
        subset_field: Column whose values ``SourceSettings.subsets`` selects from.
        hub_options: Keyword arguments ``datasets.load_dataset`` needs for the
            published hub dataset (``format: hub``).
    """

    extract: Callable[[dict, SourceSettings], LoadedPrompt]
    subset_field: str | None = None
    hub_options: Mapping[str, object] = field(default_factory=dict)


def text_field(row: dict, name: str) -> str:
    """The non-empty string in column ``name``.

    Raises:
        RecordError: The column is missing, not a string, or blank.
    """
    if name not in row:
        raise RecordError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise RecordError(f"field {name!r} is empty")
    return value


def _scalars(row: dict, names: tuple[str, ...]) -> dict[str, str]:
    """The named columns that hold a scalar, as strings."""
    return {
        name: str(row[name])
        for name in names
        if isinstance(row.get(name), str | int | float | bool)
    }


def _generic(row: dict, settings: SourceSettings) -> LoadedPrompt:
    text = text_field(row, settings.prompt_field)
    others = tuple(key for key in row if key != settings.prompt_field)
    return LoadedPrompt(text, _scalars(row, others))


def _wildjailbreak(row: dict, settings: SourceSettings) -> LoadedPrompt:
    # Vanilla rows leave ``adversarial`` empty; the eval config has no ``vanilla``.
    adversarial = row.get("adversarial")
    if isinstance(adversarial, str) and adversarial.strip():
        text, variant = adversarial, "adversarial"
    else:
        text, variant = text_field(row, "vanilla"), "vanilla"
    if "data_type" not in row:
        raise RecordError("missing field 'data_type'")
    metadata = _scalars(row, ("data_type",))
    metadata["prompt_column"] = variant
    return LoadedPrompt(text, metadata)


def _strongreject(row: dict, settings: SourceSettings) -> LoadedPrompt:
    return LoadedPrompt(text_field(row, "forbidden_prompt"), _scalars(row, ("category", "source")))


_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def _hh_rlhf_redteam(row: dict, settings: SourceSettings) -> LoadedPrompt:
    transcript = text_field(row, "transcript")
    # split() with a group alternates [preamble, role, text, role, text, ...].
    parts = _TURN.split(transcript)
    human = [
        text.strip() for role, text in zip(parts[1::2], parts[2::2], strict=True) if role == "Human"
    ]
    if not human or not human[0]:
        raise RecordError("field 'transcript' has no Human turn with text")
    return LoadedPrompt(human[0], _scalars(row, ("rating", "task_description")))


def _gsm8k(row: dict, settings: SourceSettings) -> LoadedPrompt:
    question = text_field(row, "question")
    answer = text_field(row, "answer")
    # The reference answer ends with "#### <final answer>".
    final = answer.rpartition("####")[2].strip() if "####" in answer else ""
    return LoadedPrompt(question, {"answer": answer, "final_answer": final})


def _mbpp(row: dict, settings: SourceSettings) -> LoadedPrompt:
    # The sanitized config calls the description ``prompt``.
    description = text_field(row, "text" if "text" in row else "prompt")
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise RecordError("field 'test_list' is not a non-empty list of strings")
    # The usual MBPP prompt (EvalPlus, bigcode harness): the task and its first test.
    text = f'"""\n{description.strip()}\n{tests[0].strip()}\n"""\n'
    metadata = _scalars(row, ("task_id", "code"))
    metadata["test_list"] = json.dumps(tests)
    return LoadedPrompt(text, metadata)


def _truthfulqa(row: dict, settings: SourceSettings) -> LoadedPrompt:
    question = text_field(row, "question")
    metadata = _scalars(row, ("category", "type", "source", "best_answer"))
    targets = row.get("mc1_targets")
    if "best_answer" not in row and targets is None:
        raise RecordError("neither 'best_answer' nor 'mc1_targets' present")
    if targets is not None:
        # The published order puts the correct choice first, so the choices are not
        # put into the prompt (it would teach "the answer is A"); the answer is kept.
        try:
            [best] = [
                c
                for c, label in zip(targets["choices"], targets["labels"], strict=True)
                if label == 1
            ]
        except (KeyError, TypeError, ValueError) as error:
            raise RecordError("field 'mc1_targets' has no single correct choice") from error
        metadata["best_answer"] = str(best)
    return LoadedPrompt(question, metadata)


LOADERS: dict[str, Loader] = {
    "generic": Loader(_generic),
    "wildjailbreak": Loader(
        _wildjailbreak,
        subset_field="data_type",
        # allenai/wildjailbreak is TSV; empty cells must stay "" rather than NaN.
        hub_options={"name": "train", "delimiter": "\t", "keep_default_na": False},
    ),
    "strongreject": Loader(_strongreject, subset_field="category"),
    "hh_rlhf_redteam": Loader(_hh_rlhf_redteam, hub_options={"data_dir": "red-team-attempts"}),
    "gsm8k": Loader(_gsm8k, hub_options={"name": "main"}),
    "mbpp": Loader(_mbpp, hub_options={"name": "full"}),
    "truthfulqa": Loader(_truthfulqa, subset_field="category", hub_options={"name": "generation"}),
}
"""Every loader by the name ``SourceSettings.loader`` uses."""
