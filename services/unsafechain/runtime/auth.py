"""Bearer-token authentication of gRPC calls.

A call carries ``authorization: Bearer <token>`` metadata. Tokens come from the
settings (the environment) and from a token file. Neither the presented token nor
an accepted one is ever put into a log line or a status message.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from unsafechain.runtime.settings import ServerSettings, SettingsError

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_SCHEME = "bearer "


def read_token_file(path: Path) -> list[str]:
    """The tokens in ``path``: one per line, blank lines and ``#`` comments skipped.

    Raises:
        SettingsError: The file cannot be read or holds no token.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise SettingsError(f"auth_tokens_file: cannot read {path}: {error.strerror}") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise SettingsError(f"auth_tokens_file: {path} holds no token")
    return tokens


class TokenAuthenticator:
    """Accepts calls that present one of the configured bearer tokens.

    Args:
        tokens: The accepted tokens; at least one.
    """

    def __init__(self, tokens: Iterable[str]):
        self._tokens = tuple(token.encode() for token in dict.fromkeys(tokens) if token)
        if not self._tokens:
            raise ValueError("the authenticator needs at least one token")

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> TokenAuthenticator | None:
        """The authenticator the settings ask for, or None when no token is configured.

        Raises:
            SettingsError: The token file cannot be read or is empty.
        """
        tokens = [token.get_secret_value() for token in settings.auth_tokens]
        if settings.auth_tokens_file is not None:
            tokens += read_token_file(settings.auth_tokens_file)
        return cls(tokens) if tokens else None

    @property
    def tokens(self) -> tuple[str, ...]:
        """The accepted tokens, for redaction only."""
        return tuple(token.decode() for token in self._tokens)

    def problem(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """Why a call with ``metadata`` is refused, or None when it is accepted.

        The reason never repeats the presented value.
        """
        values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION]
        if not values:
            return "missing bearer token: send 'authorization: Bearer <token>' metadata"
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        if not value.lower().startswith(_SCHEME):
            return "the authorization metadata must use the Bearer scheme"
        presented = value[len(_SCHEME) :].strip().encode()
        # Every token is compared, in constant time, so timing tells nothing.
        matches = [hmac.compare_digest(presented, token) for token in self._tokens]
        return None if any(matches) else "invalid bearer token"
