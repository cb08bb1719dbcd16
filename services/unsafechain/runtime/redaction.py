"""Keeping secrets out of log lines and error messages.

What a service never writes is the first defence; this is the second: every secret
the process knows (bearer tokens, backend API keys) is masked in each formatted log
line, tracebacks included, and in each error message sent to a client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from unsafechain.backends.http_common import redact

MASK = "[redacted]"


class Redactor:
    """Masks known secrets in text.

    Args:
        secrets: The values to mask; empty ones are ignored.
    """

    def __init__(self, secrets: Iterable[str] = ()):
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        """``text`` with every known secret masked."""
        for secret in self._secrets:
            text = redact(text, secret)
        return text

    def __bool__(self) -> bool:
        return bool(self._secrets)


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner`` and masks secrets in the result, tracebacks included."""

    def __init__(self, inner: logging.Formatter, redactor: Redactor):
        super().__init__()
        self._inner = inner
        self._redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self._redactor(self._inner.format(record))


def install_log_redaction(redactor: Redactor) -> None:
    """Mask ``redactor``'s secrets in everything the root logger's handlers write."""
    if not redactor:
        return
    for handler in logging.getLogger().handlers:
        handler.setFormatter(RedactingFormatter(handler.formatter or logging.Formatter(), redactor))
