"""A local PKI for trying the services with TLS and tokens: a CA, a server certificate
for the hosts named, a client certificate for mutual TLS, and a file of one bearer
token, as ``make certs`` writes them (into the git-ignored ``.cache/certs``).

These are for a laptop or a test, not for production: the CA's key sits beside what it
signed. ``cryptography`` comes with the dev extra (``make setup``).

Example::

    python -m unsafechain.runtime.devcerts --out .cache/certs
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class LocalPki:
    """The files :func:`make_local_pki` wrote.

    Attributes:
        ca: The CA certificate (the clients' ``--ca-file``, the server's
            ``--tls-client-ca`` for mutual TLS).
        server_cert: The server certificate (``--tls-cert``).
        server_key: Its key (``--tls-key``).
        client_cert: The client certificate (``--cert-file``).
        client_key: Its key (``--key-file``).
        tokens: One bearer token (the server's ``--auth-tokens-file``; the client's
            ``--token-file``).
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    tokens: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def make_ca(common_name: str, days: int = 1) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key."""
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return _validity(builder, days).sign(key, hashes.SHA256()), key


def make_leaf(
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    days: int = 1,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate ``ca`` signed for a server (for ``hosts``: names and addresses) or
    a client, and its key."""
    ca_cert, ca_key = ca
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_subject_name(host) for host in hosts]), critical=False
        )
    return _validity(builder, days).sign(ca_key, hashes.SHA256()), key


def _subject_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_pem(
    folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[Path, Path | None]:
    """``<name>.crt`` and, with a key, ``<name>.key`` (readable by the owner only)."""
    cert_path = folder / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = folder / f"{name}.key"
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def make_local_pki(
    folder: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 30
) -> LocalPki:
    """Write a CA, a server certificate for ``hosts``, a client certificate and a token
    file into ``folder`` (made if missing); keys and the token readable by the owner only."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca("unsafechain local CA", days)
    ca_path, _ = write_pem(folder, "ca", ca[0])
    server_cert, server_key = write_pem(
        folder, "server", *make_leaf(hosts[0], ca, server=True, hosts=hosts, days=days)
    )
    client_cert, client_key = write_pem(
        folder, "client", *make_leaf("unsafechain-client", ca, server=False, days=days)
    )
    assert server_key is not None and client_key is not None
    tokens = folder / "tokens"
    tokens.touch(mode=0o600)
    tokens.chmod(0o600)
    # The token alone: the server reads it as its accepted tokens, a client as its own.
    tokens.write_text(f"{secrets.token_urlsafe(32)}\n")
    return LocalPki(ca_path, server_cert, server_key, client_cert, client_key, tokens)


def main(argv: list[str] | None = None) -> int:
    """``python -m unsafechain.runtime.devcerts``: write the files, say where."""
    parser = argparse.ArgumentParser(prog="python -m unsafechain.runtime.devcerts")
    parser.add_argument("--out", type=Path, default=Path(".cache/certs"), help="folder")
    parser.add_argument(
        "--host", action="append", help="a name or address the server certificate is for "
        "(repeatable; default localhost and 127.0.0.1)",
    )  # fmt: skip
    parser.add_argument("--days", type=int, default=30, help="validity in days")
    args = parser.parse_args(argv)
    pki = make_local_pki(args.out, hosts=tuple(args.host or ("localhost", "127.0.0.1")),
                         days=args.days)  # fmt: skip
    for name, path in vars(pki).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
