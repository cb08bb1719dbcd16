"""Test certificates made at run time: a CA, a server certificate for the loopback
host and a client certificate, as PEM files, for TLS and mutual-TLS tests.

Nothing is read from or written to a fixed place: every test session makes its own,
valid for a day, with small, fast EC keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unsafechain.runtime.devcerts import make_ca, make_leaf, write_pem


@dataclass(frozen=True)
class CertificateFiles:
    """PEM files of one test PKI.

    Attributes:
        ca: The CA certificate that signed both the server and the client certificate.
        server_cert: Server certificate for ``localhost`` and ``127.0.0.1``.
        server_key: Its private key.
        client_cert: Client certificate (common name ``test-client``).
        client_key: Its private key.
        other_ca: A CA that signed nothing here, for certificates that must be refused.
        other_client_cert: A client certificate signed by ``other_ca``.
        other_client_key: Its private key.
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def make_certificates(folder: Path) -> CertificateFiles:
    """Create a CA, a server and a client certificate (and a stranger's) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca("unsafechain test CA")
    other = make_ca("another CA")
    ca_path, _ = write_pem(folder, "ca", ca[0])
    other_ca_path, _ = write_pem(folder, "other-ca", other[0])
    server_cert, server_key = write_pem(folder, "server", *make_leaf("localhost", ca, server=True))
    client_cert, client_key = write_pem(
        folder, "client", *make_leaf("test-client", ca, server=False)
    )
    other_cert, other_key = write_pem(
        folder, "other-client", *make_leaf("stranger", other, server=False)
    )
    assert server_key and client_key and other_key
    return CertificateFiles(
        ca=ca_path,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca=other_ca_path,
        other_client_cert=other_cert,
        other_client_key=other_key,
    )
