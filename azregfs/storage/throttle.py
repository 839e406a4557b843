"""Slowing down when Azure asks: Retry-After, and a request concurrency that adapts.

Azure answers 503 ServerBusy (or 500 OperationTimedOut) when an account or a blob is over
its limits, sometimes with ``Retry-After``. The storage SDK retries those, but its
exponential backoff ignores Retry-After and it never lowers the number of requests in
flight. Two pieces fix that:

- ``RetryAfterRetry``: the SDK's exponential retry, sleeping what the service's last
  ``Retry-After`` asked (capped at ``MAX_RETRY_AFTER``), else the exponential backoff capped
  at ``MAX_BACKOFF``. A throttled answer is Azure asking us to slow down, not an error: it
  is retried without spending the ``retries`` budget (up to ``THROTTLE_RETRIES`` more), so
  sustained throttling slows the daemon down instead of failing requests with EIO.
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
MAX_BACKOFF = 10.0  # seconds: the exponential backoff's ceiling (Retry-After may ask more)
THROTTLE_RETRIES = 20  # retries of throttled answers on top of the `retries` budget
THROTTLE_CODES = frozenset({"ServerBusy", "OperationTimedOut"})


def retry_after_seconds(headers: Any) -> float | None:
    """The Retry-After header in seconds (delta-seconds form only, as Azure sends it)."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        return None


def asks_to_slow_down(response: Any) -> bool:
    """503 (ServerBusy), or 500 OperationTimedOut: what Azure answers when over its limits."""
    headers = getattr(response, "headers", None) or {}
    return getattr(response, "status_code", None) == 503 or \
        headers.get("x-ms-error-code") in THROTTLE_CODES


class RetryAfterRetry(ExponentialRetry):
    """ExponentialRetry that honours the service's Retry-After and outlasts throttling."""

    def configure_retries(self, request: Any) -> dict[str, Any]:
        settings = super().configure_retries(request)
        settings["throttle_retries"] = THROTTLE_RETRIES
        return settings

    def increment(self, settings: dict[str, Any], request: Any, response: Any = None,
                  error: Any = None) -> bool:
        if response is not None and asks_to_slow_down(response) and \
                settings.get("throttle_retries", 0) > 0:
            settings["throttle_retries"] -= 1
            settings["total"] += 1  # given back: the SDK takes one off for every retry
            settings["status"] += 1
        return super().increment(settings, request, response, error)

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        history = settings.get("history") or []
        response = getattr(history[-1], "http_response", None) if history else None
        asked = retry_after_seconds(getattr(response, "headers", None))
        if asked is not None:
            return asked  # the service said when
        return min(super().get_backoff_time(settings), MAX_BACKOFF)


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
