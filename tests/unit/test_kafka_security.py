"""TLS and SASL towards the Kafka brokers: the settings say which, refuse a half-given
one by name, and become the arguments every kafka-python client is built with; the
SASL password comes from the environment and never from the configuration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from unsafechain.domain.settings import SetupError
from unsafechain.streaming.kafka import KafkaSecuritySettings, KafkaSettings


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol() -> None:
    assert KafkaSettings().security.client_arguments() == {"security_protocol": "PLAINTEXT"}


def test_tls_with_a_client_certificate_passes_the_files() -> None:
    security = KafkaSecuritySettings(
        protocol="SSL", ca_file="/tls/ca.crt", cert_file="/tls/tls.crt", key_file="/tls/tls.key"
    )
    assert security.client_arguments() == {
        "security_protocol": "SSL",
        "ssl_cafile": "/tls/ca.crt",
        "ssl_certfile": "/tls/tls.crt",
        "ssl_keyfile": "/tls/tls.key",
    }


def test_sasl_reads_the_password_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_PASSWORD", "pw-from-env")
    security = KafkaSecuritySettings(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="builder",
        sasl_password_env="KAFKA_PASSWORD",
    )
    assert security.client_arguments() == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "builder",
        "sasl_plain_password": "pw-from-env",
    }
    assert "pw-from-env" not in repr(security)


def test_an_unset_password_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_PASSWORD", raising=False)
    security = KafkaSecuritySettings(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="builder",
        sasl_password_env="KAFKA_PASSWORD",
    )
    with pytest.raises(SetupError, match="KAFKA_PASSWORD"):
        security.client_arguments()


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"protocol": "PLAINTEXT", "ca_file": "/ca.crt"}, "ca_file"),
        ({"protocol": "SSL", "cert_file": "/tls.crt"}, "key_file"),
        ({"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}, "sasl_username"),
        ({"protocol": "SSL", "sasl_username": "builder"}, "SASL"),
        ({"protocol": "TLS"}, "protocol"),
        ({"sasl_password": "inline"}, "sasl_password"),
    ],
)
def test_inconsistent_security_is_refused_by_name(given: dict[str, str], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        KafkaSecuritySettings.model_validate(given)
