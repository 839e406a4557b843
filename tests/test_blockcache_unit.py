"""The block cache's memory tier without Azure (azregfs/read/blockcache.py): a scan bigger
than the cache wipes neither the cache nor itself, and what fits keeps its hit ratio.
Counted in the driver's reads, never timed. The same reads through a mount are in
tests/test_cache.py."""

from __future__ import annotations

import random

import trio

from azregfs.read.blockcache import BlockCache, ReadStream

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
