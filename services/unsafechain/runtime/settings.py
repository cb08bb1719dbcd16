"""Typed settings for a service process and for a service client, from flags and the
environment.

This module is the one place that reads the environment for them. A service process
reads ``UNSAFECHAIN_*`` variables, nested sections with ``__`` (for example
``UNSAFECHAIN_MODEL__BASE_URL``, ``UNSAFECHAIN_JUDGE__BATCH_MAX_SIZE``); a client reads
``UNSAFECHAIN_CLIENT_*``. Flags given on the command line win over the environment.
Secrets (bearer tokens, API keys) are held as :class:`~pydantic.SecretStr` and never
shown by :meth:`ServiceSettings.public_view`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from unsafechain.backends.settings import BackendSettings, SamplingSettings, StrictModel
from unsafechain.domain.types import JudgeTarget, SamplingParams
from unsafechain.judge.engine import PromptFormat

ServiceName = Literal["generation", "judge", "correction"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("generation", "judge", "correction")

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class SettingsError(ValueError):
    """Settings are missing or invalid; the message names each offending key."""


class GenerationOptions(SamplingSettings):
    """Sampling for generate requests that carry no sampling settings of their own."""


class JudgeOptions(StrictModel):
    """The judge a judge or correction service runs, and how the judge service batches.

    Attributes:
        name: Recorded on every verdict.
        prompt_format: How the Llama Guard prompt is rendered.
        threshold: Unsafe score at or above which a verdict is unsafe.
        targets: Parts of a completion judged when a request names none.
        batch_max_size: Most (prompt, response) pairs sent to the model together.
        batch_max_wait_ms: Longest a request waits for others to share its batch.
    """

    name: Annotated[str, Field(min_length=1)] = "llama-guard"
    prompt_format: PromptFormat = PromptFormat.AUTO
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    targets: Annotated[tuple[JudgeTarget, ...], Field(min_length=1)] = (JudgeTarget.FULL,)
    batch_max_size: Annotated[int, Field(ge=1)] = 32
    batch_max_wait_ms: Annotated[float, Field(ge=0)] = 5.0


class CorrectionOptions(StrictModel):
    """How the correction service corrects.

    Attributes:
        max_attempts: Tries per unsafe completion.
        temperature: Corrector sampling temperature.
        top_p: Corrector nucleus sampling mass.
        max_new_tokens: Upper bound on tokens per attempt.
        templates: Folder with ``system.md`` and ``user.md.j2``; default: bundled.
    """

    max_attempts: Annotated[int, Field(ge=1)] = 3
    temperature: Annotated[float, Field(ge=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    max_new_tokens: Annotated[int, Field(ge=1)] = 2048
    templates: Path | None = None

    def params(self) -> SamplingParams:
        """Sampling settings for one attempt."""
        return SamplingParams(
            n=1, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens
        )


class ServiceSettings(BaseSettings):
    """Everything one service process needs, logged once at start without secrets.

    Attributes:
        service: Which service this process runs.
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
        model: The service's model: generator, guard or corrector.
        judge_model: The guard model the correction service re-judges with.
        generation: Default sampling of the generation service.
        judge: The judge of the judge and correction services.
        correction: Settings of the correction service.
    """

    model_config = SettingsConfigDict(
        env_prefix="UNSAFECHAIN_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    service: ServiceName
    host: str = "[::]"
    port: Annotated[int, Field(ge=0, le=65535)] = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    max_message_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: Annotated[int, Field(ge=1)] | None = None
    grace_period: Annotated[float, Field(ge=0)] = 30.0
    health_interval: Annotated[float, Field(gt=0)] = 5.0
    health_timeout: Annotated[float, Field(gt=0)] = 5.0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    auth_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    auth_tokens_file: Path | None = None
    model: BackendSettings | None = None
    judge_model: BackendSettings | None = None
    generation: GenerationOptions = GenerationOptions()
    judge: JudgeOptions = JudgeOptions()
    correction: CorrectionOptions = CorrectionOptions()

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        # A comma-separated list reads best in an environment variable.
        if isinstance(value, str):
            return tuple(token.strip() for token in value.split(",") if token.strip())
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if self.model is None:
            raise ValueError(f"model: the {self.service} service needs a model")
        if self.service == "correction" and self.judge_model is None:
            raise ValueError("judge_model: the correction service needs a guard model")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @property
    def uses_tls(self) -> bool:
        """Whether the server speaks TLS."""
        return self.tls_cert_file is not None

    def public_view(self) -> dict[str, Any]:
        """The settings as logged: secrets left out, token sources only counted."""
        view = self.model_dump(mode="json", exclude={"auth_tokens"})
        view["auth_tokens"] = f"{len(self.auth_tokens)} from the environment"
        return view


class ClientSettings(BaseSettings):
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
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
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
# given are left out, so the environment and the defaults fill in.
# ---------------------------------------------------------------------------


def _flag(group: argparse._ArgumentGroup, flag: str, key: str, help: str, **kwargs: Any) -> None:
    if "choices" not in kwargs and kwargs.get("action") != "store_true":
        kwargs.setdefault("metavar", key.rpartition(".")[2].upper())
    group.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=help, **kwargs)


def _add_backend_flags(parser: argparse.ArgumentParser, prefix: str, key: str, role: str) -> None:
    group = parser.add_argument_group(f"{role} model")
    _flag(
        group,
        f"--{prefix}backend",
        f"{key}.backend",
        "transformers, openai or tgi",
        choices=["transformers", "openai", "tgi"],
    )
    _flag(group, f"--{prefix}model", f"{key}.model", "hub name, local path or served name")
    _flag(group, f"--{prefix}base-url", f"{key}.base_url", "server URL (openai, tgi)")
    _flag(
        group,
        f"--{prefix}api-key-env",
        f"{key}.api_key_env",
        "name of the environment variable holding the API key",
    )
    _flag(group, f"--{prefix}device", f"{key}.device", "device for local models (auto, cpu, cuda)")
    _flag(
        group,
        f"--{prefix}dtype",
        f"{key}.dtype",
        "weight dtype for local models",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    _flag(
        group, f"--{prefix}backend-timeout", f"{key}.timeout", "seconds per remote call", type=float
    )
    _flag(
        group,
        f"--{prefix}backend-max-concurrency",
        f"{key}.max_concurrency",
        "remote calls in flight at once",
        type=int,
    )
    _flag(
        group,
        f"--{prefix}forward-batch-size",
        f"{key}.max_batch_size",
        "sequences per forward pass of a local model",
        type=int,
    )


def _add_judge_flags(parser: argparse.ArgumentParser, *, batching: bool) -> None:
    group = parser.add_argument_group("judge")
    _flag(group, "--judge-name", "judge.name", "name recorded on every verdict")
    _flag(
        group,
        "--prompt-format",
        "judge.prompt_format",
        "how the guard prompt is rendered",
        choices=[f.value for f in PromptFormat],
    )
    _flag(group, "--threshold", "judge.threshold", "unsafe score threshold", type=float)
    _flag(
        group,
        "--targets",
        "judge.targets",
        "parts judged when a request names none",
        nargs="+",
        choices=[t.value for t in JudgeTarget],
    )
    if batching:
        _flag(
            group,
            "--batch-max-size",
            "judge.batch_max_size",
            "most pairs judged in one model call",
            type=int,
        )
        _flag(
            group,
            "--batch-max-wait-ms",
            "judge.batch_max_wait_ms",
            "longest a request waits to share a batch",
            type=float,
        )


def add_serve_arguments(parser: argparse.ArgumentParser, service: ServiceName) -> None:
    """Add the flags of ``unsafechain serve <service>`` to ``parser``."""
    server = parser.add_argument_group("server")
    _flag(server, "--host", "host", "address to listen on (default [::])")
    _flag(server, "--port", "port", "gRPC port; 0 picks a free one (default 50051)", type=int)
    _flag(server, "--metrics-host", "metrics_host", "Prometheus endpoint address")
    _flag(server, "--metrics-port", "metrics_port", "Prometheus port (default 9464)", type=int)
    _flag(server, "--max-message-bytes", "max_message_bytes", "largest message", type=int)
    _flag(server, "--max-concurrent-rpcs", "max_concurrent_rpcs", "calls served at once", type=int)
    _flag(server, "--grace-period", "grace_period", "seconds to drain on SIGTERM", type=float)
    _flag(
        server, "--health-interval", "health_interval", "seconds between backend checks", type=float
    )
    _flag(server, "--health-timeout", "health_timeout", "seconds per backend check", type=float)
    security = parser.add_argument_group("security")
    _flag(security, "--tls-cert", "tls_cert_file", "PEM server certificate chain")
    _flag(security, "--tls-key", "tls_key_file", "PEM server private key")
    _flag(
        security,
        "--tls-client-ca",
        "tls_client_ca_file",
        "PEM CA that client certificates must chain to (mutual TLS)",
    )
    _flag(
        security,
        "--auth-tokens-file",
        "auth_tokens_file",
        "file of accepted bearer tokens, one per line (also UNSAFECHAIN_AUTH_TOKENS)",
    )
    role = {"generation": "generator", "judge": "guard", "correction": "corrector"}[service]
    _add_backend_flags(parser, "", "model", role)
    if service == "generation":
        group = parser.add_argument_group("default sampling (requests without their own)")
        _flag(group, "--samples", "generation.samples", "completions per request", type=int)
        _flag(group, "--temperature", "generation.temperature", "0 is greedy", type=float)
        _flag(group, "--top-p", "generation.top_p", "nucleus mass", type=float)
        _flag(
            group,
            "--max-new-tokens",
            "generation.max_new_tokens",
            "tokens per completion",
            type=int,
        )
    if service in ("judge", "correction"):
        _add_judge_flags(parser, batching=service == "judge")
    if service == "correction":
        _add_backend_flags(parser, "judge-", "judge_model", "re-judging guard")
        group = parser.add_argument_group("correction")
        _flag(group, "--max-attempts", "correction.max_attempts", "tries per completion", type=int)
        _flag(group, "--temperature", "correction.temperature", "corrector temperature", type=float)
        _flag(group, "--top-p", "correction.top_p", "corrector nucleus mass", type=float)
        _flag(
            group, "--max-new-tokens", "correction.max_new_tokens", "tokens per attempt", type=int
        )
        _flag(group, "--templates", "correction.templates", "folder of prompt templates")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that say how to reach a service (``--server``, TLS, token)."""
    group = parser.add_argument_group("connection")
    _flag(group, "--server", "address", "host:port of the service", required=True)
    _flag(group, "--tls", "tls", "use TLS with the system's CAs", action="store_true")
    _flag(group, "--ca-file", "ca_file", "PEM CA to verify the server with (implies TLS)")
    _flag(group, "--cert-file", "cert_file", "PEM client certificate (mutual TLS)")
    _flag(group, "--key-file", "key_file", "PEM client private key (mutual TLS)")
    _flag(group, "--server-name", "server_name", "name the server certificate must carry")
    _flag(
        group,
        "--token-file",
        "token_file",
        "file holding the bearer token (also UNSAFECHAIN_CLIENT_TOKEN)",
    )
    _flag(group, "--timeout", "timeout", "deadline per call in seconds", type=float)


def _nested(flags: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for dotted, value in flags.items():
        if dotted.split(".")[0] not in keys:
            continue
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return values


def _describe(error: ValidationError) -> str:
    problems = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        problems.append(f"{key}: {message}" if key else message)
    return "; ".join(problems)


def service_settings(service: ServiceName, args: argparse.Namespace) -> ServiceSettings:
    """The service settings from parsed ``serve`` flags over the environment.

    Raises:
        SettingsError: A setting is missing or invalid; the message names it.
    """
    flags = _nested(vars(args), set(ServiceSettings.model_fields))
    flags["service"] = service
    try:
        return ServiceSettings(**flags)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def client_settings(args: argparse.Namespace) -> ClientSettings:
    """The client settings from parsed connection flags over the environment.

    Raises:
        SettingsError: A setting is missing or invalid; the message names it.
    """
    try:
        return ClientSettings(**_nested(vars(args), set(ClientSettings.model_fields)))
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None
