import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from unsafechain.backends.base import BackendError, BackendUnavailable
from unsafechain.backends.retry import (
    RetryPolicy,
    call_with_retries,
    parse_retry_after,
)


def test_backoff_grows_exponentially_and_is_capped():
    policy = RetryPolicy(initial_backoff=1, multiplier=2, max_backoff=5, jitter=0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]


def test_retry_after_wins_over_backoff_but_is_capped():
    policy = RetryPolicy(initial_backoff=1, max_backoff=10, jitter=0)
    assert policy.backoff(1, retry_after=7) == 7
    assert policy.backoff(1, retry_after=60) == 10


def test_retry_after_header_as_seconds_or_http_date():
    assert parse_retry_after("3") == 3
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < parse_retry_after(later) <= 30


def test_retryable_errors_are_retried_with_the_servers_delay():
    waits, calls = [], []

    async def sleep(seconds):
        waits.append(seconds)

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise BackendUnavailable("429", retry_after=2.5)
        return "ok"

    policy = RetryPolicy(max_attempts=5, jitter=0)
    result = asyncio.run(call_with_retries(flaky, policy, description="t", sleep=sleep))
    assert result == "ok"
    assert waits == [2.5, 2.5]


def test_non_retryable_errors_and_exhausted_attempts_raise():
    async def sleep(seconds):
        pass

    async def broken():
        raise BackendError("bad request")

    async def down():
        raise BackendUnavailable("503")

    with pytest.raises(BackendError, match="bad request"):
        asyncio.run(call_with_retries(broken, RetryPolicy(), description="t", sleep=sleep))
    with pytest.raises(BackendUnavailable):
        asyncio.run(
            call_with_retries(down, RetryPolicy(max_attempts=3), description="t", sleep=sleep)
        )
