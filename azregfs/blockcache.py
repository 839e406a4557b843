"""The read path: a block cache keyed by (blob name, ETag, block index), with read-ahead.

Invariants:
- A block is only ever stored under the ETag it was read with (reads are conditional on
  that ETag), so once a new ETag is known no block of the old version can be served.
- Concurrent readers of one block wait on one download (``_inflight``), never several.
- Memory is bounded in bytes (``cache_size``); read-ahead only fills that cache, through a
  CapacityLimiter, so it can never run ahead of the bound.
- A handle that reads sequentially has the next blocks fetched ahead of it, the window
  doubling with the run up to ``read_ahead``; a random read fetches just the aligned range
  it needs and bypasses the cache, as a ranged GET would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cachetools
import trio

from .driver import Driver

log = logging.getLogger(__name__)

RANDOM_ALIGN = 4096
Key = tuple[str, str, int]


@dataclass
class ReadStream:
    """Per-handle access pattern: where the last read ended and how far to read ahead."""

    next_offset: int = -1
    run: int = 0  # bytes read sequentially so far
    prefetched_to: int = 0  # block index up to which read-ahead was requested

    def observe(self, offset: int, size: int) -> bool:
        sequential = offset == self.next_offset or offset == 0
        self.run = self.run + size if sequential else 0
        self.next_offset = offset + size
        return sequential


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_from_azure: int = 0
    evictions: int = 0
    prefetched: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Blocks(cachetools.LRUCache):
    def __init__(self, capacity: int, stats: CacheStats) -> None:
        super().__init__(maxsize=capacity, getsizeof=len)
        self._stats = stats

    def popitem(self):  # type: ignore[override]
        self._stats.evictions += 1
        return super().popitem()


@dataclass
class _Download:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class BlockCache:
    def __init__(
        self, driver: Driver, block_size: int, capacity: int, read_ahead: int,
        concurrency: int = 8,
    ) -> None:
        self.driver = driver
        self.block_size = block_size
        self.read_ahead = read_ahead
        self.stats = CacheStats()
        self.blocks = _Blocks(max(capacity, block_size), self.stats)
        self._inflight: dict[Key, _Download] = {}
        self._prefetch_limiter = trio.CapacityLimiter(concurrency)
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def read(
        self, name: str, etag: str, blob_size: int, offset: int, size: int,
        stream: ReadStream | None = None,
    ) -> bytes:
        """Bytes [offset, offset+size) of the version `etag` of blob `name`."""
        end = min(offset + size, blob_size)
        if offset >= end:
            return b""
        sequential = stream.observe(offset, size) if stream else True
        first = offset // self.block_size
        last = (end - 1) // self.block_size
        cached = all((name, etag, i) in self.blocks for i in range(first, last + 1))
        if not sequential and not cached:
            return await self._direct(name, etag, blob_size, offset, end)
        if stream is not None and sequential:
            self._read_ahead(name, etag, blob_size, last, stream)
        parts = []
        for index in range(first, last + 1):
            block = await self.block(name, etag, blob_size, index)
            start = index * self.block_size
            parts.append(block[max(offset - start, 0):end - start])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _direct(self, name: str, etag: str, blob_size: int, offset: int, end: int) -> bytes:
        """A random read: just the aligned range, not cached (a ranged GET, as the SDK)."""
        self.stats.misses += 1
        start = offset - offset % RANDOM_ALIGN
        stop = min(blob_size, -(-end // RANDOM_ALIGN) * RANDOM_ALIGN)
        data = await self.driver.read(name, start, stop - start, etag)
        self.stats.bytes_from_azure += len(data)
        return data[offset - start:end - start]

    async def block(self, name: str, etag: str, blob_size: int, index: int) -> bytes:
        key = (name, etag, index)
        data = self.blocks.get(key)
        if data is not None:
            self.stats.hits += 1
            return data
        download = self._inflight.get(key)
        if download is None:
            self.stats.misses += 1
            return await self._fetch(key, blob_size)
        await download.done.wait()
        if download.error is not None:
            raise download.error
        assert download.data is not None
        return download.data

    async def _fetch(self, key: Key, blob_size: int) -> bytes:
        name, etag, index = key
        download = self._inflight[key] = _Download()
        try:
            start = index * self.block_size
            length = min(self.block_size, blob_size - start)
            data = await self.driver.read(name, start, length, etag)
            self.stats.bytes_from_azure += len(data)
            download.data = data
            self.blocks[key] = data
            return data
        except BaseException as exc:
            download.error = exc
            raise
        finally:
            del self._inflight[key]
            download.done.set()

    def _read_ahead(
        self, name: str, etag: str, blob_size: int, last: int, stream: ReadStream
    ) -> None:
        if self._nursery is None or stream.run < self.block_size // 2:
            return
        window = min(self.read_ahead, max(self.block_size, stream.run))
        final = min((blob_size - 1) // self.block_size, last + window // self.block_size)
        for index in range(max(last + 1, stream.prefetched_to), final + 1):
            key = (name, etag, index)
            if key not in self.blocks and key not in self._inflight:
                self._nursery.start_soon(self._prefetch, key, blob_size)
        stream.prefetched_to = max(stream.prefetched_to, final + 1)

    async def _prefetch(self, key: Key, blob_size: int) -> None:
        async with self._prefetch_limiter:
            if key in self.blocks or key in self._inflight:
                return
            self.stats.prefetched += 1
            try:
                await self._fetch(key, blob_size)
            except Exception as exc:  # noqa: BLE001 - the reader will retry and report
                log.debug("read-ahead of %s block %d failed: %s", key[0], key[2], exc)

    def put(self, name: str, etag: str, index: int, data: bytes) -> None:
        """Seed a block we already hold (e.g. just written) so it need not be read back."""
        self.blocks[(name, etag, index)] = data
