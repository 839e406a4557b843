"""One question to Azure shared by everyone who asks it meanwhile (single flight).

The first asker makes the request and lands its answer or its error in the Flight; the
others, arriving while it is in flight, wait for that and get the same answer, or the same
exception raised again. Used for lookups of one path (namespace.py) and loads of one cache
block (blockcache.py). A Flight is landed exactly once, and its owner removes it from its
table in the same step (no await between), so a later asker starts a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


@dataclass(eq=False)
class Flight(Generic[T]):
    done: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None

    def land(self, value: T) -> None:
        self.value = value
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    async def result(self) -> T:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[no-any-return]
