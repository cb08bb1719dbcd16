"""The one place a generation stage is built from its settings: in process over a
model of the pool, or as a client of a generation service."""

from __future__ import annotations

from collections.abc import Mapping

from unsafechain.backends.pool import BackendPool
from unsafechain.backends.settings import BackendSettings
from unsafechain.domain.types import ModelRef
from unsafechain.generation.client import RemoteGenerationEngine
from unsafechain.generation.engine import GenerationEngine, Generator
from unsafechain.generation.settings import GenerationSettings
from unsafechain.runtime.client import StageMismatch, describe_model, same_model
from unsafechain.runtime.settings import ClientSettings


def generation_engine(
    settings: GenerationSettings, pool: BackendPool, remote: ClientSettings | None = None
) -> Generator:
    """The generator ``settings`` describe; through the service at ``remote`` if given
    (no model is loaded here then)."""
    system, opens = settings.system_prompt, settings.prompt_opens_think
    if remote is not None:
        return RemoteGenerationEngine(
            remote, settings.params(), system_prompt=system, prompt_opens_think=opens
        )
    return GenerationEngine(
        pool.get(settings.model), settings.params(), system_prompt=system, prompt_opens_think=opens
    )


def generator_ref(settings: GenerationSettings, models: Mapping[str, BackendSettings]) -> ModelRef:
    """The generator as provenance records it, from the settings alone."""
    return models[settings.model].ref()


async def describe_generator(
    settings: GenerationSettings,
    models: Mapping[str, BackendSettings],
    remote: ClientSettings | None = None,
) -> ModelRef:
    """The generator for provenance: from the settings, or as the service at ``remote``
    reports it, checked against the settings.

    Raises:
        StageMismatch: The service runs another model than the settings name.
        BackendError: The service cannot be asked.
    """
    expected = generator_ref(settings, models)
    if remote is None:
        return expected
    async with RemoteGenerationEngine(remote) as client:
        reported = await client.describe()
    if not same_model(reported, expected):
        raise StageMismatch(
            f"the generation service at {remote.address} runs {describe_model(reported)}; "
            f"the configuration names {describe_model(expected)} "
            f"(models.{settings.model})"
        )
    return reported
