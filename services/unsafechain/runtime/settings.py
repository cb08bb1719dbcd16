"""Typed settings of a service process and of a service client, from flags, the
environment and a configuration file.

This module is the one place that reads the environment for them. A service process
reads ``UNSAFECHAIN_*`` variables, nested sections with ``__`` (for example
``UNSAFECHAIN_MODEL__BASE_URL``); a client reads ``UNSAFECHAIN_CLIENT_*``. Flags given
on the command line win over the environment, and the environment over a file given
with ``--config``. Secrets (bearer tokens, API keys) are held as
:class:`~pydantic.SecretStr` and never shown by :meth:`ServerSettings.public_view`.

Each service declares its own settings class on :class:`ServerSettings`, made of the
same stage settings the build configuration uses, so an option is declared once.

Kubernetes injects service-link variables into every pod (``<SERVICE>_PORT=tcp://…``,
``<SERVICE>_SERVICE_HOST``); a Service named ``unsafechain`` would turn them into
``UNSAFECHAIN_PORT=tcp://10.0.0.7:50051``. Such values are never settings and are
ignored here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from unsafechain.backends.settings import BackendSettings
from unsafechain.domain.settings import ConfigPath, StrictModel, describe_error, from_file

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# The value of a Kubernetes service-link variable: tcp://10.0.0.7:50051.
_SERVICE_LINK = re.compile(r"^(tcp|udp|sctp)://[^\s/]+:\d+$")


class SettingsError(ValueError):
    """Settings are missing or invalid; the message names each offending key."""


class _EnvWithoutServiceLinks(EnvSettingsSource):
    """The environment, less the service-link variables Kubernetes injects."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            name: value
            for name, value in super()._load_env_vars().items()
            if value is None or not _SERVICE_LINK.match(value)
        }


