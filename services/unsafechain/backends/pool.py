"""The models of a process, each built once on first use and shared by every stage
that names it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from unsafechain.backends.base import ModelBackend
from unsafechain.backends.settings import BackendSettings, create_backend, missing_local_model
from unsafechain.domain.settings import SetupError

logger = logging.getLogger(__name__)


class BackendPool:
    """Backends by model key, built on first use.

    A process that runs one stage (a Kafka worker, a service) loads only the models
    that stage names; two stages naming the same key share one backend.

    Args:
        models: The model table: key to settings.
        wrap: Applied to every backend as it is built (metrics, for example).
    """

    def __init__(
        self,
        models: Mapping[str, BackendSettings],
        *,
        wrap: Callable[[ModelBackend], ModelBackend] | None = None,
    ):
        self._models = dict(models)
        self._wrap = wrap
        self._built: dict[str, ModelBackend] = {}

    @property
    def models(self) -> Mapping[str, BackendSettings]:
        """The model table."""
        return self._models

    def settings(self, key: str) -> BackendSettings:
        """The settings of model ``key``.

        Raises:
            KeyError: No model has that key; the message lists the keys there are.
        """
        if key not in self._models:
            known = ", ".join(sorted(self._models)) or "none"
            raise KeyError(f"no model named {key!r} (have: {known})")
        return self._models[key]

    def get(self, key: str) -> ModelBackend:
        """The backend of model ``key``, built now if it is not yet.

        Raises:
            SetupError: The model cannot be started; the message names its key.
        """
        if key not in self._built:
            settings = self.settings(key)
            logger.info("starting model %r (%s)", key, settings.model)
            missing = missing_local_model(settings)
            if missing:
                raise SetupError(f"models.{key}.model: {missing}")
            try:
                backend = create_backend(settings)
            except (OSError, ValueError) as error:
                # A path that is no model, a hub name with no network, an unset key.
                reason = (
                    str(error).strip().splitlines()[0]
                    if str(error).strip()
                    else type(error).__name__
                )
                raise SetupError(
                    f"models.{key}: cannot start {settings.model}: {reason}"
                ) from error
            self._built[key] = self._wrap(backend) if self._wrap else backend
        return self._built[key]

    @property
    def built(self) -> tuple[ModelBackend, ...]:
        """The backends built so far."""
        return tuple(self._built.values())

    async def aclose(self) -> None:
        """Release every backend built."""
        built, self._built = list(self._built.values()), {}
        for backend in built:
            await backend.aclose()
