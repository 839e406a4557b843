"""The daemon: wires driver, namespace, cache and write buffer under one trio nursery, mounts,
serves until unmounted or signalled, and commits every pending write before it exits.

Shutdown order matters: on SIGTERM/SIGINT the pending writes are committed while the mount
still serves, then the FUSE loop stops, then the mount is removed. After an external
unmount (``fusermount3 -u``) the loop ends by itself and the same commit runs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable

import pyfuse3
import trio

from .blockcache import BlockCache
from .config import Config
from .driver import Driver
from .namespace import Namespace
from .operations import Operations
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


class Daemon:
    def __init__(self, cfg: Config, mountpoint: str, extra_options: set[str] | None = None) -> None:
        self.cfg = cfg
        self.mountpoint = mountpoint
        self.driver = Driver(cfg)
        self.namespace = Namespace(cfg, self.driver)
        self.cache = BlockCache(self.driver, cfg.read_block_size, cfg.cache_size, cfg.read_ahead)
        self.writes = WriteBuffer(self.driver, self.cache, cfg.block_size, cfg.dirty_budget)
        self.operations = Operations(cfg, self.namespace, self.cache, self.writes)
        self.options = fuse_options(cfg, extra_options or set())
        self.signalled = False
        self.failed_commits = 0

    def run(self, on_ready: Callable[[], None]) -> int:
        pyfuse3.init(self.operations, self.mountpoint, self.options)
        try:
            log.info("mounted container %s at %s", self.cfg.container, self.mountpoint)
            on_ready()
            sd_notify("READY=1\nSTATUS=mounted")
            trio.run(self._serve)
        finally:
            pyfuse3.close(unmount=self.signalled)
            self.driver.close()
        log.info("unmounted %s", self.mountpoint)
        return 1 if self.failed_commits else 0

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.cache.start(nursery)
            self.writes.start(nursery)
            nursery.start_soon(self._watch_signals)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            sd_notify("STOPPING=1")
            self.failed_commits += await self.writes.commit_all()
            nursery.cancel_scope.cancel()

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
