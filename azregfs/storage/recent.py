"""Failures remembered for a moment, so the kernel's immediate repeats cost nothing.

One failing system call often reaches the daemon as several FUSE requests: a read(2) whose
readahead READ fails is asked again for its page (filemap_read_folio), and lookups of one
name that wait on each other in the kernel (d_alloc_parallel) each send their own after the
first fails. Without a memory, each repeat asks Azure again with full retries -- during an
outage the n-th caller waits n times the per-request bound -- and logs its own ERROR line.

Invariants:
- Only storage failures (EIO) are remembered, for ``seconds`` (1 s by default) after they
  were seen, and at most ``maxsize`` keys: a caller that tries again a moment later asks
  Azure again.
- A repeat is raised as a new exception of the original's type and errno, marked
  ``repeated`` so that it is logged at debug level, not as a second ERROR line.
- A key is forgotten as soon as this mount changes what it names (``forget``).
"""

from __future__ import annotations

import errno
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

import cachetools

K = TypeVar("K", bound=Hashable)

FAILURE_MEMORY = 1.0  # seconds: long enough for the kernel's repeats, short for a retry


class Failure(Protocol):
    errno: int
    repeated: bool

    def __init__(self, code: int, message: str) -> None: ...


class RecentFailures(Generic[K]):
    def __init__(self, seconds: float = FAILURE_MEMORY, maxsize: int = 4096) -> None:
        self._failures: cachetools.TTLCache[K, Failure] = cachetools.TTLCache(
            maxsize=maxsize, ttl=seconds)

    def check(self, key: K) -> None:
        """Raise again the failure noted for key less than a moment ago, if any."""
        failure = self._failures.get(key)
        if failure is not None:
            repeat = type(failure)(failure.errno, f"{failure} (again, not asked again)")
            repeat.repeated = True
            raise repeat  # type: ignore[misc]

    def note(self, key: K, failure: Failure) -> None:
        """Remember failure for key if it is the storage failing."""
        if failure.errno == errno.EIO:
            self._failures[key] = failure

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)