class _EnvSettings(BaseSettings):
    """Settings read from ``UNSAFECHAIN_*`` variables, service links left out."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvWithoutServiceLinks(settings_cls), file_secret_settings


class RequestLimits(StrictModel):
    """Bounds on one request, enforced before any model sees it: a request over one is
    refused with INVALID_ARGUMENT naming the field and the bound.

    Attributes:
        max_chars: Characters of text in one request item (a conversation; a prompt
            with its response or completion).
        max_samples: Completions one generation request may ask for.
        max_new_tokens: New tokens one completion may ask for.
        max_items: Items of one batch request.
    """

    max_chars: Annotated[int, Field(ge=1)] = 200_000
    max_samples: Annotated[int, Field(ge=1)] = 64
    max_new_tokens: Annotated[int, Field(ge=1)] = 32_768
    max_items: Annotated[int, Field(ge=1)] = 256


class ServerSettings(_EnvSettings):
    """What every service process has besides its stage: where it listens, how it is
    secured and limited, how it checks its backends. Logged once at start, without
    secrets.

    Attributes:
        host: Address the gRPC server listens on.
        port: gRPC port; 0 picks a free one.
        metrics_host: Address of the Prometheus HTTP endpoint.
        metrics_port: Prometheus port; 0 picks a free one.
        max_message_bytes: Largest request or response message accepted.
        max_concurrent_rpcs: Calls served at once; more are refused with
            RESOURCE_EXHAUSTED. None: no limit.
        grace_period: Seconds calls in flight may take to finish after SIGTERM.
        health_interval: Seconds between backend health checks.
        health_timeout: Seconds one backend health check may take.
        tls_cert_file: PEM server certificate chain; with ``tls_key_file`` turns TLS on.
        tls_key_file: PEM private key of the server certificate.
        tls_client_ca_file: PEM CA bundle; when set, clients must present a
            certificate it signed (mutual TLS).
        auth_tokens: Bearer tokens accepted (``UNSAFECHAIN_AUTH_TOKENS``, comma-separated).
        auth_tokens_file: File with one accepted bearer token per line (``#`` comments).
        limits: Bounds on one request.
    """

    model_config = SettingsConfigDict(
        env_prefix="UNSAFECHAIN_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    # The service's name: generation, judge, correction.
    service: ClassVar[str]
    # The sections a ``--config`` file contributes, as in a build configuration.
    config_sections: ClassVar[tuple[str, ...]] = ()

    host: str = "[::]"
    port: Annotated[int, Field(ge=0, le=65535)] = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    max_message_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: Annotated[int, Field(ge=1)] | None = None
    grace_period: Annotated[float, Field(ge=0)] = 30.0
    health_interval: Annotated[float, Field(gt=0)] = 5.0
    health_timeout: Annotated[float, Field(gt=0)] = 5.0
    tls_cert_file: ConfigPath | None = None
    tls_key_file: ConfigPath | None = None
    tls_client_ca_file: ConfigPath | None = None
    auth_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    auth_tokens_file: ConfigPath | None = None
    limits: RequestLimits = RequestLimits()

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        # A comma-separated list reads best in an environment variable.
        if isinstance(value, str):
            return tuple(token.strip() for token in value.split(",") if token.strip())
        return value

    @model_validator(mode="after")
    def _tls_consistent(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @property
    def uses_tls(self) -> bool:
        """Whether the server speaks TLS."""
        return self.tls_cert_file is not None

    def backends(self) -> Iterable[BackendSettings]:
        """The models the service runs, whose API keys must never be logged."""
        return ()

    def public_view(self) -> dict[str, Any]:
        """The settings as logged: secrets left out, token sources only counted."""
        view = self.model_dump(mode="json", exclude={"auth_tokens"})
        view["auth_tokens"] = f"{len(self.auth_tokens)} from the environment"
        return {"service": self.service, **view}


def fold_model_shorthand(
    values: object, shorthand: str, models_key: str, default_key: str
) -> object:
    """Move a service's ``shorthand`` model (``--model …`` flags, ``UNSAFECHAIN_MODEL__*``)
    into its ``models`` table under the key its stage names (``default_key`` unless the
    stage section says another), for a ``mode="before"`` model validator.

    Raises:
        ValueError: The model table already has a different model under that key.
    """
    if not isinstance(values, dict) or values.get(shorthand) is None:
        return values
    values = dict(values)
    model = values.pop(shorthand)
    models = dict(values.get(models_key) or {})
    if default_key in models and models[default_key] != model:
        raise ValueError(
            f"{shorthand}: models.{default_key} is configured too; give the model once"
        )
    models[default_key] = model
    values[models_key] = models
    return values


class ClientSettings(_EnvSettings):
    """How a client reaches a service.

    Attributes:
        address: ``host:port`` of the service.
        tls: Speak TLS, trusting the system's CAs unless ``ca_file`` is set.
        ca_file: PEM CA bundle to verify the server with; implies TLS.
        cert_file: PEM client certificate for mutual TLS; implies TLS.
        key_file: PEM private key of ``cert_file``.
        server_name: Name to verify the server certificate against, when it differs
            from the host in ``address``.
        token: Bearer token (``UNSAFECHAIN_CLIENT_TOKEN``).
        token_file: File holding the bearer token.
        timeout: Deadline of each call, in seconds.
        max_message_bytes: Largest message sent or received.
    """

    model_config = SettingsConfigDict(env_prefix="UNSAFECHAIN_CLIENT_", extra="forbid", frozen=True)

    address: Annotated[str, Field(min_length=1)]
    tls: bool = False
    ca_file: ConfigPath | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    server_name: str | None = None
    token: SecretStr | None = None
    token_file: ConfigPath | None = None
    timeout: Annotated[float, Field(gt=0)] = 60.0
    max_message_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_MESSAGE_BYTES

    @model_validator(mode="after")
    def _consistent(self) -> ClientSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        return self

    @property
    def uses_tls(self) -> bool:
        """Whether the channel speaks TLS."""
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def bearer_token(self) -> SecretStr | None:
        """The bearer token, read from ``token_file`` when that is set.

        Raises:
            SettingsError: The token file cannot be read or is empty.
        """
        if self.token_file is None:
            return self.token
        try:
            value = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise SettingsError(
                f"token_file: cannot read {self.token_file}: {error.strerror}"
            ) from None
        if not value:
            raise SettingsError(f"token_file: {self.token_file} is empty")
        return SecretStr(value)


# ---------------------------------------------------------------------------
# Command-line flags. Each flag's dest is the dotted settings key it sets; flags not
# given are left out, so the environment, the config file and the defaults fill in.
# ---------------------------------------------------------------------------


def flag(group: argparse._ArgumentGroup, name: str, key: str, help: str, **kwargs: Any) -> None:
    """Add flag ``name`` setting the dotted settings ``key`` to ``group``."""
    if "choices" not in kwargs and kwargs.get("action") != "store_true":
        kwargs.setdefault("metavar", key.rpartition(".")[2].upper())
    group.add_argument(name, dest=key, default=argparse.SUPPRESS, help=help, **kwargs)


def add_sampling_flags(group: argparse._ArgumentGroup, section: str, per: str) -> None:
    """``--temperature``, ``--top-p``, ``--top-k`` and ``--max-new-tokens`` for the
    sampling settings of ``section`` (tokens counted per ``per``)."""
    flag(group, "--temperature", f"{section}.temperature", "0 is greedy", type=float)
    flag(group, "--top-p", f"{section}.top_p", "nucleus mass", type=float)
    flag(group, "--top-k", f"{section}.top_k", "most likely tokens kept; 0 is off", type=int)
    flag(group, "--max-new-tokens", f"{section}.max_new_tokens", f"tokens per {per}", type=int)


def add_backend_flags(parser: argparse.ArgumentParser, prefix: str, key: str, role: str) -> None:
    """Flags ``--{prefix}backend``, ``--{prefix}model``, … setting the model ``key``."""
    group = parser.add_argument_group(f"{role} model")
    flag(
        group,
        f"--{prefix}backend",
        f"{key}.backend",
        "transformers, openai or tgi",
        choices=["transformers", "openai", "tgi"],
    )
    flag(group, f"--{prefix}model", f"{key}.model", "hub name, local path or served name")
    flag(group, f"--{prefix}base-url", f"{key}.base_url", "server URL (openai, tgi)")
    flag(
        group,
        f"--{prefix}api-key-env",
        f"{key}.api_key_env",
        "name of the environment variable holding the API key",
    )
    flag(group, f"--{prefix}device", f"{key}.device", "device for local models (auto, cpu, cuda)")
    flag(
        group,
        f"--{prefix}dtype",
        f"{key}.dtype",
        "weight dtype for local models",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    flag(
        group, f"--{prefix}backend-timeout", f"{key}.timeout", "seconds per remote call", type=float
    )
    flag(
        group,
        f"--{prefix}backend-max-concurrency",
        f"{key}.max_concurrency",
        "remote calls in flight at once",
        type=int,
    )
    flag(
        group,
        f"--{prefix}forward-batch-size",
        f"{key}.max_batch_size",
        "sequences per forward pass of a local model",
        type=int,
    )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every ``unsafechain serve`` command: listening, limits, security and
    ``--config``."""
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="a build configuration (YAML) whose sections for this stage (models and the "
        "stage's own) the service runs; flags and the environment win over it",
    )
    server = parser.add_argument_group("server")
    flag(server, "--host", "host", "address to listen on (default [::])")
    flag(server, "--port", "port", "gRPC port; 0 picks a free one (default 50051)", type=int)
    flag(server, "--metrics-host", "metrics_host", "Prometheus endpoint address")
    flag(server, "--metrics-port", "metrics_port", "Prometheus port (default 9464)", type=int)
    flag(server, "--max-message-bytes", "max_message_bytes", "largest message", type=int)
    flag(server, "--max-concurrent-rpcs", "max_concurrent_rpcs", "calls served at once", type=int)
    flag(server, "--grace-period", "grace_period", "seconds to drain on SIGTERM", type=float)
    flag(
        server, "--health-interval", "health_interval", "seconds between backend checks", type=float
    )
    flag(server, "--health-timeout", "health_timeout", "seconds per backend check", type=float)
    limits = parser.add_argument_group("request limits")
    flag(
        limits, "--limit-chars", "limits.max_chars", "characters of text per request item", type=int
    )
    flag(limits, "--limit-samples", "limits.max_samples", "completions per request", type=int)
    flag(
        limits,
        "--limit-new-tokens",
        "limits.max_new_tokens",
        "new tokens per completion",
        type=int,
    )
    flag(limits, "--limit-items", "limits.max_items", "items per batch request", type=int)
    security = parser.add_argument_group("security")
    flag(security, "--tls-cert", "tls_cert_file", "PEM server certificate chain")
    flag(security, "--tls-key", "tls_key_file", "PEM server private key")
    flag(
        security,
        "--tls-client-ca",
        "tls_client_ca_file",
        "PEM CA that client certificates must chain to (mutual TLS)",
    )
    flag(
        security,
        "--auth-tokens-file",
        "auth_tokens_file",
        "file of accepted bearer tokens, one per line (also UNSAFECHAIN_AUTH_TOKENS)",
    )


