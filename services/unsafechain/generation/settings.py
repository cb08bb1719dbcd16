"""The generation stage's settings, and the generation service's.

One schema for every place generation is configured: the build's ``generation``
section, the generation service and the Kafka generate worker.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from unsafechain.backends.settings import BackendSettings, top_k_problem
from unsafechain.domain.settings import SamplingSettings
from unsafechain.runtime.settings import (
    ServerSettings,
    add_backend_flags,
    add_sampling_flags,
    add_server_arguments,
    flag,
    fold_model_shorthand,
)

GENERATOR = "generator"


class GenerationSettings(SamplingSettings):
    """Sampling the reasoning model: K samples, temperature 0.6, top-p 0.95 is the
    usual protocol; temperature 0 with K=1 is greedy.

    Attributes:
        model: Key of the generator in the model table (``models``).
        system_prompt: Optional system turn before the prompt; R1-distill models are
            used without one.
        prompt_opens_think: Whether the model's chat template ends the generation
            prompt inside an open think section (DeepSeek-R1-Distill's current
            template ends it with ``<think>\\n``), so that a completion without tags
            is reasoning cut off, not an answer. None asks the rendered prompt where
            it is rendered here (local transformers, or a generation service's own);
            an OpenAI-compatible or TGI server renders it out of sight, so say it for
            those: with None they are read as not opening one.
    """

    model: Annotated[str, Field(min_length=1)] = GENERATOR
    samples: Annotated[int, Field(ge=1)] = 5
    system_prompt: str = ""
    prompt_opens_think: bool | None = None


class GenerationServiceSettings(ServerSettings):
    """The generation service: the server, the model table and the stage's settings,
    whose sampling applies to requests that carry none.

    ``model`` is a shorthand (``--model …`` flags, ``UNSAFECHAIN_MODEL__*``) for the
    generator's entry in ``models``.

    Attributes:
        models: The model table; ``generation.model`` is a key of it.
        generation: The stage's settings, as in a build; its sampling is the default
            of requests that carry none.
        model: Shorthand for the generator's entry in ``models``.
    """

    service: ClassVar[str] = "generation"
    config_sections: ClassVar[tuple[str, ...]] = ("models", "generation")

    models: dict[str, BackendSettings] = Field(default_factory=dict)
    generation: GenerationSettings = GenerationSettings()
    model: BackendSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_model(cls, values: object) -> object:
        key = GENERATOR
        if isinstance(values, dict) and isinstance(values.get("generation"), dict):
            key = values["generation"].get("model", GENERATOR)
        return fold_model_shorthand(values, "model", "models", key)

    @model_validator(mode="after")
    def _model_known(self) -> GenerationServiceSettings:
        if self.generation.model not in self.models:
            raise ValueError(
                f"models: the generation service needs its generator {self.generation.model!r} "
                "(--backend and --model, or models in --config)"
            )
        problem = top_k_problem(
            "generation", self.generation.params(), self.generation.model, self.models
        )
        if problem:
            raise ValueError(problem)
        return self

    def backends(self) -> Iterable[BackendSettings]:
        return self.models.values()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``unsafechain serve generation``."""
    add_server_arguments(parser)
    add_backend_flags(parser, "", "model", "generator")
    group = parser.add_argument_group("default sampling (requests without their own)")
    flag(group, "--samples", "generation.samples", "completions per request", type=int)
    add_sampling_flags(group, "generation", "completion")


SETTINGS = GenerationServiceSettings
"""The service's settings class, for ``unsafechain serve generation``."""
