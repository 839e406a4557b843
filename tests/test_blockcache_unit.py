"""The block cache's memory tier without Azure (azregfs/read/blockcache.py): a scan bigger
than the cache wipes neither the cache nor itself, what fits keeps its hit ratio, and
readers of one blob at once share its GETs (single flight).
Counted in the driver's reads, never timed. The same reads through a mount are in
tests/test_cache.py."""

from __future__ import annotations

import errno
import random

import pytest
import trio
from trio.testing import MockClock

from azregfs.read.blockcache import BlockCache, ReadStream
from azregfs.storage.driver import StorageError

BLOCK = 64 * 1024
CAPACITY = 64 * BLOCK


class Blobs:
    """A driver holding blobs by name; it counts the bytes it serves."""

    def __init__(self, **blobs: bytes) -> None:
        self.blobs = blobs
        self.served = 0

    async def read(self, name: str, offset: int, length: int, etag: str | None = None) -> bytes:
        await trio.sleep(0)
        data = self.blobs[name][offset:offset + length]
        self.served += len(data)
        return data

    async def read_blocks(self, name: str, offset: int, length: int, etag: str,
                          piece: int) -> list[bytearray]:
        data = await self.read(name, offset, length, etag)
        return [bytearray(data[start:start + piece]) for start in range(0, len(data), piece)]


async def read_through(cache: BlockCache, name: str, size: int) -> bytes:
    """Read a blob front to back as a handle does, 128 KiB a request."""
    stream, parts = ReadStream(), []
    for offset in range(0, size, 2 * BLOCK):
        parts.append(await cache.read(name, "v1", size, offset, 2 * BLOCK, stream))
    return b"".join(parts)


def test_a_scan_bigger_than_the_cache_keeps_its_head_and_the_rest_of_the_cache() -> None:
    async def main() -> None:
        rng = random.Random(3)
        big, small = rng.randbytes(CAPACITY * 3 // 2), rng.randbytes(CAPACITY // 8)
        driver = Blobs(big=big, small=small)
        cache = BlockCache(driver, BLOCK, CAPACITY, 8 * BLOCK, stats_interval=0)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            cache.start(nursery)
            assert await read_through(cache, "small", len(small)) == small
            assert await read_through(cache, "big", len(big)) == big
            before = driver.served
            assert await read_through(cache, "small", len(small)) == small
            assert driver.served == before  # the scan left it alone
            assert await read_through(cache, "big", len(big)) == big
            # A plain LRU fetched all of it again; the head stays: at least half the cache.
            assert driver.served - before <= len(big) - CAPACITY // 2
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_what_fits_keeps_its_hit_ratio() -> None:
    async def main() -> None:
        data = random.Random(4).randbytes(CAPACITY * 7 // 10)
        driver = Blobs(f=data)
        cache = BlockCache(driver, BLOCK, CAPACITY, 8 * BLOCK, stats_interval=0)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            cache.start(nursery)
            assert await read_through(cache, "f", len(data)) == data
            before = driver.served
            assert await read_through(cache, "f", len(data)) == data
            assert driver.served == before  # every block a hit
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- single flight: readers of one version share its loads -------------------------------------


class SlowBlobs(Blobs):
    """Every read takes 10 ms (of a mock clock), so concurrent readers overlap; it counts
    its requests. `failing` reads raise, as a driver does once its retries are spent."""

    def __init__(self, **blobs: bytes) -> None:
        super().__init__(**blobs)
        self.requests = 0
        self.failing = 0

    async def read(self, name: str, offset: int, length: int, etag: str | None = None) -> bytes:
        self.requests += 1
        await trio.sleep(0.01)
        if self.failing:
            self.failing -= 1
            raise StorageError(errno.EIO, "injected")
        return await super().read(name, offset, length, etag)


def concurrent_reads(readers: int, stagger: float, size: int) -> tuple[int, int]:
    """Requests and bytes the driver served for `readers` reading one blob whole at once,
    each starting `stagger` seconds after the one before."""
    data = random.Random(5).randbytes(size)
    driver = SlowBlobs(f=data)

    async def main() -> None:
        cache = BlockCache(driver, BLOCK, 4 * size, 16 * BLOCK, stats_interval=0,  # type: ignore[arg-type]
                           max_fetch=8 * BLOCK)
        async with trio.open_nursery() as nursery:
            cache.start(nursery)
            async with trio.open_nursery() as clients:
                async def reader(delay: float) -> None:
                    await trio.sleep(delay)
                    assert await read_through(cache, "f", size) == data

                for index in range(readers):
                    clients.start_soon(reader, index * stagger)
            assert not cache._inflight
            nursery.cancel_scope.cancel()

    trio.run(main, clock=MockClock(autojump_threshold=0))
    return driver.requests, driver.served


def test_concurrent_readers_of_one_blob_share_its_gets() -> None:
    size = 100 * BLOCK + 123
    alone, _ = concurrent_reads(1, 0, size)
    for readers, stagger in ((8, 0.0), (8, 0.003), (8, 0.02)):
        requests, served = concurrent_reads(readers, stagger, size)
        assert served == size, (readers, stagger)  # each byte fetched once
        assert requests <= 1.1 * alone, (readers, stagger, requests, alone)


def test_a_failed_read_ahead_fails_its_waiters_and_the_next_read_loads_anew() -> None:
    async def main() -> None:
        data = random.Random(6).randbytes(40 * BLOCK)
        driver = SlowBlobs(f=data)
        cache = BlockCache(driver, BLOCK, CAPACITY, 16 * BLOCK, stats_interval=0,  # type: ignore[arg-type]
                           max_fetch=8 * BLOCK)
        async with trio.open_nursery() as nursery:
            cache.start(nursery)
            stream = ReadStream()
            assert await cache.read("f", "v1", len(data), 0, BLOCK, stream) == data[:BLOCK]
            driver.failing = 100  # every read-ahead in flight or queued fails
            with pytest.raises(StorageError):
                for offset in range(BLOCK, len(data), BLOCK):
                    await cache.read("f", "v1", len(data), offset, BLOCK, stream)
            await trio.sleep(1)
            assert not cache._inflight  # nothing claimed is left waiting forever
            driver.failing = 0
            cache.failed.forget(("f", "v1"))  # (the kernel's repeats are over: recent.py)
            assert await read_through(cache, "f", len(data)) == data
            nursery.cancel_scope.cancel()
        assert not cache._inflight

    trio.run(main, clock=MockClock(autojump_threshold=0))
