"""The daemon: wires driver, namespace, cache and write buffer under one trio nursery, mounts,
serves until unmounted or signalled, and commits every pending write before it exits.

Shutdown order matters: on SIGTERM/SIGINT the pending writes are committed while the mount
still serves, then the FUSE loop stops, then the mount is removed. After an external
unmount (``fusermount3 -u``) the loop ends by itself and the same commit runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from .blockcache import BlockCache, DiskTier
from .config import Config
from .driver import Driver
from .metrics import Metrics
from .metrics import start_server as start_metrics_server
from .namespace import Namespace
from .operations import Operations
from .version import version_line
from .writebuffer import WriteBuffer

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


def tune_malloc() -> None:
    """Keep freed block buffers in the heap for reuse instead of unmapping them.

    Every ranged GET and every block allocates buffers of megabytes; by default glibc
    serves each from a fresh mmap and unmaps it on free, so every byte costs a page fault
    before it is copied (measured here: 13x slower copies, the daemon's main CPU cost on
    a sequential read). Bounded: at most 128 MiB of free heap is kept before trimming.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


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
        self.failed_commits = 0

    def run(self, on_ready: Callable[[], None]) -> int:
        tune_malloc()
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
            nursery.start_soon(self._watch_signals)
            nursery.start_soon(self._tune_kernel_read_ahead)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            sd_notify("STOPPING=1")
            self.failed_commits += await self.writes.commit_all()
            nursery.cancel_scope.cancel()

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

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue
                log.info("%s: committing pending writes, then unmounting",
                         signal.Signals(signum).name)
                sd_notify("STOPPING=1")
                self.signalled = True
                self.failed_commits += await self.writes.commit_all()
                pyfuse3.terminate()
                return


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
