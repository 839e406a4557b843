"""Slowing down when Azure asks, without Azure: Retry-After and AIMD concurrency."""

from __future__ import annotations

from types import SimpleNamespace

from azregfs.storage.throttle import (
    MAX_RETRY_AFTER,
    Concurrency,
    RetryAfterRetry,
    retry_after_seconds,
)


def test_retry_after_header() -> None:
    assert retry_after_seconds({"Retry-After": "3"}) == 3.0
    assert retry_after_seconds({"Retry-After": "100000"}) == MAX_RETRY_AFTER
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None


def test_backoff_is_at_least_what_the_service_asked() -> None:
    policy = RetryAfterRetry(initial_backoff=0, increment_base=1, random_jitter_range=0)
    answered = SimpleNamespace(http_response=SimpleNamespace(headers={"Retry-After": "7"}))
    settings = {"count": 1, "history": [answered]}
    assert policy.get_backoff_time(settings) == 7.0
    assert policy.get_backoff_time({"count": 1, "history": []}) < 7.0


def test_throttling_halves_once_per_cooldown_and_successes_add_back() -> None:
    limit = Concurrency(maximum=16, cooldown=1.0)
    limit.throttled(now=10.0)
    limit.throttled(now=10.5)  # the same burst: requests that were already in flight
    assert limit.limit == 8
    limit.throttled(now=11.0)
    limit.throttled(now=12.0)
    limit.throttled(now=13.0)
    limit.throttled(now=14.0)
    assert limit.limit == 1 and limit.decreases == 4  # never below one request
    for _ in range(1 + 2 + 3):
        limit.succeeded()
    assert limit.limit == 4  # one more after each `limit` successes in a row
    for _ in range(1000):
        limit.succeeded()
    assert limit.limit == 16
