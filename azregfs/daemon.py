"""The daemon: wires driver, namespace, cache and write buffer under one trio nursery, mounts,
serves until unmounted or signalled, and commits every pending write before it exits.

Shutdown order matters: on SIGTERM/SIGINT the kernel is first asked to hand over the
writes its writeback cache holds (an fsync of each file being written, answered by this
very loop; further WRITEs are then refused, so a commit never catches a later page without
an earlier one), then the pending writes are committed (then the deferred markers of
empty directories written) while the mount still serves, then the FUSE loop stops, then
the mount is removed. After an external unmount (``fusermount3 -u``) the loop ends by
itself and the same saving runs (that unmount succeeds only when no file is open, and
each close wrote its file back).

Stopping is bounded even when Azure is unreachable: every file is committed at once (each
fails within its own request bounds, so a stop costs about one commit's bound, not one per
file), a commit that failed is tried once, not again after the loop stops, and a second
SIGTERM/SIGINT abandons the save and unmounts now (the files not committed are counted in
the exit status and the log).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from .config import Config
from .fs.namespace import Namespace
from .fs.operations import Operations
from .ops.metrics import Metrics
from .ops.metrics import start_server as start_metrics_server
from .ops.version import version_line
from .read.blockcache import BlockCache, DiskTier
from .storage.driver import Driver
from .write.writebuffer import WriteBuffer

log = logging.getLogger(__name__)


def fuse_options(cfg: Config, extra: set[str]) -> set[str]:
    options = {f"fsname=azregfs:{cfg.container}", "subtype=azregfs", "default_permissions"}
    if cfg.allow_other:
        options.add("allow_other")
    options |= {item for item in extra if item in ("ro", "rw", "noexec", "nosuid", "nodev")}
    return options


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("could not notify systemd: %s", exc)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MiB = 1024 * 1024
# What the daemon may hold beyond cache_size and dirty_budget: the interpreter and its
# libraries (about 60 MiB), buffers in flight outside both budgets, free heap.
MEMORY_SLACK = 150 * MiB


class Glibc:
    """glibc's allocator: malloc_trim, for ``HeapTrimmer``."""

    def __init__(self, libc: Any) -> None:
        self._malloc_trim = libc.malloc_trim
        self._malloc_trim.argtypes = [ctypes.c_size_t]

    def trim(self) -> None:
        """Give every free page inside the heap back to the system (malloc_trim(0))."""
        self._malloc_trim(0)


