"""The read path: block cache (memory and disk tiers), read-ahead, one GET per block for
concurrent readers, keep_cache, and the cache statistics.

The unit tests run the BlockCache under trio against the session's Azurite (no mocks);
the others read through a real mount.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import trio
from azure.storage.blob import ContainerClient

from azregfs.config import Config
from azregfs.demo.azurite import Azurite
from azregfs.read.blockcache import BlockCache, CacheStats, DiskTier
from azregfs.storage.driver import Driver, StorageError

MiB = 1024 * 1024
BLOCK = 1 * MiB


def make_driver(azurite: Azurite, container: ContainerClient) -> Driver:
    cfg = Config(connection_string=azurite.connection_string, container=container.container_name)
    return Driver(cfg)


def upload(container: ContainerClient, name: str, data: bytes) -> str:
    blob = container.get_blob_client(name)
    return blob.upload_blob(data, overwrite=True)["etag"]


def read_file(path: Path, chunk: int = MiB) -> bytes:
    with open(path, "rb") as handle:
        parts = []
        while piece := handle.read(chunk):
            parts.append(piece)
    return b"".join(parts)


def disk_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and p.name != "lock"]


# -- unit tests: BlockCache and DiskTier under trio, against Azurite -------------------------


def test_concurrent_readers_of_one_block_share_one_get(azurite, container):
    data = os.urandom(3 * BLOCK)
    etag = upload(container, "blob", data)
    driver = make_driver(azurite, container)
    cache = BlockCache(driver, BLOCK, 16 * MiB, read_ahead=0, stats_interval=0)
    results: list[bytes] = []

    async def reader(offset: int) -> None:
        results.append(bytes(await cache.read("blob", etag, len(data), offset, 4096)))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            cache.start(nursery)
            for number in range(16):
                nursery.start_soon(reader, BLOCK + number * 4096)

    try:
        trio.run(main)
    finally:
        driver.close()
    assert driver.metrics.requests["read"] == 1
    assert sorted(results) == sorted(data[BLOCK + n * 4096:BLOCK + (n + 1) * 4096]
                                     for n in range(16))
    assert cache.stats.misses == 1 and cache.stats.hits == 0  # 15 waited on the one GET


def test_new_etag_never_serves_an_old_block(azurite, container):
    old, new = os.urandom(2 * BLOCK), os.urandom(2 * BLOCK)
    old_etag = upload(container, "blob", old)
    driver = make_driver(azurite, container)
    cache = BlockCache(driver, BLOCK, 16 * MiB, read_ahead=0, stats_interval=0)

    async def main() -> None:
        assert await cache.read("blob", old_etag, len(old), 0, BLOCK) == old[:BLOCK]
        new_etag = upload(container, "blob", new)
        assert await cache.read("blob", new_etag, len(new), 0, BLOCK) == new[:BLOCK]
        # The old version's cached block is still its own bytes; an uncached one is ESTALE.
        assert await cache.read("blob", old_etag, len(old), 0, 100) == old[:100]
        with pytest.raises(StorageError) as caught:
            await cache.read("blob", old_etag, len(old), BLOCK, 100)
        assert caught.value.errno == errno.ESTALE

    try:
        trio.run(main)
    finally:
        driver.close()


def test_disk_tier_files_are_private_atomic_and_survive_a_restart(azurite, container, tmp_path):
    data = os.urandom(3 * BLOCK + 123)
    etag = upload(container, "dir/blob", data)
    cache_dir = tmp_path / "cache"
    driver = make_driver(azurite, container)

    def run(cache: BlockCache) -> bytes:
        async def main() -> bytes:
            async with trio.open_nursery() as nursery:
                cache.start(nursery)
                content = await cache.read("dir/blob", etag, len(data), 0, len(data))
            return content  # the nursery waited for the background disk writes

        return trio.run(main)

    try:
        disk = DiskTier(str(cache_dir), 64 * MiB, namespace="ns")
        disk.open()
        first = BlockCache(driver, BLOCK, 16 * MiB, 0, disk=disk, stats_interval=0)
        assert run(first) == data
        disk.close()
        assert driver.metrics.requests["read"] == 4
        files = disk_files(cache_dir)
        assert len(files) == 4
        assert not [p for p in files if p.name.endswith(".tmp")]
        assert stat.S_IMODE(os.stat(disk.directory).st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}

        # A new process (fresh memory tier) finds every block on disk: no GET at all.
        disk = DiskTier(str(cache_dir), 64 * MiB, namespace="ns")
        disk.open()
        second = BlockCache(driver, BLOCK, 16 * MiB, 0, disk=disk, stats_interval=0)
        assert run(second) == data
        disk.close()
        assert driver.metrics.requests["read"] == 4
        assert second.stats.disk_hits == 4 and second.stats.bytes_from_azure == 0

        # Another container (namespace) sharing the directory never sees those files.
        other = DiskTier(str(cache_dir), 64 * MiB, namespace="other")
        other.open()
        assert len(other.index) == 0
        other.close()
    finally:
        driver.close()


def test_disk_tier_is_bounded_lru_and_trims_at_startup(tmp_path):
    stats = CacheStats()
    block = b"x" * 1000
    file_size = 1000 + 16  # payload plus header

    async def fill(disk: DiskTier, names: list[str]) -> None:
        for name in names:
            await disk.put(name, block, stats)

    names = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(10)]
    disk = DiskTier(str(tmp_path), 5 * file_size, namespace="ns")
    disk.open()
    trio.run(fill, disk, names[:5])

    async def touch_first() -> None:
        assert await disk.get(names[0], 1000, stats) == block

    trio.run(touch_first)  # names[0] becomes the most recently used
    trio.run(fill, disk, names[5:7])
    assert set(disk.index) == {names[0], *names[3:7]}
    assert disk.used == 5 * file_size
    assert len(disk_files(tmp_path)) == 5
    assert stats.disk_evictions == 2
    disk.close()

    # At startup the order comes back from the files' mtimes, and a smaller bound trims.
    for age, name in enumerate(reversed([names[0], *names[3:7]])):
        stamp = time.time() - 100 * (age + 1)
        os.utime(Path(disk.directory) / name, (stamp, stamp))
    (Path(disk.directory) / f"{names[8]}.123.tmp").write_bytes(b"left by a crash")
    smaller = DiskTier(str(tmp_path), 2 * file_size, namespace="ns")
    smaller.open()
    assert list(smaller.index) == [names[5], names[6]]
    assert len(disk_files(tmp_path)) == 2
    smaller.close()


def test_disk_tier_damaged_file_is_a_miss_and_a_second_user_is_refused(tmp_path):
    stats = CacheStats()
    name = hashlib.sha256(b"k").hexdigest()
    disk = DiskTier(str(tmp_path), MiB, namespace="ns")
    disk.open()
    trio.run(disk.put, name, b"y" * 5000, stats)
    with pytest.raises(OSError) as caught:
        DiskTier(str(tmp_path), MiB, namespace="ns").open()
    assert caught.value.errno == errno.EBUSY
    path = Path(disk.directory) / name
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))

    async def main() -> None:
        assert await disk.get(name, 5000, stats) is None
        assert await disk.get(name, 5000, stats) is None  # forgotten, not re-read

    trio.run(main)
    assert name not in disk.index and not path.exists() and disk.used == 0
    disk.close()


def test_statistics_are_logged_at_debug_when_they_change(azurite, container, caplog):
    etag = upload(container, "blob", b"z" * 10)
    driver = make_driver(azurite, container)
    cache = BlockCache(driver, BLOCK, 16 * MiB, 0, stats_interval=0.05)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            cache.start(nursery)
            await cache.read("blob", etag, 10, 0, 10)
            await cache.read("blob", etag, 10, 0, 10)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

    caplog.set_level(logging.DEBUG, logger="azregfs.read.blockcache")
    try:
        trio.run(main)
    finally:
        driver.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache:")]
    assert len(lines) == 1, lines  # logged once: nothing changed after that
    assert "hits=1" in lines[0] and "misses=1" in lines[0] and "bytes_from_azure=10" in lines[0]


# -- through a mount -------------------------------------------------------------------------


def test_sequential_read_of_64_mib_is_read_ahead_and_correct(container, mount_factory):
    data = os.urandom(64 * MiB)
    upload(container, "big", data)
    mount = mount_factory(container.container_name)
    assert hashlib.sha256(read_file(mount.path / "big")).digest() == \
        hashlib.sha256(data).digest()
    cache = mount.stats()["cache"]
    assert cache["prefetched"] > 0
    assert cache["bytes_from_azure"] <= len(data) * 1.05  # read ahead, not read twice
    assert cache["hits"] > cache["misses"]
    # Read-ahead fetches runs of blocks per ranged GET, not one GET per 1 MiB block.
    assert mount.stats()["driver"]["requests"]["read"] < 64 // 2
    assert "kernel read-ahead of" in mount.log()  # root here: the mount's bdi was tuned


def test_keep_cache_while_the_etag_is_unchanged_dropped_when_it_changes(container,
                                                                      mount_factory):
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    upload(container, "f", old)
    mount = mount_factory(container.container_name)
    path = mount.path / "f"
    assert read_file(path) == old
    before = mount.stats()
    time.sleep(1.2)  # past revalidate_window: this open asks Azure (a HEAD, or the lookup's
    assert read_file(path) == old  # LIST), and finds the same ETag
    after = mount.stats()
    assert sum(after["driver"]["requests"].values()) > sum(before["driver"]["requests"].values())
    # Served by the kernel's page cache: the daemon saw no read at all.
    assert (after["cache"]["hits"], after["cache"]["misses"]) == \
        (before["cache"]["hits"], before["cache"]["misses"])

    upload(container, "f", new)
    time.sleep(1.2)
    assert read_file(path) == new


def test_an_unchanged_blob_is_served_by_the_page_cache_from_its_second_open(container,
                                                                           mount_factory):
    """Whatever told the mount the ETag last -- a listing (Azure sends it bare) or a HEAD
    (quoted) -- the version is the same: the second open keeps the kernel's pages, and no
    block is fetched again (issue 18: a 256 MiB blob was read from Azure twice)."""
    data = os.urandom(24 * MiB)
    upload(container, "big", data)
    mount = mount_factory(container.container_name)
    path = mount.path / "big"
    with open(path, "rb") as handle:
        assert handle.read() == data  # its ETag from the lookup's listing
        time.sleep(1.2)
        os.fstat(handle.fileno())  # past attr_timeout: a getattr, answered by a HEAD
    before = mount.stats()
    assert read_file(path) == data  # the lookup finds the HEAD's answer fresh
    after = mount.stats()
    assert after["driver"]["requests"].get("read", 0) == \
        before["driver"]["requests"].get("read", 0)
    assert (after["cache"]["hits"], after["cache"]["misses"]) == \
        (before["cache"]["hits"], before["cache"]["misses"])  # not even asked: page cache


def test_eight_readers_of_one_blob_at_once_share_its_gets(container, mount_factory):
    """Eight processes reading one blob at once (eight clients pulling one layer) cost the
    GETs one reader costs, and each byte comes from Azure once (issue 18). Their handles
    share the kernel's page cache, so each sees its reads skip what the others brought in."""
    data = os.urandom(64 * MiB)
    upload(container, "alone", data)
    upload(container, "shared", data)
    mount = mount_factory(container.container_name)

    def gets_for(name: str, readers: int) -> tuple[int, int]:
        before = mount.stats()
        processes = [subprocess.Popen(["cat", str(mount.path / name)],
                                      stdout=subprocess.DEVNULL) for _ in range(readers)]
        assert [process.wait() for process in processes] == [0] * readers
        after = mount.stats()
        return (after["driver"]["requests"].get("read", 0)
                - before["driver"]["requests"].get("read", 0),
                after["cache"]["bytes_from_azure"] - before["cache"]["bytes_from_azure"])

    alone, alone_bytes = gets_for("alone", 1)
    shared, shared_bytes = gets_for("shared", 8)
    assert alone_bytes == shared_bytes == len(data)
    assert shared <= 1.1 * alone, (shared, alone)
    assert hashlib.sha256(read_file(mount.path / "shared")).digest() == \
        hashlib.sha256(data).digest()
