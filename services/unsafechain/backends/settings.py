"""Typed settings for model backends, and the one place that builds a backend from them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator

from unsafechain.backends.base import ModelBackend
from unsafechain.backends.retry import RetryPolicy
from unsafechain.domain.settings import (
    ConfigPathText,
    StrictModel,
    path_or_hub_name,
    where_paths_start,
)
from unsafechain.domain.types import ModelRef, SamplingParams


class RetrySettings(StrictModel):
    """Retries with exponential backoff; a server's ``Retry-After`` wins.

    Attributes:
        max_attempts: Tries of one call in all, the first included.
        initial_backoff: Seconds before the first retry, doubled for each further one.
        max_backoff: Longest wait between two tries, in seconds.
    """

    max_attempts: Annotated[int, Field(ge=1)] = 5
    initial_backoff: Annotated[float, Field(ge=0)] = 0.5
    max_backoff: Annotated[float, Field(ge=0)] = 30.0

    def policy(self) -> RetryPolicy:
        """The equivalent :class:`RetryPolicy`."""
        return RetryPolicy(
            max_attempts=self.max_attempts,
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
        )


class BackendSettings(StrictModel):
    """Where a model runs.

    Attributes:
        backend: ``transformers`` (local), ``openai`` (any OpenAI-compatible server)
            or ``tgi`` (TGI's native API).
        model: Hub name or local path (transformers), or the served model name.
        base_url: Server address for ``openai`` and ``tgi``.
        api_key_env: Name of the environment variable holding the API key. The key
            itself never appears in a config file, a log line or an error.
        timeout: Seconds per remote call.
        max_concurrency: Remote calls in flight at once.
        retry: Retry policy for remote calls.
        device: Device for local models (``auto`` picks CUDA when present).
        dtype: Weight dtype for local models.
        max_batch_size: Sequences per forward pass for local models.
        max_tokens_param: ``max_tokens`` or ``max_completion_tokens`` (OpenAI's
            reasoning models want the latter).
        adapter: A LoRA adapter folder (``peft`` layout, e.g. a training run's
            ``adapter/``) applied over ``model`` and merged into it at load
            (transformers only).
    """

    backend: Literal["transformers", "openai", "tgi"]
    model: Annotated[str, Field(min_length=1)]
    base_url: str | None = None
    api_key_env: str | None = None
    timeout: Annotated[float, Field(gt=0)] = 120.0
    max_concurrency: Annotated[int, Field(ge=1)] = 8
    retry: RetrySettings = RetrySettings()
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: Annotated[int, Field(ge=1)] = 16
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    adapter: ConfigPathText | None = None

    @model_validator(mode="before")
    @classmethod
    def _local_model_from_config_folder(cls, values: object) -> object:
        # Only a transformers model is a path (or a hub name); a server's is its name.
        if isinstance(values, dict) and values.get("backend") == "transformers":
            values = {**values, "model": path_or_hub_name(values.get("model"))}
        return values

    @model_validator(mode="after")
    def _remote_needs_url(self) -> BackendSettings:
        if self.backend == "tgi" and not self.base_url:
            raise ValueError("base_url is required for the tgi backend")
        if self.adapter is not None and self.backend != "transformers":
            raise ValueError(
                "adapter: an adapter is applied to a local model (transformers); a server "
                "loads its own (vLLM --lora-modules, TGI LORA_ADAPTERS) and is named by model"
            )
        return self

    def ref(self) -> ModelRef:
        """The model as the backend built from these settings names it in provenance."""
        if self.backend == "transformers":
            return ModelRef(backend="transformers", model=self.model, adapter=self.adapter or "")
        from unsafechain.backends.http_common import public_endpoint
        from unsafechain.backends.openai_backend import OPENAI_BASE_URL

        base_url = self.base_url or (OPENAI_BASE_URL if self.backend == "openai" else "")
        return ModelRef(backend=self.backend, model=self.model, endpoint=public_endpoint(base_url))

    def top_k_refusal(self) -> str | None:
        """Why conversations sampled with a top-k cannot go to this model, or None.

        TGI's Messages API has no ``top_k`` (the ``tgi`` backend refuses one), and the
        OpenAI API rejects it; vLLM and SGLang behind ``openai`` take it.
        """
        if self.backend == "tgi":
            return "TGI's Messages API takes no top_k"
        if self.backend == "openai" and urlsplit(self.ref().endpoint).hostname == "api.openai.com":
            return "the OpenAI API takes no top_k"
        return None

    def api_key(self) -> SecretStr | None:
        """The API key from the environment variable named by ``api_key_env``.

        Raises:
            ValueError: The variable is named but not set.
        """
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set")
        return SecretStr(value)


def top_k_problem(
    section: str, params: SamplingParams, model: str, models: Mapping[str, BackendSettings]
) -> str | None:
    """Why ``section``'s top-k cannot be applied by its model (key ``model`` of
    ``models``), as a message naming the key; None when it can, or when it is off."""
    backend = models.get(model)
    reason = backend.top_k_refusal() if backend and params.sampled_top_k else None
    return f"{section}.top_k: {reason} (models.{model}); set it to 0 (off)" if reason else None


# How a model is reached, not what it computes: left out of configuration fingerprints.
_RUNTIME_ONLY = ("timeout", "max_concurrency", "retry", "max_batch_size", "device")


def missing_local_model(settings: BackendSettings) -> str | None:
    """What is wrong with a local model that names a folder which is not there, or None.

    A transformers model is a hub name (``namespace/name``) or a folder; one that reads
    as a path (``./…``, ``/…``, ``~/…`` or more than one ``/``) and does not exist would
    otherwise be sent to the hub and fail there with a message about repository ids."""
    if settings.backend != "transformers":
        return None
    name = settings.model
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if not looks_local or Path(name).expanduser().exists():
        return None
    hint = ""
    if "standins" in name:
        folder = Path(name).parent
        hint = f"; make the demo's stand-in models with `unsafechain standins --out {folder}`"
    return f"{name} is no folder here ({where_paths_start()}){hint}"


def content_fingerprint(content: dict) -> str:
    """The fingerprint of a configuration's JSON ``content`` (a ``model_dump``), its
    ``models`` table stripped of the settings that change how a model is reached but
    not what it computes (timeouts, concurrency, retries, batch size, device)."""
    import hashlib
    import json

    for model in (content.get("models") or {}).values():
        for key in _RUNTIME_ONLY:
            model.pop(key, None)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def create_backend(settings: BackendSettings) -> ModelBackend:
    """Build the backend ``settings`` describe."""
    if settings.backend == "transformers":
        from unsafechain.backends.transformers_backend import TransformersBackend

        return TransformersBackend(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            adapter=settings.adapter,
        )
    key = settings.api_key()
    secret = key.get_secret_value() if key else None
    if settings.backend == "openai":
        from unsafechain.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(
            settings.model,
            base_url=settings.base_url,
            api_key=secret,
            timeout=settings.timeout,
            max_concurrency=settings.max_concurrency,
            retry=settings.retry.policy(),
            max_tokens_param=settings.max_tokens_param,
        )
    from unsafechain.backends.tgi_backend import TGIBackend

    if settings.base_url is None:
        raise ValueError("base_url is required for the tgi backend")
    return TGIBackend(
        settings.model,
        base_url=settings.base_url,
        api_key=secret,
        timeout=settings.timeout,
        max_concurrency=settings.max_concurrency,
        retry=settings.retry.policy(),
    )
