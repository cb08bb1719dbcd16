"""What every settings model shares: strict, frozen pydantic models, sampling settings,
and one way of naming what is wrong with a value."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unsafechain.domain.types import SamplingParams


class SetupError(ValueError):
    """What valid settings describe cannot be set up: a model that cannot be loaded, an
    API key variable that is not set, a template that is missing. The message names
    the setting."""


class StrictModel(BaseModel):
    """A settings model that rejects unknown keys, so a typo names itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingSettings(StrictModel):
    """Sampling K completions per prompt.

    Attributes:
        samples: Completions per prompt (K).
        temperature: 0 is greedy decoding.
        top_p: Nucleus sampling mass.
        top_k: Sample from the k most likely tokens only; 0 (the default) is off, as
            SafeChain and STAR-1 sample (transformers would otherwise apply 50).
        max_new_tokens: Upper bound on generated tokens per completion.
    """

    samples: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(ge=0)] = 0.6
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 0
    max_new_tokens: Annotated[int, Field(ge=1)] = 4096

    def params(self) -> SamplingParams:
        """The sampling settings for one prompt's K samples."""
        return SamplingParams(
            n=self.samples,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )


# A validator's message that names a key below the model it checks: "judges.3.members.1: …".
_NESTED_KEY = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*): (.+)$", re.DOTALL)


def describe_error(error: ValidationError) -> str:
    """Every problem of ``error`` as ``dotted.key: message``, joined by ``; ``.

    A model validator that names a key inside its model (``judges.3.members.1: …``)
    is reported under the full path (``judging.judges.3.members.1: …``).
    """
    problems = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        nested = _NESTED_KEY.match(message)
        if key and nested:
            key, message = f"{key}.{nested[1]}", nested[2]
        problems.append(f"{key}: {message}" if key else message)
    return "; ".join(problems)
