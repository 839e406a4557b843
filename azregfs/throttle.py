"""Slowing down when Azure asks: Retry-After, and a request concurrency that adapts.

Azure answers 503 ServerBusy (or 500 OperationTimedOut) when an account or a blob is over
its limits, sometimes with ``Retry-After``. The storage SDK retries those, but its
exponential backoff ignores Retry-After and it never lowers the number of requests in
flight. Two pieces fix that:

- ``RetryAfterRetry``: the SDK's exponential retry, sleeping at least what the service's
  last ``Retry-After`` asked (capped at ``MAX_RETRY_AFTER``).
- ``Concurrency``: additive increase, multiplicative decrease of the driver's request
  concurrency. A throttled answer halves the limit (at most once per ``cooldown`` seconds,
  so one burst of 503s from requests already in flight counts once); every ``limit``
  consecutive successes add one, up to the configured ``max_concurrency``. Thread-safe:
  the outcomes are reported from the driver's worker threads, and the driver applies
  ``limit`` to its trio CapacityLimiter on the event loop's thread.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from azure.storage.blob import ExponentialRetry

MAX_RETRY_AFTER = 60.0


def retry_after_seconds(headers: Any) -> float | None:
    """The Retry-After header in seconds (delta-seconds form only, as Azure sends it)."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return None


class RetryAfterRetry(ExponentialRetry):
    """ExponentialRetry that honours the service's Retry-After."""

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        backoff = super().get_backoff_time(settings)
        history = settings.get("history") or []
        response = getattr(history[-1], "http_response", None) if history else None
        asked = retry_after_seconds(getattr(response, "headers", None))
        return max(backoff, asked) if asked is not None else backoff


class Concurrency:
    """AIMD limit on requests in flight."""

    def __init__(self, maximum: int, minimum: int = 1, cooldown: float = 1.0) -> None:
        self.maximum = maximum
        self.minimum = minimum
        self.cooldown = cooldown
        self.limit = maximum
        self.decreases = 0
        self._successes = 0
        self._last_decrease = float("-inf")
        self._lock = threading.Lock()

    def throttled(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._successes = 0
            if now - self._last_decrease < self.cooldown:
                return
            self._last_decrease = now
            new = max(self.minimum, self.limit // 2)
            if new != self.limit:
                self.limit = new
                self.decreases += 1

    def succeeded(self) -> None:
        with self._lock:
            if self.limit >= self.maximum:
                return
            self._successes += 1
            if self._successes >= self.limit:
                self._successes = 0
                self.limit += 1