def tune_malloc() -> Glibc | None:
    """Set glibc's allocator for a daemon that allocates and frees buffers of megabytes;
    the allocator for ``HeapTrimmer``, or None when the libc is not glibc.

    - One arena (M_ARENA_MAX 1). glibc gives each thread that allocates its own arena, up
      to 8 per core, and a freed block stays in the arena that served it: with the driver's
      worker threads each handling a ranged GET or a staged block now and then, every arena
      came to hold tens of MiB of free memory (measured: 14 arenas of 31-38 MiB resident
      at rest). The worker threads hold the GIL whenever they allocate: one arena did not
      change the daemon's CPU time for 2 GiB written and read back (measured).
    - Block buffers from the heap, not from a fresh mmap each (M_MMAP_THRESHOLD 32 MiB):
      glibc would otherwise unmap each on free, so every byte of the next one costs a page
      fault before it is copied (measured: 13x slower copies, the main CPU cost of a
      sequential read; with an 8 MiB threshold, the daemon took 40% more CPU to read).
    - The free top of the heap goes back to the system past 32 MiB (M_TRIM_THRESHOLD);
      free memory inside the heap is given back by ``HeapTrimmer``.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        glibc = Glibc(libc)
    except (OSError, AttributeError):
        return None  # not glibc: its allocator has its own policy
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_ARENA_MAX, 1)
    mallopt(M_MMAP_THRESHOLD, 32 * MiB)
    mallopt(M_TRIM_THRESHOLD, 32 * MiB)
    return glibc


def resident_bytes() -> int:
    """This process's RSS, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """Gives memory freed inside the heap back to the system (malloc_trim(0)), from a
    worker thread, never on the event loop: it walks the heap holding the allocator's lock.

    glibc returns only the free top of the heap by itself. The daemon frees buffers of
    megabytes all the time (evicted cache blocks, staged write blocks, ranged GETs), and
    the holes they leave below live data stay resident: without this, RSS stays at its
    highest point for good. A trimmed page costs a page fault when the allocator uses it
    again, and glibc hands out its oldest free chunks first, so under load a trim is soon
    undone: trims are kept for when they matter. RSS is read every ``poll`` seconds, and
    the heap trimmed

    - when RSS comes within ``margin`` of ``ceiling`` (the memory the daemon may use), at
      most every ``poll`` seconds;
    - every ``interval`` seconds, if RSS has grown by ``slack`` since the last trim, or has
      grown at all while standing still since the last look (at rest the daemon keeps its
      live data and little more).
    """

    def __init__(self, glibc: Glibc, ceiling: int = 0, *, poll: float = 0.1,
                 interval: float = 1.0, slack: int = 32 * MiB, margin: int = 64 * MiB) -> None:
        self.glibc = glibc
        self.ceiling = ceiling  # 0: none
        self.poll = poll
        self.interval = interval
        self.slack = slack
        self.margin = margin
        self.trims = 0
        self._after = resident_bytes()  # RSS right after the last trim (or its lowest since)
        self._last = self._after  # RSS at the last periodic look

    async def run(self) -> None:
        next_look = trio.current_time() + self.interval
        while True:
            await trio.sleep(self.poll)
            rss = resident_bytes()
            self._after = min(self._after, rss)
            if self.ceiling and rss > max(self.ceiling - self.margin, self._after + 8 * MiB):
                await self._trim(rss)  # near the ceiling, and grown since the last trim
            elif trio.current_time() >= next_look:
                next_look = trio.current_time() + self.interval
                quiet = abs(rss - self._last) < MiB
                self._last = rss
                if rss > self._after + self.slack or (quiet and rss > self._after + MiB):
                    await self._trim(rss)

    async def _trim(self, rss: int) -> None:
        started = time.monotonic()
        await trio.to_thread.run_sync(self.glibc.trim)
        self.trims += 1
        self._after = self._last = resident_bytes()
        log.debug("malloc_trim: RSS %d -> %d MiB in %.1f ms", rss // MiB, self._after // MiB,
                  (time.monotonic() - started) * 1000)


def open_disk_cache(cfg: Config, driver: Driver) -> DiskTier | None:
    """The disk tier, or None (logged) when cache_dir is unset or unusable: a broken
    cache directory costs speed, not the mount."""
    if not cfg.cache_dir:
        return None
    where = driver.container.primary_endpoint.split("?")[0]
    disk = DiskTier(cfg.cache_dir, cfg.cache_dir_size, namespace=where)
    try:
        disk.open()
    except OSError as exc:
        log.error("cache_dir %s not used (reads are cached in memory only): %s",
                  cfg.cache_dir, exc)
        disk.close()
        return None
    return disk


class Daemon:
    def __init__(self, cfg: Config, mountpoint: str, extra_options: set[str] | None = None) -> None:
        self.cfg = cfg
        self.mountpoint = mountpoint
        self.metrics = Metrics(cfg.container)
        self.driver = Driver(cfg, self.metrics)
        self.namespace = Namespace(cfg, self.driver)
        self.disk_cache = open_disk_cache(cfg, self.driver)
        self.cache = BlockCache(self.driver, cfg.read_block_size, cfg.cache_size, cfg.read_ahead,
                                disk=self.disk_cache)
        self.writes = WriteBuffer(self.driver, self.cache, cfg.block_size, cfg.dirty_budget)
        self.operations = Operations(cfg, self.namespace, self.cache, self.writes)
        self.options = fuse_options(cfg, extra_options or set())
        self.signalled = False
        self.saving: set[trio.CancelScope] = set()  # the saves before exit under way
        self.abandoned = False  # a second signal: exit without saving
        self.failed_commits = 0
        self.trimmer: HeapTrimmer | None = None

    def run(self, on_ready: Callable[[], None]) -> int:
        glibc = tune_malloc()
        if glibc is not None:
            self.trimmer = HeapTrimmer(
                glibc, ceiling=self.cfg.cache_size + self.cfg.dirty_budget + MEMORY_SLACK)
        log.info("%s", version_line())
        metrics_server = self._serve_metrics()
        pyfuse3.init(self.operations, self.mountpoint, self.options)
        try:
            log.info("mounted container %s at %s", self.cfg.container, self.mountpoint)
            on_ready()
            sd_notify("READY=1\nSTATUS=mounted")
            trio.run(self._serve)
        finally:
            pyfuse3.close(unmount=self.signalled)
            if metrics_server is not None:
                metrics_server.shutdown()
            self.driver.close()
            if self.disk_cache is not None:
                self.disk_cache.close()
        log.info("unmounted %s", self.mountpoint)
        return 1 if self.failed_commits else 0

    def _serve_metrics(self) -> Any:
        """The Prometheus endpoint, if asked for. One that cannot listen costs the
        operator's graphs, not the mount: logged as an ERROR, and the mount goes on."""
        if not self.cfg.metrics_addr:
            return None
        try:
            return start_metrics_server(self.metrics, self.cfg.metrics_addr)
        except OSError as exc:
            log.error("metrics_addr %s: cannot listen (%s); no /metrics for this mount",
                      self.cfg.metrics_addr, exc.strerror or exc)
            return None

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.cache.start(nursery)
            self.writes.start(nursery)
            self.namespace.scans.start(nursery)
            nursery.start_soon(self._watch_signals, nursery)
            nursery.start_soon(self.namespace.markers.task)
            nursery.start_soon(self._tune_kernel_read_ahead)
            if self.trimmer is not None:
                nursery.start_soon(self.trimmer.run)
            nursery.start_soon(self.operations.inode_budget.run)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            sd_notify("STOPPING=1")
            if not self.abandoned:
                # Writes that came in while a signal's save ran; a commit that failed
                # then was reported once and is not tried again.
                await self._save_everything(retry_failed=not self.signalled)
            nursery.cancel_scope.cancel()

    async def _save_everything(self, retry_failed: bool = True) -> None:
        """Before exiting: commit every pending write, then write the deferred markers of
        empty directories (after the commits: a committed file makes its marker moot)."""
        with trio.CancelScope() as scope:
            self.saving.add(scope)
            try:
                self.failed_commits += await self.writes.commit_all(retry_failed)
                await self.namespace.markers.write_due(under="")
            finally:
                self.saving.discard(scope)

    async def _tune_kernel_read_ahead(self) -> None:
        """A FUSE mount starts with the kernel's 128 KiB read-ahead, so a sequential read
        reaches us as 128 KiB requests; a larger window means fewer requests for the same
        bytes (less CPU per MiB). Only root may set it; otherwise the default stays."""
        if self.cfg.kernel_read_ahead <= 0:
            return
        try:
            # From a thread: the stat is a FUSE request that this very loop must answer.
            device = (await trio.to_thread.run_sync(os.stat, self.mountpoint)).st_dev
            path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
            kib = str(max(4, self.cfg.kernel_read_ahead // 1024))
            await trio.to_thread.run_sync(_write_text, path, kib)
            log.debug("kernel read-ahead of %s: %s KiB", self.mountpoint, kib)
        except OSError as exc:
            log.debug("kernel read-ahead left as is: %s", exc)

    async def _watch_signals(self, nursery: trio.Nursery) -> None:
        """SIGTERM/SIGINT: save, then unmount. A second one stops waiting for the save
        (storage unreachable, an operator in a hurry): what is not committed is lost."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    continue
                if self.signalled:
                    log.error("%s again: unmounting now; %d files with unsaved data lost",
                              name, self.writes.unsaved())
                    self.abandoned = True
                    self.failed_commits += self.writes.unsaved()
                    for scope in self.saving:
                        scope.cancel()
                    return
                log.info("%s: committing pending writes, then unmounting", name)
                sd_notify("STOPPING=1")
                self.signalled = True
                nursery.start_soon(self._stop)

    async def _stop(self) -> None:
        if self.cfg.writeback_cache:
            with trio.CancelScope() as scope:  # a second signal cancels it, like the save
                self.saving.add(scope)
                try:
                    await self._flush_kernel_cache()
                    await self.operations.stop_taking_writes("the daemon is stopping")
                finally:
                    self.saving.discard(scope)
        if not self.abandoned:
            await self._save_everything()
        pyfuse3.terminate()

    async def _flush_kernel_cache(self) -> None:
        """With the writeback cache, what a process wrote to a file it still holds open
        may be in the kernel's page cache, not here yet. An fsync of each file being
        written makes the kernel send it (WRITE requests this loop answers) and returns
        once every page is in; syncfs would not wait for a FUSE mount's pages."""
        paths = sorted({session.node.path for session in self.writes.sessions.values()
                        if not session.deleted and not session.node.gone})
        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(self._flush_file, path)

    async def _flush_file(self, path: str) -> None:
        full = os.path.join(self.mountpoint, path)
        try:
            await trio.to_thread.run_sync(fsync_path, full, abandon_on_cancel=True)
        except OSError as exc:
            log.error("could not take the kernel's cached writes of %s: %s; data written to "
                      "it since its last close or fsync may be lost", full, exc.strerror or exc)


def fsync_path(path: str) -> None:
    """fsync(2) of a file by its path, through a descriptor of its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
