"""Bounded retries with exponential backoff that honour the server's ``Retry-After``."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

from unsafechain.backends.base import BackendError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry a failed backend call.

    Attributes:
        max_attempts: Total tries, the first included.
        initial_backoff: Seconds to wait before the second try.
        max_backoff: Upper bound on one wait, ``Retry-After`` included.
        multiplier: Growth of the wait from one try to the next.
        jitter: Fraction of the wait added or removed at random, so that many
            clients do not retry in lockstep.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff times must be >= 0")

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based).

        A server's ``Retry-After`` wins over the computed backoff, capped at
        ``max_backoff``.
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff)
        delay = min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        return max(0.0, delay * (1 + random.uniform(-self.jitter, self.jitter)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    description: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await ``call()``, retrying retryable :class:`BackendError` within ``policy``.

    Raises:
        BackendError: The last error, once it is not retryable or tries run out.
    """
    attempt = 1
    while True:
        try:
            return await call()
        except BackendError as error:
            if not error.retryable or attempt >= policy.max_attempts:
                if error.retryable:
                    logger.warning("%s failed after %d attempts: %s", description, attempt, error)
                raise
            delay = policy.backoff(attempt, error.retry_after)
            logger.info(
                "%s failed (attempt %d/%d): %s; retrying in %.2fs",
                description,
                attempt,
                policy.max_attempts,
                error,
                delay,
            )
            await sleep(delay)
            attempt += 1