def add_client_arguments(
    parser: argparse.ArgumentParser,
    *,
    required: bool = True,
    title: str = "connection",
    description: str | None = None,
) -> argparse._ArgumentGroup:
    """Add the flags that say how to reach a service (``--server``, TLS, token); with
    ``required=False`` the command also runs without ``--server``. Returns the group,
    for the command's own flags of the same kind."""
    group = parser.add_argument_group(title, description)
    flag(group, "--server", "address", "host:port of the service", required=required)
    flag(group, "--tls", "tls", "use TLS with the system's CAs", action="store_true")
    flag(group, "--ca-file", "ca_file", "PEM CA to verify the server with (implies TLS)")
    flag(group, "--cert-file", "cert_file", "PEM client certificate (mutual TLS)")
    flag(group, "--key-file", "key_file", "PEM client private key (mutual TLS)")
    flag(group, "--server-name", "server_name", "name the server certificate must carry")
    flag(
        group,
        "--token-file",
        "token_file",
        "file holding the bearer token (also UNSAFECHAIN_CLIENT_TOKEN)",
    )
    flag(group, "--timeout", "timeout", "deadline per call in seconds", type=float)
    return group


def nested_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Parsed flags whose dests are dotted keys, as nested mappings."""
    values: dict[str, Any] = {}
    for dotted, value in flags.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return values


def merge_mappings(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_sections(path: Path, sections: Iterable[str]) -> dict[str, Any]:
    """The named top-level sections of a YAML configuration file.

    Raises:
        SettingsError: The file is missing or not a YAML mapping.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SettingsError(f"config: cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SettingsError(f"config: {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"config: {path} must be a mapping of sections")
    # Its relative paths start from its folder (unsafechain.domain.settings.FileText).
    return {key: from_file(raw[key], path.parent) for key in sections if key in raw}


SettingsT = TypeVar("SettingsT", bound=ServerSettings)


def settings_from_values(
    cls: type[SettingsT], values: Mapping[str, Any], config: Path | None = None
) -> SettingsT:
    """Settings ``cls`` from ``values`` (flags) over the environment over ``config``.

    A value given in ``config`` that the environment also sets is taken from the
    environment: init values win in pydantic-settings, so the file's values are
    passed only where the environment has none.

    Raises:
        SettingsError: A setting is missing or invalid; the message names it.
    """
    file_values = read_config_sections(config, cls.config_sections) if config else {}
    try:
        if file_values:
            file_values = merge_mappings(file_values, _EnvWithoutServiceLinks(cls)())
        return cls(**merge_mappings(file_values, values))
    except ValidationError as error:
        raise SettingsError(describe_error(error)) from None


def client_settings(args: argparse.Namespace) -> ClientSettings:
    """The client settings from parsed connection flags over the environment.

    Raises:
        SettingsError: A setting is missing or invalid; the message names it.
    """
    flags = {key: value for key, value in vars(args).items() if key in ClientSettings.model_fields}
    try:
        return ClientSettings(**nested_flags(flags))
    except ValidationError as error:
        raise SettingsError(describe_error(error)) from None


def flag_values(
    args: argparse.Namespace, cls: type[BaseSettings], extra: Iterable[str] = ()
) -> dict[str, Any]:
    """The parsed flags that set fields of ``cls`` (or the ``extra`` top-level keys), as
    nested mappings."""
    keys = set(cls.model_fields) | set(extra)
    return nested_flags(
        {dotted: value for dotted, value in vars(args).items() if dotted.split(".")[0] in keys}
    )


def settings_from_args(cls: type[SettingsT], args: argparse.Namespace) -> SettingsT:
    """A service's settings from its parsed ``serve`` flags, the environment and the
    file given with ``--config``.

    Raises:
        SettingsError: A setting is missing or invalid; the message names it.
    """
    return settings_from_values(cls, flag_values(args, cls), getattr(args, "config", None))
