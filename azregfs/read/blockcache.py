"""The read path: a block cache keyed by (blob name, ETag, block index), with read-ahead.

Two tiers: memory (always; an LRU bounded in bytes by ``cache_size``) and, when
``cache_dir`` is set, local disk (an LRU bounded by ``cache_dir_size`` that survives a
remount). A block fetched from Azure goes to both; a memory miss that the disk holds is
read back from disk, off the event loop, and promoted.

Invariants:
- A block is only ever stored under the ETag it was read with (reads are conditional on
  that ETag), so once a new ETag is known no block of the old version can be served. The
  disk tier keys its files by a hash of the same triple (plus account, container and block
  size), so a remount with another ETag or another block size never finds an old file.
- Concurrent readers of one block wait on one load (``_inflight``), never several, whether
  that load comes from disk or from Azure.
- One version bigger than half the memory tier evicts its own blocks past its head, not
  the rest of the cache (``_Blocks``): a scan wipes neither the cache nor itself.
- Memory is bounded in bytes: cached blocks, pinned versions and the ranged GETs in flight
  together fit ``cache_size``. A GET (or disk read) counts twice its length while it runs
  (the most one holds: a disk read and a GET without the driver's fast path read their
  bytes whole, then split them into blocks; the fast path reads into the blocks at once),
  waits while the GETs in flight already hold ``fetch_room`` (half of cache_size), and
  the memory tier evicts what no longer fits beside them (``_Blocks.outside``).
- A handle that reads sequentially has the next blocks fetched ahead of it, the window
  doubling with the run up to ``read_ahead`` and refilled in runs of consecutive blocks,
  one ranged GET per run; a random read of a block nobody holds fetches just the aligned
  range it needs and bypasses the cache, as a ranged GET would.
- Read-ahead runs lie on a grid (cells of up to ``max_fetch``) and are claimed (``_claim``:
  a Flight per block, no await) before they wait for a GET slot. So handles reading one
  version at once -- whose reads skip, since they share the kernel's page cache -- ask
  for the same cells and share them whole: eight readers cost one reader's GETs. Every
  claimed Flight is landed or failed (``_load``, ``_drop``), never left waiting.
- Disk files are written to a temporary name and renamed into place, carry their length and
  CRC32 in a header, and are checked when read: a crash or a torn write costs a miss, never
  wrong bytes.
- Pins: a version (name, ETag) no larger than ``whole_max`` (min(read_ahead, 8 MiB)) can be
  held whole for open handles (``pin``/``unpin``, counted per holder), fetched in one ranged
  GET of the blocks not already held, so a reader keeps one version even after the blob is
  replaced or deleted. Pinned blocks are the cache's own objects (shared, not copied);
  what the LRU has evicted but a pin keeps is bounded by ``pin_budget`` (cache_size / 4).
  A pin that does not fit is refused and the handle reads by ETag as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import cachetools
import trio

from ..storage.driver import Driver, StorageError
from ..storage.flight import Flight
from ..storage.recent import RecentFailures

log = logging.getLogger(__name__)

RANDOM_ALIGN = 4096
WHOLE_READ_MAX = 8 * 1024 * 1024  # the largest version a handle fetches whole (pins)
Key = tuple[str, str, int]
Block = bytes | bytearray  # a GET reads blocks into buffers of their own; never changed after
Run = dict[Key, Flight[Block]]  # claimed blocks, consecutive, loaded together


@dataclass
class ReadStream:
    """Per-handle access pattern: where the last read ended and how far to read ahead."""

    next_offset: int = -1
    run: int = 0  # bytes read sequentially so far
    prefetched_to: int = 0  # block index up to which read-ahead was requested

    def observe(self, offset: int, size: int, slack: int = 0) -> bool:
        """Note a read; is it sequential? A read landing up to `slack` bytes past the last
        one's end goes on with the run: the kernel's page cache is shared by every handle of
        a file, so with several readers each handle's reads skip what the others brought
        in. So does one up to `slack` behind it: the kernel's READs of one file, in flight
        together, may arrive out of order."""
        ahead = offset - self.next_offset
        sequential = offset == 0 or ahead == 0 or (self.next_offset >= 0 and abs(ahead) <= slack)
        self.run = self.run + size if sequential else 0
        if offset == 0 or not sequential or ahead > 0:
            self.next_offset = offset + size  # (a late read behind the stream leaves it)
        return sequential


@dataclass
class CacheStats:
    hits: int = 0  # reader block reads served without Azure (memory or disk)
    misses: int = 0  # reader block reads that went to Azure
    memory_hits: int = 0  # reader block reads served from memory
    memory_misses: int = 0  # reader block reads memory could not serve (disk or Azure)
    disk_misses: int = 0  # blocks the disk tier did not hold, fetched from Azure
    bytes_from_azure: int = 0
    evictions: int = 0
    prefetched: int = 0
    disk_hits: int = 0
    disk_writes: int = 0
    disk_evictions: int = 0
    disk_errors: int = 0
    known: int = 0  # small versions whose content was proven without a GET (known.py)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Blocks(cachetools.LRUCache):
    """The memory tier, an LRU bounded in bytes together with ``outside``: what the read
    path holds beside it (pinned versions, GETs in flight) takes room from the LRU.

    Scan resistant: a version that holds more than ``share`` (half the tier: the GETs in
    flight may hold the other half) makes room for its next block -- or for a GET about to
    start, when it is the biggest version -- by evicting its own lowest block past its head
    and well behind its newest (the one its reader passed longest ago; before there is
    one, the last of its head), never one read ahead, and not the tier's. A
    blob bigger than the cache, read twice, finds its head still cached the second time (a
    plain LRU evicts each block just before it is needed again), and the rest of the cache
    survives the scan. Versions within the share are plain LRU."""

    def __init__(self, capacity: int, stats: CacheStats, block_size: int,
                 read_ahead: int) -> None:
        super().__init__(maxsize=capacity, getsizeof=len)
        self._stats = stats
        self.outside = 0
        self.share = capacity // 2
        self.head_blocks = max(1, self.share // block_size)
        self.version_bytes: dict[tuple[str, str], int] = {}
        self.version_order: dict[tuple[str, str], OrderedDict[int, None]] = {}
        self.version_newest: dict[tuple[str, str], int] = {}  # highest block index stored
        # Blocks a reader may still be behind the newest one: the read-ahead window, and
        # the kernel's own read-ahead and requests in flight beside it.
        self.margin_blocks = read_ahead // block_size + 2
        self._growing: tuple[str, str] | None = None  # the version being inserted

    def __getitem__(self, key: Key) -> Block:
        value = super().__getitem__(key)
        self.version_order[key[:2]].move_to_end(key[2])
        return value

    def __delitem__(self, key: Key) -> None:
        value = super().__getitem__(key) if key in self else b""
        super().__delitem__(key)
        version = key[:2]
        order = self.version_order[version]
        del order[key[2]]
        self.version_bytes[version] -= len(value)
        if not order:
            del self.version_order[version], self.version_bytes[version]
            del self.version_newest[version]

    def popitem(self):  # type: ignore[override]
        self._stats.evictions += 1
        victim = self._own_victim()
        if victim is not None:
            return victim, self.pop(victim)
        return super().popitem()

    def _own_victim(self) -> Key | None:
        version = self._growing
        if version is None:  # room for a GET about to start: the biggest version pays
            version = max(self.version_bytes, key=self.version_bytes.__getitem__,
                          default=None)
        if version is None or self.version_bytes.get(version, 0) <= self.share:
            return None
        # The lowest block past the head and well behind the newest one: the one a
        # sequential reader passed longest ago, never one read ahead of it.
        behind = self.version_newest[version] - self.margin_blocks
        passed = [index for index in self.version_order[version] if index < behind]
        past_head = [index for index in passed if index >= self.head_blocks]
        if past_head:
            return (*version, min(past_head))
        return (*version, max(passed)) if passed else None  # else: the head's end

    def __setitem__(self, key: Key, value: Block) -> None:
        version = key[:2]
        if key in self:
            del self[key]
        self._growing = version
        try:
            super().__setitem__(key, value)
            self.version_order.setdefault(version, OrderedDict())[key[2]] = None
            self.version_newest[version] = max(self.version_newest.get(version, 0), key[2])
            self.version_bytes[version] = self.version_bytes.get(version, 0) + len(value)
            self.fit()
        finally:
            self._growing = None

    def fit(self) -> None:
        """Evict least recently used blocks until they fit beside ``outside``."""
        while self.currsize and self.currsize + self.outside > self.maxsize:
            self.popitem()


class _FetchRoom:
    """Bytes the GETs in flight may hold at once; each counts twice its length, and takes
    that much room from the memory tier until it ends. A GET waits while others hold the
    room (one alone always runs, whatever its size)."""

    def __init__(self, blocks: _Blocks, limit: int) -> None:
        self.blocks = blocks
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    @contextlib.asynccontextmanager
    async def hold(self, length: int) -> AsyncIterator[None]:
        cost = 2 * length
        while self.used and self.used + cost > self.limit:
            await self._lot.park()
        self.used += cost
        self.blocks.outside += cost
        self.blocks.fit()
        try:
            yield
        finally:
            self.used -= cost
            self.blocks.outside -= cost
            self._lot.unpark_all()


@dataclass
class _Pin:
    blocks: list[Block]
    size: int
    holders: int = 0


# -- the disk tier ---------------------------------------------------------------------------

_HEADER = struct.Struct("<4sQI")  # magic, payload length, CRC32 of the payload
_MAGIC = b"AZB1"
_NAME_LENGTH = 64  # hex digits of a SHA-256
LOCK_FILE = "lock"


def _is_block_file(name: str) -> bool:
    return len(name) == _NAME_LENGTH and all(c in "0123456789abcdef" for c in name)


class DiskTier:
    """Blocks as files in one private directory, LRU-bounded in bytes.

    The index (file name -> bytes on disk, least recently used first) lives on the trio
    thread; worker threads only touch files. A name leaves the index before its file is
    unlinked, so a reader either sees the file or misses; a file that vanished under a
    reader is a miss too.
    """

    def __init__(self, directory: str, capacity: int, namespace: str,
                 concurrency: int = 4, max_pending: int = 64 * 1024 * 1024) -> None:
        # One subdirectory per account and container: a shared cache_dir then never mixes
        # two containers, and we only ever chmod a directory we created.
        digest = hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self.directory = os.path.join(directory, f"azregfs-{digest}")
        self.capacity = capacity
        self.namespace = namespace
        self.used = 0  # bytes of indexed files plus writes in progress
        self.index: OrderedDict[str, int] = OrderedDict()
        self.writing: set[str] = set()
        self.pending_bytes = 0
        self.max_pending = max_pending
        self._limiter = trio.CapacityLimiter(concurrency)
        self._lock_fd: int | None = None

    # -- startup (synchronous: runs before the event loop) -------------------------------

    def open(self) -> None:
        """Create or adopt the directory, take its lock, index it and trim it to the bound."""
        parent = os.path.dirname(self.directory)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.directory, 0o700)
        info = os.lstat(self.directory)
        if not os.path.isdir(self.directory) or os.path.islink(self.directory):
            raise OSError(errno.ENOTDIR, f"{self.directory} is not a directory")
        if info.st_uid != os.getuid():
            raise OSError(errno.EPERM, f"{self.directory} belongs to uid {info.st_uid}")
        os.chmod(self.directory, 0o700)
        lock_fd = os.open(os.path.join(self.directory, LOCK_FILE),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise OSError(errno.EBUSY, f"{self.directory} is in use by another azregfs "
                          "mount; give each mount its own cache_dir") from None
        self._lock_fd = lock_fd
        found: list[tuple[float, str, int]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name == LOCK_FILE:
                    continue
                if not _is_block_file(entry.name):
                    _unlink(entry.path)  # temporary files of an interrupted write
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat(follow_symlinks=False)
                    found.append((stat.st_mtime, entry.name, stat.st_size))
        for _, name, size in sorted(found):
            self.index[name] = size
            self.used += size
        trimmed = 0
        while self.used > self.capacity and self.index:
            name, size = self.index.popitem(last=False)
            self.used -= size
            _unlink(self._path(name))
            trimmed += 1
        log.info("disk cache %s: %d blocks, %d MiB (bound %d MiB)%s", self.directory,
                 len(self.index), self.used >> 20, self.capacity >> 20,
                 f", {trimmed} old blocks removed" if trimmed else "")

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- keys ----------------------------------------------------------------------------

    def file_name(self, block_size: int, key: Key) -> str:
        name, etag, index = key
        text = "\0".join((self.namespace, str(block_size), name, etag, str(index)))
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()

    def _path(self, file_name: str) -> str:
        return os.path.join(self.directory, file_name)

    def __contains__(self, file_name: str) -> bool:
        return file_name in self.index

    # -- I/O -----------------------------------------------------------------------------

    async def get(self, file_name: str, length: int, stats: CacheStats) -> bytes | None:
        """The block stored under file_name if it is there, whole and `length` long."""
        if file_name not in self.index:
            return None
        self.index.move_to_end(file_name)
        path = self._path(file_name)
        try:
            data = await trio.to_thread.run_sync(_read_block, path, length,
                                                 limiter=self._limiter)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                stats.disk_errors += 1
                log.warning("disk cache: cannot read %s: %s", path, exc.strerror)
            data = None
        if data is None and file_name in self.index:
            # Missing or damaged: forget it, so the next read goes to Azure and rewrites it.
            self.used -= self.index.pop(file_name)
            await trio.to_thread.run_sync(_unlink, path, limiter=self._limiter)
        return data

    def accepts(self, size: int) -> bool:
        """Room in the queue of writes? (When the disk is slower than the network, blocks
        are not queued without bound: they are simply not kept on disk.)"""
        return self.pending_bytes + size <= self.max_pending

    async def put(self, file_name: str, data: bytes, stats: CacheStats) -> None:
        if file_name in self.index or file_name in self.writing:
            return
        size = _HEADER.size + len(data)
        if size > self.capacity:
            return
        self.writing.add(file_name)
        self.pending_bytes += len(data)
        self.used += size
        victims: list[str] = []
        while self.used > self.capacity and self.index:
            name, victim_size = self.index.popitem(last=False)
            self.used -= victim_size
            victims.append(name)
        stats.disk_evictions += len(victims)
        try:
            await trio.to_thread.run_sync(
                _write_block, self.directory, file_name, data, [self._path(v) for v in victims],
                limiter=self._limiter,
            )
        except OSError as exc:
            self.used -= size
            stats.disk_errors += 1
            log.warning("disk cache: cannot write to %s: %s", self.directory, exc.strerror)
        else:
            self.index[file_name] = size
            stats.disk_writes += 1
        finally:
            self.writing.discard(file_name)
            self.pending_bytes -= len(data)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _read_block(path: str, length: int) -> bytes | None:
    with open(path, "rb", buffering=0) as handle:
        blob = handle.read(_HEADER.size + length + 1)
    if len(blob) != _HEADER.size + length:
        return None
    magic, stored_length, crc = _HEADER.unpack_from(blob)
    data = blob[_HEADER.size:]
    if magic != _MAGIC or stored_length != length or zlib.crc32(data) != crc:
        return None
    now = time.time()
    with contextlib.suppress(OSError):
        os.utime(path, (now, now))  # the LRU order a remount will rebuild
    return data


def _write_block(directory: str, file_name: str, data: bytes, victims: list[str]) -> None:
    for victim in victims:
        _unlink(victim)
    temporary = os.path.join(directory, f"{file_name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            handle.write(_HEADER.pack(_MAGIC, len(data), zlib.crc32(data)))
            view = memoryview(data)
            while view:
                view = view[handle.write(view):]
        os.replace(temporary, os.path.join(directory, file_name))
    except BaseException:
        _unlink(temporary)
        raise


# -- the cache -------------------------------------------------------------------------------


class BlockCache:
    def __init__(
        self, driver: Driver, block_size: int, capacity: int, read_ahead: int,
        concurrency: int = 8, *, disk: DiskTier | None = None, stats_interval: float = 30.0,
        max_fetch: int = 8 * 1024 * 1024,
    ) -> None:
        self.driver = driver
        self.block_size = block_size
        # A window larger than a quarter of memory would evict blocks before their reader
        # gets to them (several readers share the cache).
        self.read_ahead = min(read_ahead, max(capacity // 4, block_size))
        self.max_fetch = max_fetch  # the largest ranged GET read-ahead makes
        self.stats = CacheStats()
        # cache_size bounds the read path's memory: cached blocks, pins and GETs in flight.
        self.blocks = _Blocks(max(capacity, block_size), self.stats, block_size,
                              self.read_ahead)
        self.fetch_room = _FetchRoom(self.blocks, max(capacity // 2, 2 * block_size))
        self.disk = disk
        self.stats_interval = stats_interval
        self._inflight: dict[Key, Flight[Block]] = {}
        # Versions whose read just failed: the kernel's repeat of that READ is answered at once.
        self.failed: RecentFailures[tuple[str, str]] = RecentFailures()
        self._prefetch_limiter = trio.CapacityLimiter(concurrency)
        self._nursery: trio.Nursery | None = None
        self.whole_max = min(self.read_ahead, WHOLE_READ_MAX)
        self.pin_budget = capacity // 4
        self.pinned_bytes = 0
        self.pins: dict[tuple[str, str], _Pin] = {}

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        if self.stats_interval > 0:
            nursery.start_soon(self._log_stats)

    async def _log_stats(self) -> None:
        """Every stats_interval seconds, one debug line if anything changed."""
        last: dict[str, int] = {}
        while True:
            await trio.sleep(self.stats_interval)
            now = self.stats.as_dict()
            if now != last:
                last = now
                log.debug("cache: %s memory_bytes=%d%s",
                          " ".join(f"{k}={v}" for k, v in now.items()), self.blocks.currsize,
                          f" disk_bytes={self.disk.used}" if self.disk else "")

    def _loading_or_loaded(self, key: Key) -> bool:
        return key in self.blocks or key in self._inflight

    def _held(self, key: Key) -> bool:
        """Is the block in memory, on its way, or on disk (cheaper than a ranged GET)?"""
        return self._loading_or_loaded(key) or self._on_disk(key)

    def _on_disk(self, key: Key) -> bool:
        return self.disk is not None and self.disk.file_name(self.block_size, key) in self.disk

    async def read(
        self, name: str, etag: str, blob_size: int, offset: int, size: int,
        stream: ReadStream | None = None,
    ) -> bytes | memoryview:
        """Bytes [offset, offset+size) of the version `etag` of blob `name` (a view into a
        cached block, when they lie in one)."""
        end = min(offset + size, blob_size)
        if offset >= end:
            return b""
        pin = self.pins.get((name, etag))
        if pin is not None:
            first, last = offset // self.block_size, (end - 1) // self.block_size
            return self._span(pin.blocks[first:last + 1], first, offset, end)
        self.failed.check((name, etag))
        try:
            return await self._read(name, etag, blob_size, offset, size, stream)
        except StorageError as exc:
            self.failed.note((name, etag), exc)
            raise

    async def _read(self, name: str, etag: str, blob_size: int, offset: int, size: int,
                    stream: ReadStream | None) -> bytes | memoryview:
        end = min(offset + size, blob_size)
        first = offset // self.block_size
        last = (end - 1) // self.block_size
        sequential = True
        if stream is not None:
            # A skip forward onto a block read ahead is the same sequential reader, not a
            # random one; when the skip is over what other readers of the file brought in,
            # it reads on at their pace (full-window runs, on the same grid as theirs).
            joined = self._loading_or_loaded((name, etag, first))
            skipped = 0 <= stream.next_offset < offset
            sequential = stream.observe(offset, size, self.read_ahead if joined else 0)
            if sequential and skipped:
                stream.run = max(stream.run, 2 * self.max_fetch)
        if not sequential and not all(self._held((name, etag, i)) for i in range(first, last + 1)):
            return await self._direct(name, etag, blob_size, offset, end)
        if stream is not None and sequential:
            if offset == 0 and stream.prefetched_to == 0:
                await self._start_whole_read(name, etag, blob_size, stream)
            self._read_ahead(name, etag, blob_size, last, stream)
        blocks = [await self.block(name, etag, blob_size, index)
                  for index in range(first, last + 1)]
        return self._span(blocks, first, offset, end)

    def _span(self, blocks: list[Block], first: int, offset: int,
              end: int) -> bytes | memoryview:
        """Bytes [offset, end) of consecutive blocks, the first of them block `first`: a view
        into the block when they lie in one (pyfuse3 replies from any buffer: no copy),
        else joined."""
        start = first * self.block_size
        if len(blocks) == 1:
            return memoryview(blocks[0])[offset - start:end - start]
        parts = [memoryview(block) for block in blocks]
        parts[0] = parts[0][offset - start:]
        parts[-1] = parts[-1][:end - start - (len(blocks) - 1) * self.block_size]
        return b"".join(parts)

    # -- pins: whole versions held for open handles ----------------------------------------

    async def pin(self, name: str, etag: str, size: int, known: bytes | None = None) -> bool:
        """Hold version `etag` of `name` (size bytes) whole until unpin: True if it is held.
        `known`: its content, proven without a GET (known.py), if it fits in one block.

        Raises StorageError (ESTALE when that version is gone) like a read."""
        key = (name, etag)
        pin = self.pins.get(key)
        if pin is None:
            if not 0 < size <= self.whole_max or self.pinned_bytes + size > self.pin_budget:
                return False
            self.failed.check(key)
            try:
                if known is not None and len(known) == size <= self.block_size:
                    self.stats.known += 1
                    self.blocks[(name, etag, 0)] = known
                blocks = await self._whole(name, etag, size)
            except StorageError as exc:
                self.failed.note(key, exc)
                raise
            pin = self.pins.get(key)  # another reader may have pinned it meanwhile
            if pin is None:
                if self.pinned_bytes + size > self.pin_budget:
                    return False
                pin = self.pins[key] = _Pin(blocks, size)
                self.pinned_bytes += size
                self.blocks.outside += size  # counted whole, even while the LRU holds it too
                self.blocks.fit()
        pin.holders += 1
        return True

    def unpin(self, name: str, etag: str) -> None:
        pin = self.pins.get((name, etag))
        if pin is None:
            return
        pin.holders -= 1
        if pin.holders <= 0:
            del self.pins[(name, etag)]
            self.pinned_bytes -= pin.size
            self.blocks.outside -= pin.size

    async def _whole(self, name: str, etag: str, size: int) -> list[Block]:
        """Every block of one version: those nobody holds in one ranged GET, then all."""
        count = -(-size // self.block_size)
        # One GET even across a block someone holds: a small file costs one round trip.
        for run in self._claim(name, etag, range(count), bridge=True):
            await self._load(name, etag, size, run, for_reader=False)
        return [await self.block(name, etag, size, index) for index in range(count)]

    async def _direct(self, name: str, etag: str, blob_size: int, offset: int, end: int) -> bytes:
        """A random read: just the aligned range, not cached (a ranged GET, as the SDK)."""
        self.stats.misses += 1
        self.stats.memory_misses += 1
        start = offset - offset % RANDOM_ALIGN
        stop = min(blob_size, -(-end // RANDOM_ALIGN) * RANDOM_ALIGN)
        async with self.fetch_room.hold(stop - start):
            data = await self.driver.read(name, start, stop - start, etag)
        self.stats.bytes_from_azure += len(data)
        return data[offset - start:end - start]

    async def block(self, name: str, etag: str, blob_size: int, index: int) -> Block:
        key = (name, etag, index)
        data = self.blocks.get(key)
        if data is not None:
            self.stats.hits += 1
            self.stats.memory_hits += 1
            return data
        self.stats.memory_misses += 1
        download = self._inflight.get(key)
        if download is None:
            (run,) = self._claim(name, etag, (index,))
            return (await self._load(name, etag, blob_size, run, for_reader=True))[key]
        return await download.result()

    def _claim(self, name: str, etag: str, indices: Iterable[int],
               bridge: bool = False) -> list[Run]:
        """Flights for the blocks among `indices` (ascending) that nobody holds or loads,
        grouped into runs to load together: consecutive blocks in one ranged GET, a block
        the disk holds on its own. With `bridge`, every block nobody holds anywhere is one
        run, whose GET spans the blocks between. Claimed with no await in between, so a
        block never has two loads; every claimed Flight is landed or failed by ``_load``
        or ``_drop``."""
        runs: list[Run] = []
        previous = -2
        joinable = False
        for index in indices:
            key = (name, etag, index)
            if self._loading_or_loaded(key) or (bridge and self._on_disk(key)):
                joinable = bridge and bool(runs)
                continue
            on_disk = self._on_disk(key)
            if not (joinable and not on_disk and (bridge or previous == index - 1)):
                runs.append({})
            runs[-1][key] = self._inflight[key] = Flight()
            joinable = not on_disk
            previous = index
        return runs

    async def _load(self, name: str, etag: str, blob_size: int, run: Run,
                    for_reader: bool) -> dict[Key, Block]:
        """Load claimed blocks: one block from disk if the disk holds it, else one ranged GET
        from the first to the last, read into one buffer a block. Hits and misses count
        readers, not read-ahead."""
        keys = list(run)
        first, last = keys[0][2], keys[-1][2]
        try:
            start = first * self.block_size
            length = min((last + 1) * self.block_size, blob_size) - start
            async with self.fetch_room.hold(length):
                data = await self._from_disk(keys[0], length) if len(keys) == 1 else None
                if data is not None:
                    self.stats.hits += for_reader
                    blocks = {keys[0]: data}
                else:
                    self.stats.misses += for_reader
                    if self.disk is not None:
                        self.stats.disk_misses += len(keys)
                    pieces = await self.driver.read_blocks(name, start, length, etag,
                                                           self.block_size)
                    self.stats.bytes_from_azure += sum(map(len, pieces))
                    if [len(piece) for piece in pieces] != [
                            min(self.block_size, start + length - index * self.block_size)
                            for index in range(first, last + 1)]:
                        raise StorageError(errno.EIO, f"{name}: {sum(map(len, pieces))} bytes "
                                           f"in answer to a range of {length}")
                    blocks = {key: pieces[key[2] - first] for key in keys}
                    for key in keys:
                        self._to_disk(key, blocks[key])
            if not for_reader:
                self.stats.prefetched += len(keys)
            for key in keys:
                self.blocks[key] = blocks[key]
        except BaseException as exc:
            self._drop(run, exc)
            raise
        for key, flight in run.items():
            del self._inflight[key]
            flight.land(blocks[key])
        return blocks

    def _drop(self, run: Run, error: BaseException) -> None:
        """Give up claimed blocks: their waiters get `error`, a later reader loads anew."""
        for key, flight in run.items():
            if self._inflight.get(key) is flight:
                del self._inflight[key]
                flight.fail(error)

    async def _from_disk(self, key: Key, length: int) -> bytes | None:
        if self.disk is None:
            return None
        data = await self.disk.get(self.disk.file_name(self.block_size, key), length, self.stats)
        if data is not None:
            self.stats.disk_hits += 1
        return data

    def _to_disk(self, key: Key, data: bytes) -> None:
        # Written in the background: the reader has its bytes and need not wait for a disk.
        if self.disk is not None and self._nursery is not None and self.disk.accepts(len(data)):
            self._nursery.start_soon(
                self.disk.put, self.disk.file_name(self.block_size, key), data, self.stats
            )

    async def _start_whole_read(self, name: str, etag: str, blob_size: int,
                                stream: ReadStream) -> None:
        """A reader starting at the beginning of a blob most likely reads it whole (a
        registry pull, cp, a digest): its first GET takes max_fetch bytes, not one block,
        and read-ahead goes on at full window (GETs of max_fetch) instead of ramping up.
        So does a reader starting while another reads the blob: the loads are shared."""
        count = min(min(self.max_fetch, self.read_ahead) // self.block_size,
                    (blob_size - 1) // self.block_size + 1)  # within the read-ahead window
        stream.prefetched_to = count
        stream.run = max(stream.run, 2 * self.max_fetch)  # a window refilled max_fetch a time
        for run in self._claim(name, etag, range(count)):
            await self._load(name, etag, blob_size, run, for_reader=False)

    def _read_ahead(
        self, name: str, etag: str, blob_size: int, last: int, stream: ReadStream
    ) -> None:
        """Keep up to a window of blocks ahead of a sequential reader, fetched in runs.

        The window doubles with the run up to ``read_ahead``; it is refilled a half-window
        at a time (at most ``max_fetch`` bytes per GET), because one large ranged GET costs
        far less than many small ones (per-request latency, and CPU on both ends). Runs lie
        on a grid of that size, and are claimed before they wait for a GET slot: readers of
        one version at different places ask for the same runs, and share them whole, where
        runs planned from each reader's own position would split each other into small
        GETs (and a reader overtaking a queued run would GET its blocks one by one).
        """
        if self._nursery is None or stream.run < self.block_size // 2:
            return
        window = max(1, min(self.read_ahead, max(self.block_size, stream.run)) // self.block_size)
        step = max(1, min(self.max_fetch // self.block_size, window // 2))
        end_of_blob = (blob_size - 1) // self.block_size
        final = min(end_of_blob, last + window)
        first = max(last + 1, stream.prefetched_to)
        while first <= final:
            run_end = min(first - first % step + step - 1, end_of_blob)
            if run_end > final:
                break  # not yet wholly inside the window
            # The whole cell of the grid: its blocks before `first` that nobody holds yet
            # (the reader is about to load them itself) join its GET.
            runs = self._claim(name, etag, range(first - first % step, run_end + 1))
            if runs:
                self._nursery.start_soon(self._prefetch, name, etag, blob_size, runs)
            first = run_end + 1
        stream.prefetched_to = max(stream.prefetched_to, first)

    async def _prefetch(self, name: str, etag: str, blob_size: int,
                        runs: list[Run]) -> None:
        """Load claimed runs, at most ``concurrency`` read-aheads at a time."""
        try:
            async with self._prefetch_limiter:
                while runs:
                    run = runs.pop(0)
                    try:
                        await self._load(name, etag, blob_size, run, for_reader=False)
                    except Exception as exc:  # noqa: BLE001 - its waiters have the error
                        log.debug("read-ahead of %s blocks %d-%d failed: %s", name,
                                  min(run)[2], max(run)[2], exc)
        except BaseException as exc:
            for run in runs:  # never started (shutdown): nobody may wait on them forever
                self._drop(run, exc)
            raise
